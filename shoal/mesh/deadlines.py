"""Per-try timeouts for many concurrent calls with one timer.

``asyncio.timeout`` (and a bare ``loop.call_at`` handle) arms and disarms a loop timer per
call; on uvloop that is a libuv timer started, stopped and closed, which measured ~12 us
per call on the gateway's hot path, more than the rest of the resilience stack together.
``Deadlines`` keeps the calls in flight in a set and one timer at the earliest deadline
it knows of: starting a call is a set insertion and finishing it a removal. With one
timeout per upstream, later calls have later deadlines, so the timer is re-armed only
when it fires (then every call in flight is checked, and it is armed at the earliest
deadline left). A call whose deadline passed has its task cancelled, exactly like
``asyncio.timeout``; the caller turns that cancellation into ``TimeoutError``::

    expiry = deadlines.start(task, seconds)
    try:
        response = await call()
    except asyncio.CancelledError:
        if expiry.expired(): raise TimeoutError from None
        raise
    finally:
        deadlines.finish(expiry)
"""

from __future__ import annotations

import asyncio
import math

__all__ = ["Deadlines", "Expiry"]


class Expiry:
    """One call's deadline; ``expired()`` tells whether its cancellation was ours."""

    __slots__ = ("fired", "task", "when")

    def __init__(self, task: asyncio.Task[object], when: float) -> None:
        self.task = task
        self.when = when
        self.fired = False

    def expired(self) -> bool:
        """True if the deadline cancelled the task and nothing else asked to cancel it
        (consumes our cancellation request, as ``asyncio.timeout`` does)."""
        return self.fired and self.task.uncancel() == 0


class Deadlines:
    """Deadlines of the calls in flight on one loop, checked by one timer."""

    __slots__ = ("_due", "_handle", "_live", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._live: set[Expiry] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._due = math.inf  # when the timer fires

    def __len__(self) -> int:
        return len(self._live)

    def start(self, task: asyncio.Task[object], seconds: float) -> Expiry:
        """Cancel ``task`` if it is still running ``seconds`` from now (unless finished)."""
        loop = self.loop
        expiry = Expiry(task, loop.time() + seconds)
        self._live.add(expiry)
        if expiry.when < self._due:
            self._arm(expiry.when)
        return expiry

    def finish(self, expiry: Expiry) -> None:
        """The call ended: forget its deadline."""
        self._live.discard(expiry)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._due = when
        self._handle = self.loop.call_at(when, self._check)

    def _check(self) -> None:
        self._handle = None
        self._due = math.inf
        now = self.loop.time()
        earliest = math.inf
        expired = []
        for expiry in self._live:
            if expiry.when <= now:
                expired.append(expiry)
            elif expiry.when < earliest:
                earliest = expiry.when
        for expiry in expired:
            self._live.discard(expiry)
            if not expiry.task.done():
                expiry.fired = True
                expiry.task.cancel()
        if earliest < math.inf:
            self._arm(earliest)

    def close(self) -> None:
        """Stop the timer (calls still in flight keep running without a deadline)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._due = math.inf
        self._live.clear()
