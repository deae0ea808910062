"""``ChangeStream``: what ``Store.watch`` returns, for every adapter.

Why not an async generator: cancelling a pending ``anext()`` of a generator (as
``asyncio.timeout`` or ``wait_for`` around it does) throws into the generator and ends
it, so "wait up to 1 s for the next change" would silently kill the watch. Here a
cancelled ``__anext__`` loses nothing: the position only moves when a batch is buffered,
and the next call carries on. End a stream with ``aclose()`` (or ``async with``); one
that is dropped is ended when it is garbage-collected.
"""

from __future__ import annotations

import abc
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable

from shoal.store.base import Change


class ChangeStream(AsyncIterator[Change], abc.ABC):
    """Changes under ``prefix`` after revision ``last``, in revision order."""

    def __init__(self, prefix: str, last: int, on_close: Callable[[], None] | None = None) -> None:
        self.prefix = prefix
        self.last = last  # revision up to which changes were fetched (buffered or yielded)
        self._buffer: deque[Change] = deque()
        self._ended = False
        self._on_close = weakref.finalize(self, on_close) if on_close else None

    @abc.abstractmethod
    async def _fetch(self) -> list[Change] | None:
        """Wait for, then return, the next changes under the prefix after ``last``,
        advancing ``last`` in the same step (no await in between); None: the store closed.
        """

    def __aiter__(self) -> ChangeStream:
        return self

    async def __anext__(self) -> Change:
        while not self._buffer:
            if self._ended:
                raise StopAsyncIteration
            batch = await self._fetch()
            if batch is None:
                self._end()
                raise StopAsyncIteration
            self._buffer.extend(batch)
        return self._buffer.popleft()

    def _end(self) -> None:
        self._ended = True
        if self._on_close is not None:
            self._on_close()  # runs at most once

    async def aclose(self) -> None:
        """Stop watching (buffered changes are dropped)."""
        self._buffer.clear()
        self._end()

    async def __aenter__(self) -> ChangeStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
