"""Group commit: publishes made while the previous batch is being written share one write."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from shoal.errors import PublishError, ShoalError
from shoal.events.brokers.base import Append, Appended, Broker
from shoal.observability import metrics as _metrics

MAX_BATCH = 4096


class AppendQueue:
    """One topic's pending appends; a single flusher task writes them in batches.

    While one batch is in the broker's hands, new appends pile up and go together in the
    next, so the batch size adapts to the load with no timer and no added latency when
    idle (the first publish after a quiet spell is written at once).
    """

    def __init__(self, broker: Broker, topic: str) -> None:
        self._broker = broker
        self._topic = topic
        self._pending: list[tuple[Sequence[Append], asyncio.Future[list[Appended]]]] = []
        self._count = 0
        self._flusher: asyncio.Task[None] | None = None
        m = _metrics.active()
        self._series = m.topic(topic) if m is not None else None

    def submit(self, records: Sequence[Append]) -> asyncio.Future[list[Appended]]:
        """Queue ``records``; the future resolves to their acknowledgements."""
        fut: asyncio.Future[list[Appended]] = asyncio.get_running_loop().create_future()
        self._pending.append((records, fut))
        self._count += len(records)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return fut

    async def _flush(self) -> None:
        try:
            while self._pending:
                take, size = 0, 0
                while take < len(self._pending) and (size == 0 or size < MAX_BATCH):
                    size += len(self._pending[take][0])
                    take += 1
                group, self._pending = self._pending[:take], self._pending[take:]
                self._count -= size
                batch: list[Append] = []
                for records, _ in group:
                    batch.extend(records)
                try:
                    acks = await self._broker.append(self._topic, batch)
                except ShoalError as exc:
                    for _, fut in group:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                except Exception as exc:
                    err = PublishError(f"append to {self._topic!r} failed: {exc!r}")
                    for _, fut in group:
                        if not fut.done():
                            fut.set_exception(err)
                    continue
                if self._series is not None:
                    self._series.published += len(acks) - [a.duplicate for a in acks].count(True)
                pos = 0
                for records, fut in group:
                    n = len(records)
                    if not fut.done():
                        fut.set_result(acks[pos : pos + n])
                    pos += n
        finally:
            self._flusher = None

    async def drain(self) -> None:
        """Wait until everything queued so far is written."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
