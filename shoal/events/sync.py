"""A blocking facade for code that is not async (scripts, Flask, Django) to publish."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from shoal.events.bus import EventBus, Message, PublishAck

T = TypeVar("T")


class SyncEventBus:
    """``EventBus`` for synchronous code: runs the bus on a private event-loop thread.

    Thread-safe: any number of threads may publish at once (their events share group
    commits). Use as a context manager, or call ``close()``.
    """

    def __init__(self, url: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="shoal-bus", daemon=True
        )
        self._thread.start()
        async def connect() -> EventBus:
            return await EventBus.connect(url, **options)

        self._bus: EventBus = self._run(connect())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def publish(
        self,
        topic: str,
        data: Any = None,
        *,
        key: str | None = None,
        type: str | None = None,
        id: str | None = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> PublishAck:
        """Publish one event and wait until it is durable."""
        return self._run(
            self._bus.publish(topic, data, key=key, type=type, id=id, extensions=extensions)
        )

    def publish_many(self, topic: str, messages: Iterable[Message | Any]) -> list[PublishAck]:
        """Publish a batch and wait until it is durable."""
        return self._run(self._bus.publish_many(topic, list(messages)))

    def create_topic(self, name: str, partitions: int = 8, **options: Any) -> Any:
        """Create a topic (see ``EventBus.create_topic``)."""
        return self._run(self._bus.create_topic(name, partitions, **options))

    def close(self) -> None:
        """Flush and close the bus, then stop the loop thread."""
        if self._loop.is_closed():
            return
        self._run(self._bus.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncEventBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
