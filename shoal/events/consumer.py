"""Subscriptions: a group member's partition workers, handlers, retries and dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from shoal.errors import ShoalError
from shoal.events.event import Event, decode_record
from shoal.events.group import GroupMember, offset_key
from shoal.events.retry import Drop, RetryPolicy
from shoal.events.tracker import OffsetTracker
from shoal.observability import metrics as _metrics
from shoal.observability import tracing as _tracing

if TYPE_CHECKING:
    from shoal.events.brokers.base import Record
    from shoal.events.bus import EventBus

log = logging.getLogger("shoal.events.consumer")

T = TypeVar("T")
Handler = Callable[[Event], Awaitable[Any] | Any]
StartPosition = Literal["earliest", "latest"] | int | datetime

READ_BATCH = 1024
TAIL_BATCH = 64  # a worker that keeps up asks for little (brokers may read it inline)
COMMIT_INTERVAL = 0.1  # at most one commit per partition per interval; always on stop
IDLE_WAIT = 5.0
BACKEND_RETRY = 0.2  # pause before retrying a failed broker read or offset load


@dataclass
class SubscriptionStats:
    """Counters of what a subscription did with its events."""

    handled: int = 0
    retried: int = 0
    dead_lettered: int = 0
    dropped: int = 0
    partitions: set[int] = field(default_factory=set)


class Subscription:
    """One consumer-group member handling a topic's events with ``handler``.

    Per-key order: events of one partition are dispatched in offset order; with
    ``concurrency > 1`` events of different keys overlap, but an event waits for the
    previous event with the same key to finish (retries included).
    """

    def __init__(
        self,
        bus: EventBus,
        topic: str,
        group: str,
        handler: Handler,
        *,
        partitions: int,
        retry: RetryPolicy,
        concurrency: int,
        start: StartPosition,
        session_timeout: float,
        member: str,
    ) -> None:
        self.bus = bus
        self.topic = topic
        self.group = group
        self.handler = handler
        self.retry = retry
        self.concurrency = concurrency
        self.start_position = start
        self.stats = SubscriptionStats()
        m = _metrics.active()
        self._series = m.consumer(topic, group) if m is not None else None
        self._trace_parent: Any = None  # the last event's traceparent and its decision
        self._trace_carried: str | None = None
        self._is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - async callable objects
        )
        self._threads = (
            None if self._is_async else ThreadPoolExecutor(concurrency, "shoal-handler")
        )
        self._slots = asyncio.Semaphore(concurrency)
        self._workers: dict[int, _PartitionWorker] = {}
        self._key_tails: dict[str, asyncio.Future[None]] = {}
        self._rng = random.Random()
        self.member = GroupMember(
            bus.store, topic, group, member, partitions, session_timeout,
            self._start_partition, self._stop_partition,
        )
        self.ready = asyncio.Event()
        self._closing = False

    async def start(self) -> None:
        """Join the group and start handling the partitions it gives us."""
        await self.member.join()
        self.ready.set()

    async def _start_partition(self, p: int) -> None:
        worker = _PartitionWorker(self, p)
        self._workers[p] = worker
        self.stats.partitions.add(p)
        worker.task = asyncio.create_task(worker.run())

    async def _stop_partition(self, p: int) -> None:
        worker = self._workers.pop(p, None)
        self.stats.partitions.discard(p)
        if worker is not None:
            await worker.stop()

    async def close(self) -> None:
        """Finish what is in flight, commit, and leave the group."""
        self._closing = True
        await self.member.leave()
        if self._threads is not None:
            self._threads.shutdown(wait=False)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- handling one event ----------------------------------------------------------
    async def _call(self, event: Event) -> Any:
        if self._is_async:
            return await self.handler(event)  # type: ignore[misc]
        loop = asyncio.get_running_loop()
        call = contextvars.copy_context().run  # the handler's thread sees the current span
        return await loop.run_in_executor(self._threads, call, self.handler, event)

    async def _traced_call(self, record: Record, event: Event) -> Any:
        with _tracing.consumer_span(self.topic, self.group, event, record.partition,
                                    record.offset):
            return await self._call(event)

    async def handle(self, record: Record, event: Event, counted: bool = True) -> bool:
        """Run the handler with retries; dead-letter or drop as it says. Never raises.
        True when the handler succeeded; ``counted=False``: its success is counted by the
        caller (a partition worker counts a read batch at once)."""
        attempt = 0
        series = self._series if counted else None
        recorded = False
        if _tracing.tracer is not None:  # decided once for every try of the event
            parent = event.extensions.get("traceparent")
            if parent is None or parent != self._trace_parent:  # a batch shares its parent
                self._trace_parent = parent
                self._trace_carried = _tracing.unsampled(parent)
            carried = self._trace_carried
            _tracing.carry(carried)  # in the worker's (or this event's) task context
            recorded = carried is None  # else no span: the event's trace is carried on
        while True:
            attempt += 1
            try:
                if recorded:
                    await self._traced_call(record, event)
                else:
                    await self._call(event)
                self.stats.handled += 1
                if series is not None:
                    series.success += 1
                    series.latency.observe(time.time() - record.timestamp_ms / 1000)
                return True
            except Drop as exc:
                self.stats.dropped += 1
                if self._series is not None:
                    self._series.drop += 1
                log.info("dropped %s/%s@%s: %s", self.topic, record.partition, record.offset, exc)
                return False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if attempt >= self.retry.attempts:
                    await self._dead_letter(record, event, exc, attempt)
                    if self._series is not None:
                        self._series.dead_letter += 1
                    return False
                self.stats.retried += 1
                if self._series is not None:
                    self._series.retry += 1
                await asyncio.sleep(self.retry.backoff(attempt, self._rng))

    async def _dead_letter(
        self, record: Record, event: Event, exc: Exception, attempts: int
    ) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:1000]
        extensions = dict(event.extensions)
        extensions.update(
            dlqreason=reason, dlqattempts=attempts, dlqtopic=self.topic,
            dlqpartition=record.partition, dlqoffset=record.offset, dlqgroup=self.group,
        )
        dead = Event(
            id=f"{event.id}.dlq.{self.group}", source=event.source, type=event.type,
            datacontenttype=event.datacontenttype, dataschema=event.dataschema,
            subject=event.subject, time=event.time, data=event.data, extensions=extensions,
        )
        dedup = f"{self.group}/{self.topic}/{record.partition}/{record.offset}"
        while True:  # until it lands: the event is committed only once dead-lettered
            try:
                await self.bus.publish_event(f"{self.topic}.dlq", dead, dedup_id=dedup)
                break
            except ShoalError as exc:  # e.g. the broker electing a leader; the dedup id
                if self._closing:  # makes a retry idempotent. Closing: redelivered later
                    raise
                log.warning("dead-lettering %s/%s@%s failed, retrying: %s",
                            self.topic, record.partition, record.offset, exc)
                await asyncio.sleep(BACKEND_RETRY)
        self.stats.dead_lettered += 1
        log.warning(
            "dead-lettered %s/%s@%s after %d attempts: %s",
            self.topic, record.partition, record.offset, attempts, reason,
        )


class _PartitionWorker:
    """Reads one owned partition from the committed offset and dispatches it in order."""

    def __init__(self, sub: Subscription, partition: int) -> None:
        self.sub = sub
        self.p = partition
        self.task: asyncio.Task[None] | None = None
        self.stopping = False
        self.waiting = False  # in a wait stop() may cut short (see _cancellable)
        self.tracker: OffsetTracker | None = None
        self.revision = 0
        self.committed = -1
        self._inflight: set[asyncio.Task[None]] = set()
        self._committing: asyncio.Task[bool] | None = None
        self._commit_timer: asyncio.TimerHandle | None = None
        self._wake: asyncio.Future[None] | None = None
        self._last_commit = 0.0
        self.moved = False  # our committed offset was changed by someone else
        self._key = offset_key(sub.topic, sub.group, partition)
        # With one event at a time, successes are counted per read batch, not per event.
        self._batched = sub._series if sub.concurrency == 1 else None

    async def _initial_offset(self) -> int:
        sub, store = self.sub, self.sub.bus.store
        entry = await store.get(self._key)
        if entry is not None:
            self.revision = entry.revision
            self.committed = int(entry.value)
            return self.committed
        broker = sub.bus.broker
        rng = (await broker.ranges(sub.topic))[self.p]
        start = sub.start_position
        if start == "earliest":
            offset = rng.start
        elif start == "latest":
            offset = rng.end
        elif isinstance(start, datetime):
            offset = await broker.offset_for_time(
                sub.topic, self.p, int(start.timestamp() * 1000)
            )
        else:
            offset = min(max(int(start), rng.start), rng.end)
        await self._commit(offset)
        return offset

    async def _commit(self, offset: int) -> bool:
        """Commit ``offset`` fenced on the revision we last saw; False if someone moved it."""
        if offset == self.committed:
            return True
        rev = await self.sub.bus.store.cas(
            self._key, str(offset).encode(), expected_revision=self.revision
        )
        if rev is None:
            log.warning(
                "offset of %s/%s for group %s was moved by another writer (seek or new owner);"
                " reloading", self.sub.topic, self.p, self.sub.group,
            )
            return False
        self.revision, self.committed = rev, offset
        return True

    def _commit_later(self, tracker: OffsetTracker, last_commit: float) -> None:
        """Commit now if the interval has passed, else once it has (one timer at a time)."""
        wait = COMMIT_INTERVAL - (time.monotonic() - last_commit)
        if wait <= 0:
            self._commit_in_background(tracker.committable)
        elif self._commit_timer is None:

            def fire() -> None:
                self._commit_timer = None
                if not self.stopping:
                    self._commit_in_background(tracker.committable)

            self._commit_timer = asyncio.get_running_loop().call_later(wait, fire)

    def _commit_in_background(self, offset: int) -> None:
        """Commit without stalling dispatch; at most one commit in flight per partition."""
        if self._committing is not None or offset == self.committed:
            return
        self._last_commit = time.monotonic()

        def done(task: asyncio.Task[bool]) -> None:
            self._committing = None
            if task.cancelled() or task.exception() is not None or not task.result():
                self.moved = True
                if self._wake is not None and not self._wake.done():
                    self._wake.set_result(None)

        self._committing = asyncio.create_task(self._commit(offset))
        self._committing.add_done_callback(done)

    async def _commit_now(self, offset: int) -> bool:
        if self._committing is not None:
            with contextlib.suppress(Exception):
                await self._committing
        return not self.moved and await self._commit(offset)

    async def _idle_wait(self, generation: int) -> None:
        """Wait for an append, or for a background commit to fail (seek, new owner)."""
        self._wake = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(
            self.sub.bus.broker.wait_for_append(self.sub.topic, generation, IDLE_WAIT)
        )
        try:
            await asyncio.wait((waiting, self._wake), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            self._wake = None

    async def run(self) -> None:
        """Read and dispatch until stopped. A failure none of the paths below expects (a
        bug, a record that cannot be decoded) restarts from the committed offset instead
        of ending the worker: a dead worker would leave its partition unread for good."""
        while not self.stopping:
            try:
                await self._run()
            except Exception:
                log.exception("partition %s/%s: worker failed; restarting from the committed "
                              "offset", self.sub.topic, self.p)
                await asyncio.sleep(BACKEND_RETRY)

    async def _run(self) -> None:
        sub, broker = self.sub, self.sub.bus.broker
        topic = sub.topic
        try:
            while not self.stopping:
                await self._drain()
                if self._committing is not None:
                    with contextlib.suppress(Exception):
                        await self._committing
                self.moved = False
                try:
                    offset = await self._initial_offset()
                except ShoalError as exc:  # a store or broker briefly away: try again
                    log.warning("partition %s/%s: cannot load the offset: %s",
                                topic, self.p, exc)
                    await self._cancellable(asyncio.sleep(BACKEND_RETRY))
                    continue
                self.tracker = tracker = OffsetTracker(offset)
                last_commit = self._last_commit = time.monotonic()
                limit = READ_BATCH
                while not self.stopping and not self.moved:
                    gen = broker.append_generation(topic)
                    try:
                        records = await self._cancellable(
                            broker.read(topic, self.p, offset, limit))
                    except ShoalError as exc:  # e.g. a server restarting: read again soon
                        log.warning("partition %s/%s: read failed: %s", topic, self.p, exc)
                        await self._cancellable(asyncio.sleep(BACKEND_RETRY))
                        continue
                    limit = TAIL_BATCH if len(records) < TAIL_BATCH else READ_BATCH
                    if not records:
                        await self._drain()
                        if self.stopping:  # stop() came while we drained
                            break
                        # Commit what is handled without waiting for the store (a slow
                        # store write must not delay the next event), and no more often
                        # than COMMIT_INTERVAL: a consumer that keeps up goes idle after
                        # nearly every event.
                        self._commit_later(tracker, last_commit)
                        await self._cancellable(self._idle_wait(gen))
                        continue
                    handled, failed = 0, None
                    for record in records:
                        if self.stopping:
                            break
                        if not await self._dispatch(record, tracker):
                            failed = [*(failed or ()), handled]
                        handled += 1
                        offset = record.offset + 1
                    if self._batched is not None and handled:  # successes, once a batch
                        self._batched.handled(records, handled, failed, time.time())
                    if time.monotonic() - last_commit >= COMMIT_INTERVAL:
                        self._commit_in_background(tracker.committable)
                    last_commit = self._last_commit
        except asyncio.CancelledError:
            if not self.stopping:
                raise
        finally:
            if self._commit_timer is not None:
                self._commit_timer.cancel()
                self._commit_timer = None
            await self._drain()
            if self.tracker is not None:
                with contextlib.suppress(Exception):
                    await self._commit_now(self.tracker.committable)

    async def _dispatch(self, record: Record, tracker: OffsetTracker) -> bool:
        """Handle (or, with concurrency, start handling) one record; False if it was
        handled here and did not succeed."""
        sub = self.sub
        event = decode_record(record.value)
        tracker.dispatched(record.offset)
        if sub.concurrency == 1:
            async with sub._slots:
                ok = await sub.handle(record, event, self._batched is None)
            tracker.handled(record.offset)
            return ok
        await sub._slots.acquire()
        key = record.key
        previous = sub._key_tails.get(key) if key is not None else None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if key is not None:
            sub._key_tails[key] = done

        async def handle() -> None:
            handled = False
            try:
                if previous is not None:
                    await previous
                await sub.handle(record, event)
                handled = True
            finally:
                sub._slots.release()
                if handled:  # else (not dead-lettered as the bus closed) never committed
                    tracker.handled(record.offset)
                done.set_result(None)
                if key is not None and sub._key_tails.get(key) is done:
                    del sub._key_tails[key]

        task = asyncio.create_task(handle())
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return True

    async def _cancellable(self, step: Awaitable[T]) -> T:
        """Await ``step`` where ``stop()`` may cancel it, so that stopping (on a lost lease
        or a rebalance) does not wait out a read retrying through a leader election or an
        idle wait. Only steps that lose nothing when cut short: a read whose records are
        not dispatched yet, a wait, a pause. No await comes between the caller's check of
        ``stopping`` and this, so a stop either sees ``waiting`` or is seen by the caller.
        """
        self.waiting = True
        try:
            return await step
        finally:
            self.waiting = False

    async def _drain(self) -> None:
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    async def stop(self) -> None:
        """Stop reading, finish in-flight events, commit."""
        self.stopping = True
        if self.task is None:
            return
        if self.waiting:
            self.task.cancel()
        try:
            # Shielded: cancelling the stop must not cancel the worker, which (stopping)
            # would swallow it and return, so that the caller's cancellation were lost.
            await asyncio.shield(self.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self.task.cancelled() or (current is not None and current.cancelling()):
                raise  # we were cancelled, not (only) the worker
