"""The in-process broker: for users' unit tests and for the conformance suite's baseline.

``memory://NAME`` gives every bus in one process the same logs for the same NAME. Not
durable, by design.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from dataclasses import dataclass, field

from shoal.errors import TopicError
from shoal.events.brokers.base import (
    Append,
    Appended,
    Broker,
    PartitionRange,
    Record,
    TopicSpec,
)


@dataclass
class _Partition:
    records: list[Record] = field(default_factory=list)
    start: int = 0  # offset of records[0]
    size: int = 0


@dataclass
class _Log:
    spec: TopicSpec
    partitions: list[_Partition]
    dedup: dict[str, tuple[Appended, float]] = field(default_factory=dict)
    generation: int = 0
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = field(
        default_factory=list
    )


class _Shared:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.logs: dict[str, _Log] = {}


_registry: dict[str, _Shared] = {}
_registry_lock = threading.Lock()


class MemoryBroker(Broker):
    """Logs in a dict, shared by name within the process; safe across event loops."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        with _registry_lock:
            self._shared = _registry.setdefault(url, _Shared())

    async def create_topic(self, spec: TopicSpec) -> TopicSpec:
        with self._shared.lock:
            log = self._shared.logs.get(spec.name)
            if log is None:
                parts = [_Partition() for _ in range(spec.partitions)]
                self._shared.logs[spec.name] = _Log(spec, parts)
                return spec
        if log.spec.partitions != spec.partitions:
            raise TopicError(
                f"topic {spec.name!r} exists with {log.spec.partitions} partitions, "
                f"not {spec.partitions}"
            )
        return log.spec

    async def get_topic(self, name: str) -> TopicSpec | None:
        log = self._shared.logs.get(name)
        return None if log is None else log.spec

    async def list_topics(self) -> list[TopicSpec]:
        return sorted((log.spec for log in self._shared.logs.values()), key=lambda s: s.name)

    def _log(self, topic: str) -> _Log:
        log = self._shared.logs.get(topic)
        if log is None:
            raise TopicError(f"topic {topic!r} does not exist")
        return log

    async def append(self, topic: str, records: list[Append]) -> list[Appended]:
        log = self._log(topic)
        now = time.time()
        out: list[Appended] = []
        with self._shared.lock:
            if log.dedup and len(log.dedup) > 10_000:
                log.dedup = {k: v for k, v in log.dedup.items() if v[1] > now}
            for r in records:
                if r.dedup_id is not None:
                    seen = log.dedup.get(r.dedup_id)
                    if seen is not None and seen[1] > now:
                        out.append(Appended(seen[0].partition, seen[0].offset, True))
                        continue
                part = log.partitions[r.partition]
                offset = part.start + len(part.records)
                part.records.append(Record(r.partition, offset, r.timestamp_ms, r.key, r.value))
                part.size += len(r.value)
                ack = Appended(r.partition, offset)
                if r.dedup_id is not None:
                    log.dedup[r.dedup_id] = (ack, now + self.dedup_window_seconds)
                out.append(ack)
            log.generation += 1
            waiters, log.waiters = log.waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_wake, fut)
        return out

    async def read(self, topic: str, partition: int, offset: int, limit: int) -> list[Record]:
        part = self._log(topic).partitions[partition]
        with self._shared.lock:
            i = max(0, offset - part.start)
            return part.records[i : i + limit]

    async def ranges(self, topic: str) -> list[PartitionRange]:
        return [
            PartitionRange(p.start, p.start + len(p.records), p.size)
            for p in self._log(topic).partitions
        ]

    async def offset_for_time(self, topic: str, partition: int, timestamp_ms: int) -> int:
        part = self._log(topic).partitions[partition]
        with self._shared.lock:
            i = bisect.bisect_left(part.records, timestamp_ms, key=lambda r: r.timestamp_ms)
            return part.start + i

    def append_generation(self, topic: str) -> int:
        return self._log(topic).generation

    async def wait_for_append(self, topic: str, since: int, timeout: float) -> None:
        log = self._log(topic)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._shared.lock:
            if log.generation != since:
                return
            log.waiters.append((asyncio.get_running_loop(), fut))
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            pass
        finally:
            with self._shared.lock:
                if (entry := (asyncio.get_running_loop(), fut)) in log.waiters:
                    log.waiters.remove(entry)

    async def apply_retention(self, topic: str) -> int:
        log = self._log(topic)
        spec, removed = log.spec, 0
        cutoff = None
        if spec.retention_seconds is not None:
            cutoff = int((time.time() - spec.retention_seconds) * 1000)
        with self._shared.lock:
            for part in log.partitions:
                drop = 0
                if cutoff is not None:
                    drop = bisect.bisect_left(part.records, cutoff, key=lambda r: r.timestamp_ms)
                size = part.size - sum(len(r.value) for r in part.records[:drop])
                if spec.retention_bytes is not None:
                    while drop < len(part.records) and size > spec.retention_bytes:
                        size -= len(part.records[drop].value)
                        drop += 1
                if drop:
                    del part.records[:drop]
                    part.start += drop
                    part.size = size
                    removed += drop
        return removed

    async def close(self) -> None:
        return None


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
