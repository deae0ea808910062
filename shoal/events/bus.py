"""`EventBus`: publish and subscribe to durable, partitioned topics on any broker."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import time
from collections.abc import AsyncIterator, Coroutine, Generator, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from shoal.errors import ConfigError, InvalidEvent, TopicError
from shoal.events.brokers.base import Append, Appended, Broker, PartitionRange, TopicSpec
from shoal.events.brokers.connect import DEFAULT_BROKER_URL, connect_broker
from shoal.events.codec import check_extensions
from shoal.events.consumer import Handler, StartPosition, Subscription
from shoal.events.event import Event, encode_record, new_event_id
from shoal.events.group import GROUPS, group_prefix, offset_key
from shoal.events.partitioning import check_group_name, check_topic_name, partition_for
from shoal.events.publisher import AppendQueue
from shoal.events.retry import RetryPolicy
from shoal.observability import tracing as _tracing
from shoal.store.base import Store
from shoal.store.connect import connect_store
from shoal.units import parse_duration, parse_size

if TYPE_CHECKING:  # shoal.mesh imports the bus: the policy module is loaded on use
    from shoal.mesh.security.topics import TopicGuard, TopicPolicy

DEFAULT_PARTITIONS = 8



class _Traced(dict[str, Any]):
    """The ``traceparent`` extension the tracing hooks add to a batch's events: well-formed
    by construction, so ``_prepare`` copies it instead of checking it again per event."""

class PublishAck(msgspec.Struct, frozen=True, gc=False):
    """Where a published event went: topic, partition, offset, and whether it was a duplicate."""

    topic: str
    partition: int
    offset: int
    duplicate: bool
    id: str


@dataclass(frozen=True, slots=True)
class Message:
    """One event to publish with ``publish_many``."""

    data: Any = None
    key: str | None = None
    type: str | None = None
    id: str | None = None
    extensions: Mapping[str, str | int | bool] | None = None


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """A topic's spec with its partitions' offset ranges."""

    spec: TopicSpec
    ranges: list[PartitionRange]

    @property
    def events(self) -> int:
        """Events currently kept, over all partitions."""
        return sum(r.end - r.start for r in self.ranges)

    @property
    def size_bytes(self) -> int:
        """Bytes currently kept, over all partitions."""
        return sum(r.size_bytes for r in self.ranges)


class EventBus:
    """The event bus: ``await EventBus.connect(url)``, then publish and subscribe.

    Topics are partitioned logs; an event's partition is a stable hash of its key, so
    events with one key stay in order for every consumer group. Group state (membership,
    partition ownership, committed offsets) lives in the Store.
    """

    def __init__(self, broker: Broker, store: Store, *, source: str, owns_store: bool) -> None:
        self.broker = broker
        self.store = store
        self.source = source
        self._owns_store = owns_store
        self._topics: dict[str, TopicSpec] = {}
        self._queues: dict[str, AppendQueue] = {}
        self._subscriptions: list[Subscription] = []
        self._round_robin = itertools.count()
        self._member_ids = itertools.count()
        self._closed = False
        self.topic_guard: TopicGuard | None = None  # who this client is, what it may do

    @classmethod
    def connect(
        cls,
        url: str | None = None,
        *,
        store: str | Store | None = None,
        source: str | None = None,
        dedup_window: str | float = "2m",
        fsync: bool = False,
        topic_policy: TopicPolicy | None = None,
        identity: str | None = None,
    ) -> _Connecting:
        """Open the bus at ``url`` (default ``sqlite:///.shoal/events.db``).

        Use ``bus = await EventBus.connect(url)`` or ``async with EventBus.connect(url) as
        bus:``. ``store`` is the coordination Store (URL or object); by default a
        ``memory://`` bus uses an in-process store and ``sqlite:///DIR/events.db`` uses
        ``sqlite:///DIR/store.db`` beside it. ``fsync=True`` makes an acknowledged publish
        survive power loss too, not only a crash of any process (the SQLite broker's
        ``?fsync=1``; see the README for what it costs). With ``topic_policy``, this client
        (``identity``: its SPIFFE id) may publish and subscribe only where the policy says.
        """
        if fsync:
            url = url or os.environ.get("SHOAL_BROKER") or DEFAULT_BROKER_URL
            url += ("&" if "?" in url else "?") + "fsync=1"
        opening = cls._open(url, store, source, dedup_window)
        if topic_policy is not None:
            from shoal.mesh.security.topics import TopicGuard

            opening = _guarded(opening, TopicGuard(topic_policy, identity))
        return _Connecting(opening)

    @classmethod
    async def _open(
        cls,
        url: str | None,
        store: str | Store | None,
        source: str | None,
        dedup_window: str | float,
    ) -> EventBus:
        url = url or os.environ.get("SHOAL_BROKER") or DEFAULT_BROKER_URL
        broker = await connect_broker(url)
        broker.dedup_window_seconds = parse_duration(dedup_window, name="dedup_window") or 0.0
        owns_store = not isinstance(store, Store)
        if not isinstance(store, Store):
            store_url = store or os.environ.get("SHOAL_STORE") or default_store_for(url)
            try:
                store = await connect_store(store_url)
            except BaseException:
                await broker.close()
                raise
        return cls(
            broker, store, source=source or f"/shoal/{socket.gethostname()}",
            owns_store=owns_store,
        )

    async def __aenter__(self) -> EventBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- topics ----------------------------------------------------------------------
    async def create_topic(
        self,
        name: str,
        partitions: int = DEFAULT_PARTITIONS,
        *,
        retention: str | float | None = None,
        retention_bytes: str | int | None = None,
    ) -> TopicSpec:
        """Create a topic (idempotent when the partition count matches)."""
        check_topic_name(name)
        if not isinstance(partitions, int) or not 1 <= partitions <= 4096:
            raise TopicError(f"topic {name!r}: partitions must be 1..4096, got {partitions!r}")
        spec = TopicSpec(
            name,
            partitions,
            parse_duration(retention, name="retention"),
            parse_size(retention_bytes, name="retention_bytes"),
        )
        spec = await self.broker.create_topic(spec)
        self._topics[name] = spec
        return spec

    async def _spec(self, topic: str, *, create: bool = True) -> TopicSpec:
        spec = self._topics.get(topic)
        if spec is None:
            check_topic_name(topic)
            spec = await self.broker.get_topic(topic)
            if spec is None:
                if not create:
                    raise TopicError(f"topic {topic!r} does not exist")
                if self.topic_guard is not None:
                    self.topic_guard.check_create(topic)
                spec = await self.broker.create_topic(TopicSpec(topic, DEFAULT_PARTITIONS))
            self._topics[topic] = spec
        return spec

    async def topics(self) -> list[TopicInfo]:
        """Every topic with its partitions' offsets and sizes."""
        return [
            TopicInfo(spec, await self.broker.ranges(spec.name))
            for spec in await self.broker.list_topics()
        ]

    # -- publishing ------------------------------------------------------------------
    def _prepare(
        self,
        spec: TopicSpec,
        data: Any,
        key: str | None,
        type: str | None,
        id: str | None,
        extensions: Mapping[str, Any] | None,
        when: datetime,
        ts_ms: int,
    ) -> tuple[Event, Append]:
        """Validate, build the envelope, and place it: the one path every publish takes."""
        if not extensions:
            ext = {}
        elif extensions.__class__ is _Traced:  # made by the tracing hooks: valid as it is
            ext = dict(extensions)
        else:
            ext = check_extensions(extensions)
        if key is None:
            partition = next(self._round_robin) % spec.partitions
        elif isinstance(key, str):
            ext["partitionkey"] = key
            partition = partition_for(key, spec.partitions)
        else:
            kind = key.__class__.__name__
            raise InvalidEvent("partitionkey", f"key must be a string, not {kind}")
        if id is not None and (not isinstance(id, str) or not id):
            raise InvalidEvent("id", "must be a non-empty string")
        event = Event(
            id=id or new_event_id(), source=self.source, type=type or spec.name, time=when,
            data=data, extensions=ext,
        )
        return event, Append(partition, key, ts_ms, encode_record(event), id)

    def _place(self, spec: TopicSpec, event: Event, ts_ms: int, dedup_id: str | None) -> Append:
        """The append for an envelope built elsewhere (relayed, replayed, dead-lettered)."""
        key = event.extensions.get("partitionkey")
        if key is None:
            partition = next(self._round_robin) % spec.partitions
        else:
            key = str(key)
            partition = partition_for(key, spec.partitions)
        return Append(partition, key, ts_ms, encode_record(event), dedup_id)

    def _queue(self, topic: str) -> AppendQueue:
        if self.topic_guard is not None:  # every publish path passes here before appending
            self.topic_guard.check("publish", topic)
        queue = self._queues.get(topic)
        if queue is None:
            queue = self._queues[topic] = AppendQueue(self.broker, topic)
        return queue

    async def publish(
        self,
        topic: str,
        data: Any = None,
        *,
        key: str | None = None,
        type: str | None = None,
        id: str | None = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> PublishAck:
        """Append one event; returns once it is durable. A repeated ``id`` is not re-added."""
        if _tracing.tracer is not None:  # a producer span; its context travels in the event
            given = extensions.get("traceparent") if extensions else None
            carried = _tracing.unsampled_here() if given is None else _tracing.unsampled(given)
            if carried is None:
                with _tracing.producer_scope(topic, given) as scope:
                    traced = {**(extensions or {}), "traceparent": scope.traceparent}
                    return await self._publish(topic, data, key, type, id, traced)
            if carried is not given:  # unrecorded: no span, the trace goes on in the event
                extensions = {**extensions, "traceparent": carried} if extensions else \
                    _Traced(traceparent=carried)
        return await self._publish(topic, data, key, type, id, extensions)

    async def _publish(
        self,
        topic: str,
        data: Any,
        key: str | None,
        type: str | None,
        id: str | None,
        extensions: Mapping[str, Any] | None,
    ) -> PublishAck:
        spec = self._topics.get(topic) or await self._spec(topic)
        t = time.time()
        event, append = self._prepare(
            spec, data, key, type, id, extensions, datetime.fromtimestamp(t, UTC), int(t * 1000)
        )
        (ack,) = await self._queue(topic).submit([append])
        return PublishAck(topic, ack.partition, ack.offset, ack.duplicate, event.id)

    async def publish_many(self, topic: str, messages: Iterable[Message | Any]) -> list[PublishAck]:
        """Append many events in one batch; each item is a ``Message`` or plain data."""
        if _tracing.tracer is not None:  # one producer span for the batch
            carried = _tracing.unsampled_here()
            if carried is None:
                with _tracing.producer_scope(topic) as scope:
                    return await self._publish_many(topic, messages, scope.traceparent)
            return await self._publish_many(topic, messages, carried)
        return await self._publish_many(topic, messages)

    async def _publish_many(self, topic: str, messages: Iterable[Message | Any],
                            traceparent: str | None = None) -> list[PublishAck]:
        spec = self._topics.get(topic) or await self._spec(topic)
        t = time.time()
        when, ts_ms = datetime.fromtimestamp(t, UTC), int(t * 1000)
        events, appends = [], []
        prepare = self._prepare
        traced = None if traceparent is None else _Traced(traceparent=traceparent)
        for m in messages:
            if isinstance(m, Message):
                ext = m.extensions
                if traced is not None and not (ext and "traceparent" in ext):
                    ext = {**ext, **traced} if ext else traced
                event, append = prepare(spec, m.data, m.key, m.type, m.id, ext, when, ts_ms)
            else:
                event, append = prepare(spec, m, None, None, None, traced, when, ts_ms)
            events.append(event)
            appends.append(append)
        if not appends:
            return []
        acks = await self._queue(topic).submit(appends)
        return [
            PublishAck(topic, a.partition, a.offset, a.duplicate, e.id)
            for a, e in zip(acks, events, strict=True)
        ]

    async def publish_event(
        self, topic: str, event: Event, *, dedup_id: str | None = None
    ) -> PublishAck:
        """Append a complete CloudEvent as it is (the HTTP binding, replays, dead letters).

        Deduplicates on ``dedup_id`` (default: none, since a relayed event's id is the
        producer's and may legitimately repeat across sources).
        """
        spec = self._topics.get(topic) or await self._spec(topic)
        ts_ms = int(time.time() * 1000)  # when it entered this log (retention, seek by time)
        ack: Appended
        (ack,) = await self._queue(topic).submit([self._place(spec, event, ts_ms, dedup_id)])
        return PublishAck(topic, ack.partition, ack.offset, ack.duplicate, event.id)

    # -- consuming -------------------------------------------------------------------
    async def subscribe(
        self,
        topic: str,
        group: str,
        handler: Handler,
        *,
        retry: RetryPolicy | None = None,
        concurrency: int = 1,
        start: StartPosition = "earliest",
        session_timeout: str | float = "10s",
    ) -> Subscription:
        """Handle ``topic``'s events as a member of ``group``; returns the running subscription.

        Members of one group share the partitions; every group gets every event. A
        handler that raises is retried per ``retry`` and then dead-lettered to
        ``<topic>.dlq``; raising ``Drop`` drops the event on purpose.
        """
        check_group_name(group)
        if self.topic_guard is not None:
            self.topic_guard.check("subscribe", topic)
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be a positive integer, got {concurrency!r}")
        spec = await self._spec(topic)
        if not topic.endswith(".dlq"):
            await self._spec(f"{topic}.dlq")
        sub = Subscription(
            self, topic, group, handler,
            partitions=spec.partitions,
            retry=retry or RetryPolicy(),
            concurrency=concurrency,
            start=start,
            session_timeout=parse_duration(session_timeout, name="session_timeout") or 10.0,
            member=f"{socket.gethostname()}-{os.getpid()}-{id(self):x}-{next(self._member_ids)}",
        )
        await sub.start()
        self._subscriptions.append(sub)
        return sub

    def consume(
        self,
        topic: str,
        group: str,
        *,
        start: StartPosition = "earliest",
        session_timeout: str | float = "10s",
    ) -> EventStream:
        """Pull events: ``async with bus.consume(topic, group) as events: async for e in events``.

        An event counts as handled when the next one is asked for, or when the block
        ends without an exception, so a crash mid-event redelivers it. (A bare ``async
        for`` works too; after a ``break`` the group is left when the iterator is
        garbage-collected rather than at once.)
        """
        if self.topic_guard is not None:
            self.topic_guard.check("subscribe", topic)
        outcome = _StreamOutcome()
        return EventStream(self._pull(topic, group, start, session_timeout, outcome), outcome)

    async def _pull(
        self,
        topic: str,
        group: str,
        start: StartPosition,
        session_timeout: str | float,
        outcome: _StreamOutcome,
    ) -> AsyncIterator[Event]:
        handoff: asyncio.Queue[Event] = asyncio.Queue(maxsize=1)
        taken: asyncio.Queue[bool] = asyncio.Queue(maxsize=1)  # True: handled
        closing = False

        async def handler(event: Event) -> None:
            if closing:  # nobody will take it: stop here, leaving it uncommitted
                raise asyncio.CancelledError
            await handoff.put(event)
            if not await taken.get():
                raise asyncio.CancelledError  # the reader failed on it: redeliver later

        sub = await self.subscribe(
            topic, group, handler, retry=RetryPolicy(attempts=1), start=start,
            session_timeout=session_timeout,
        )
        pending = False
        try:
            while True:
                if pending:
                    taken.put_nowait(True)
                    pending = False
                event = await handoff.get()
                pending = True
                yield event
        finally:
            closing = True
            if pending:
                with contextlib.suppress(asyncio.QueueFull):
                    taken.put_nowait(not outcome.failed)
            await self._unsubscribe(sub)

    async def _unsubscribe(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(sub)
        await sub.close()

    async def committed(self, topic: str, group: str) -> dict[int, int]:
        """The group's committed offset per partition (partitions never committed omitted)."""
        prefix = f"{group_prefix(topic, group)}offsets/"
        return {
            int(e.key.rsplit("/", 1)[1]): int(e.value) for e in await self.store.list(prefix)
        }

    async def groups(self, topic: str) -> list[str]:
        """Every consumer group that has state for ``topic``."""
        names = {
            e.key[len(f"{GROUPS}/{topic}/") :].split("/", 1)[0]
            for e in await self.store.list(f"{GROUPS}/{topic}/")
        }
        return sorted(names)

    async def lag(self, topic: str, group: str) -> dict[int, int]:
        """Events not yet handled by ``group``, per partition."""
        ranges = await self.broker.ranges(topic)
        committed = await self.committed(topic, group)
        return {
            p: r.end - max(committed.get(p, r.start), r.start) for p, r in enumerate(ranges)
        }

    async def seek(self, topic: str, group: str, position: StartPosition) -> dict[int, int]:
        """Move ``group``'s committed offsets (replay or skip); live members follow it."""
        spec = await self._spec(topic, create=False)
        ranges = await self.broker.ranges(topic)
        moved: dict[int, int] = {}
        for p, r in enumerate(ranges[: spec.partitions]):
            if position == "earliest":
                offset = r.start
            elif position == "latest":
                offset = r.end
            elif isinstance(position, datetime):
                offset = await self.broker.offset_for_time(
                    topic, p, int(position.timestamp() * 1000)
                )
            else:
                offset = min(max(int(position), r.start), r.end)
            await self.store.put(offset_key(topic, group, p), str(offset).encode())
            moved[p] = offset
        return moved

    async def apply_retention(self) -> int:
        """Trim every topic to its retention now; returns how many events went."""
        specs = await self.broker.list_topics()
        return sum([await self.broker.apply_retention(s.name) for s in specs])

    # -- lifecycle -------------------------------------------------------------------
    async def flush(self) -> None:
        """Wait until every publish issued so far is durable."""
        for queue in list(self._queues.values()):
            await queue.drain()

    async def close(self) -> None:
        """Finish in-flight handlers, commit, leave groups, flush, and close connections."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subscriptions):
            await sub.close()
        self._subscriptions.clear()
        await self.flush()
        await self.broker.close()
        if self._owns_store:
            await self.store.close()


class EventStream:
    """What ``EventBus.consume`` returns: an async iterator of events, best used as an
    async context manager so that leaving the block commits and leaves the group at once.

    Leaving the block with an exception leaves the current event unacknowledged, so the
    group gets it again.
    """

    def __init__(self, events: AsyncIterator[Event], outcome: _StreamOutcome) -> None:
        self._events = events
        self._outcome = outcome  # shared with the generator, which must not hold us

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Acknowledge the current event (unless the block failed), commit, leave the group."""
        await self._events.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._outcome.failed = exc_type is not None
        await self.aclose()


class _StreamOutcome:
    """Whether the block reading an ``EventStream`` failed (read when it closes)."""

    failed = False


class _Connecting:
    """What ``EventBus.connect`` returns: awaitable, and an async context manager."""

    def __init__(self, opening: Coroutine[Any, Any, EventBus]) -> None:
        self._opening = opening
        self._bus: EventBus | None = None

    def __await__(self) -> Generator[Any, None, EventBus]:
        return self._opening.__await__()

    async def __aenter__(self) -> EventBus:
        self._bus = await self._opening
        return self._bus

    async def __aexit__(self, *exc: object) -> None:
        if self._bus is not None:
            await self._bus.close()


async def _guarded(opening: Coroutine[Any, Any, EventBus], guard: TopicGuard) -> EventBus:
    bus = await opening
    bus.topic_guard = guard
    return bus


def default_store_for(broker_url: str) -> str:
    """The Store URL that goes with a broker URL when none is given."""
    if broker_url.startswith(("memory://", "nats://", "redis://")):
        return broker_url  # the same server (and namespace or prefix) holds the store
    if broker_url.startswith("sqlite:///"):
        path = broker_url[len("sqlite:///") :].split("?", 1)[0]
        head, _, _ = path.rpartition("/")
        return f"sqlite:///{head + '/' if head else ''}store.db"
    return "sqlite:///.shoal/store.db"

