"""The distributed broker: every partition of a topic a JetStream stream of its own.

Mapping (``NS`` is the URL's namespace, ``T`` the topic name escaped for NATS: ``_`` ->
``__``, ``.`` -> ``_d``, so the escape is reversible and no two topics collide):

* partition ``p`` of topic ``T`` is the stream ``NS-ev-T-p`` on the one subject
  ``NS.ev.T.p``. Offset = stream sequence - 1: a stream assigns gapless sequences in
  the order it stores messages, and one stream per partition keeps offsets gapless and
  stable per partition (a stream per topic would interleave partitions' sequences).
  Partition 0's stream carries the topic's spec in its description, and is created last,
  so a topic exists exactly when its partition 0 does.
* A record is the message payload ``msgpack [timestamp_ms, key, value]``.
* Retention maps to each stream's ``max_age`` (at least 100 ms, JetStream's floor) and
  ``max_bytes`` (per partition, as the contract says; JetStream counts subject and
  headers too, so the payload kept is a little less). The server enforces both on its
  own; ``apply_retention`` also purges by the records' timestamps, exactly as the other
  backends do.
* Deduplication is JetStream's: a record with a dedup id carries it as ``Nats-Msg-Id``
  and the stream's ``duplicate_window`` is the bus's window (capped at ``max_age``). The
  server checks and stores in one step and answers a duplicate with the original's
  sequence. The window is per stream, i.e. per partition: records of one key always meet
  there, and a keyless record with a dedup id is placed by its id (instead of round
  robin) so that its duplicates do too.
* Appends are pipelined (a ``BulkPublisher`` writes a batch's publishes as one buffer),
  one ack per record; each record is atomic
  and the records of one partition are stored in call order, but a batch as a whole is
  not atomic: an error may leave part of it appended (republishing with the same event
  ids then adds only the missing ones).
* Reads go through a ``PullReader`` per partition (ephemeral pull consumer, no-wait
  batches). Waiting for appends does not poll: each stream republishes a headers-only
  copy of every stored message to ``NS.evn.T.p``; a waiter subscribes to
  ``NS.evn.T.*``. A subscription that gets many notices while nobody waits (a consumer
  busy catching up) is dropped and made again at the next wait, so bulk reads pay nothing.

Durability: an ack means the message is stored by a quorum of the stream's replicas
(``?replicas=3``). JetStream writes to the OS at once but fsyncs its files on an interval
(``sync_interval``, default 2 minutes): an acknowledged append survives a crash of the
server process (kill -9), and of one node in three with replicas, but on a single node
not a power loss within the interval (set ``jetstream { sync_interval: always }`` in
nats-server's config for that, at a large cost in throughput).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from shoal.errors import PublishError, TopicError
from shoal.events.brokers.base import (
    Append,
    Appended,
    Broker,
    PartitionRange,
    Record,
    TopicSpec,
)
from shoal.events.partitioning import partition_for
from shoal.natsio import (
    REQUEST_TIMEOUT,
    BulkPublisher,
    NatsTarget,
    PullReader,
    SharedConnection,
    acquire,
    parse_nats_url,
    release,
    storage_type,
    stream_sequence,
)

try:
    import nats
    from nats.js.api import DiscardPolicy, RePublish, StreamConfig
except ImportError:  # pragma: no cover - parse_nats_url explains
    pass

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(tuple[int, str | None, bytes]).decode
MIN_MAX_AGE = 0.1  # JetStream refuses a shorter max_age
BUSY_NOTICES = 256  # notices with no waiter after which the wait subscription is dropped
_SPEC_TAG = "shoal-topic "
READERS_PER_PARTITION = 4
CREATE_ATTEMPTS = 3  # requests to create one partition's stream before giving up


def escape_topic(name: str) -> str:
    """The topic name as a NATS subject token and stream-name part (reversible)."""
    escaped = name.replace("_", "__").replace(".", "_d")
    if len(escaped) > 120:  # stream names become directory names: keep them short
        return "_x" + hashlib.sha256(name.encode()).hexdigest()[:40]
    return escaped


def _msg_id(dedup_id: str) -> str:
    """``dedup_id`` as a header value (printable ASCII kept, anything else hashed)."""
    if dedup_id.isascii() and dedup_id.isprintable() and len(dedup_id) <= 200:
        return dedup_id
    return "sha256:" + hashlib.sha256(dedup_id.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class _Topic:
    spec: TopicSpec
    streams: list[str]
    subjects: list[str]


@dataclass
class _Notices:
    """Append notices of one topic: a generation counter and who waits for it to move."""

    generation: int = 0
    sub: Any = None
    subscribing: asyncio.Future[None] | None = None
    unwaited: int = 0
    waiters: set[asyncio.Future[None]] = field(default_factory=set)

    def bump(self) -> None:
        self.generation += 1
        for fut in self.waiters:
            if not fut.done():
                fut.set_result(None)
        self.waiters.clear()


class NatsBroker(Broker):
    """Partitioned logs as JetStream streams (see the module docstring for the mapping)."""

    def __init__(self, target: NatsTarget, conn: SharedConnection) -> None:
        self.url = target.url
        self.target = target
        self._conn = conn
        self._js = conn.js
        self._topics: dict[str, _Topic] = {}
        self._readers: dict[tuple[str, int], list[PullReader]] = {}
        self._notices: dict[str, _Notices] = {}
        self._publisher = BulkPublisher(conn)
        self._closed = False
        conn.on_reconnect.add(self._wake_all)

    @classmethod
    async def open(cls, url: str) -> NatsBroker:
        """Connect to the servers of ``nats://...`` (shared with the process's store)."""
        target = parse_nats_url(url, "broker url")
        return cls(target, await acquire(target, "broker url"))

    # -- names -----------------------------------------------------------------------
    def _stream(self, topic: str, p: int) -> str:
        return f"{self.target.namespace}-ev-{escape_topic(topic)}-{p}"

    def _subject(self, topic: str, p: int, kind: str = "ev") -> str:
        return f"{self.target.namespace}.{kind}.{escape_topic(topic)}.{p}"

    def _config(self, spec: TopicSpec, p: int) -> StreamConfig:
        max_age = None
        if spec.retention_seconds is not None:
            max_age = max(MIN_MAX_AGE, spec.retention_seconds)
        window = max(self.dedup_window_seconds, 0.001)
        if max_age is not None:
            window = min(window, max_age)
        subject = self._subject(spec.name, p)
        description = None
        if p == 0:
            description = _SPEC_TAG + json.dumps(
                {"name": spec.name, "partitions": spec.partitions,
                 "retention_seconds": spec.retention_seconds,
                 "retention_bytes": spec.retention_bytes}, sort_keys=True)
        return StreamConfig(
            name=self._stream(spec.name, p), subjects=[subject], description=description,
            storage=storage_type(self.target), num_replicas=self.target.replicas,
            max_age=max_age, max_bytes=spec.retention_bytes or -1,
            discard=DiscardPolicy.OLD, duplicate_window=window, allow_direct=True,
            republish=RePublish(src=subject, dest=self._subject(spec.name, p, "evn"),
                                headers_only=True),
        )

    # -- topics ----------------------------------------------------------------------
    def _remember(self, spec: TopicSpec) -> _Topic:
        t = _Topic(
            spec,
            [self._stream(spec.name, p) for p in range(spec.partitions)],
            [self._subject(spec.name, p) for p in range(spec.partitions)],
        )
        self._topics[spec.name] = t
        return t

    async def create_topic(self, spec: TopicSpec) -> TopicSpec:
        existing = await self.get_topic(spec.name)
        if existing is None:
            # Partitions 1.. at once (a replicated stream takes a raft election each),
            # then partition 0: it means "the topic exists".
            await asyncio.gather(*(self._add_stream(spec, p) for p in range(1, spec.partitions)))
            await self._add_stream(spec, 0)
            existing = await self.get_topic(spec.name)
            if existing is None:  # pragma: no cover - a concurrent delete
                raise TopicError(f"topic {spec.name!r}: vanished while being created")
        if existing.partitions != spec.partitions:
            raise TopicError(
                f"topic {spec.name!r} exists with {existing.partitions} partitions, "
                f"not {spec.partitions}"
            )
        return existing

    async def _add_stream(self, spec: TopicSpec, p: int) -> None:
        try:
            for attempt in range(CREATE_ATTEMPTS):
                try:
                    await self._js.add_stream(self._config(spec, p))
                    break
                except (TimeoutError, nats.errors.TimeoutError):
                    # A replicated stream forms a raft group: on a loaded cluster that can
                    # outlast one request. Asking again is idempotent (same config).
                    if attempt == CREATE_ATTEMPTS - 1:
                        raise
        except nats.js.errors.APIError as exc:
            if exc.err_code != 10058:  # 10058: exists with another configuration
                raise TopicError(f"topic {spec.name!r}: cannot create partition {p} "
                                 f"on {self.url}: {exc.description}") from exc
            # else a concurrent creator won (with another spec: get_topic tells)
        except (TimeoutError, nats.errors.Error) as exc:
            raise TopicError(f"topic {spec.name!r}: cannot create partition {p} "
                             f"on {self.url}: {exc or type(exc).__name__}") from exc

    @staticmethod
    def _parse_spec(description: str | None) -> TopicSpec | None:
        if not description or not description.startswith(_SPEC_TAG):
            return None
        try:
            d = json.loads(description[len(_SPEC_TAG):])
            return TopicSpec(d["name"], int(d["partitions"]), d["retention_seconds"],
                             d["retention_bytes"])
        except (ValueError, KeyError, TypeError):
            return None

    async def get_topic(self, name: str) -> TopicSpec | None:
        cached = self._topics.get(name)
        if cached is not None:
            return cached.spec
        try:
            info = await self._js.stream_info(self._stream(name, 0))
        except nats.js.errors.NotFoundError:
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            raise self._failed(f"looking up topic {name!r}", exc) from exc
        spec = self._parse_spec(info.config.description)
        if spec is None or spec.name != name:
            return None
        self._remember(spec)
        return spec

    async def list_topics(self) -> list[TopicSpec]:
        prefix = f"{self.target.namespace}-ev-"
        specs, offset = [], 0
        while True:  # the server answers a page (256 streams) at a time
            try:
                page = await self._js.streams_info(offset=offset)
            except (TimeoutError, nats.errors.Error) as exc:
                raise self._failed("listing topics", exc) from exc
            if not page:
                break
            offset += len(page)
            for info in page:
                if info.config.name.startswith(prefix) and info.config.name.endswith("-0"):
                    spec = self._parse_spec(info.config.description)
                    if spec is not None and info.config.name == self._stream(spec.name, 0):
                        specs.append(spec)
        return sorted(specs, key=lambda s: s.name)

    async def _topic(self, name: str) -> _Topic:
        t = self._topics.get(name)
        if t is None:
            if await self.get_topic(name) is None:
                raise TopicError(f"topic {name!r} does not exist")
            t = self._topics[name]
        return t

    # -- the write path --------------------------------------------------------------
    async def append(self, topic: str, records: list[Append]) -> list[Appended]:
        t = await self._topic(topic)
        n = t.spec.partitions
        subjects = t.subjects
        dedup = self.dedup_window_seconds > 0
        placed: list[int] = []
        items: list[tuple[str, bytes, str | None]] = []
        for r in records:
            p, msg_id = r.partition, None
            if dedup and r.dedup_id is not None:
                if r.key is None:
                    p = partition_for(r.dedup_id, n)
                msg_id = _msg_id(r.dedup_id)
            placed.append(p)
            items.append((subjects[p], _encode((r.timestamp_ms, r.key, r.value)), msg_id))
        try:
            acks = await self._publisher.publish(items)
        except (TimeoutError, nats.errors.Error) as exc:
            raise PublishError(
                f"append to topic {topic!r} on {self.url} failed (some records may be "
                f"stored; republishing with the same event ids adds only the rest): "
                f"{exc or type(exc).__name__}"
            ) from exc
        finally:
            notices = self._notices.get(topic)
            if notices is not None:
                notices.bump()
        out = []
        for p, ack in zip(placed, acks, strict=True):
            if ack.error is not None:
                raise PublishError(f"append to topic {topic!r} partition {p} on {self.url} "
                                   f"refused: {ack.error.get('description', ack.error)}")
            out.append(Appended(p, ack.seq - 1, ack.duplicate))
        return out

    # -- the read path ---------------------------------------------------------------
    async def read(self, topic: str, partition: int, offset: int, limit: int) -> list[Record]:
        t = await self._topic(topic)
        reader = self._reader(t, partition, offset + 1)
        try:
            msgs = await reader.read(offset + 1, limit)
        except nats.js.errors.NotFoundError as exc:
            raise TopicError(f"topic {topic!r} partition {partition}: stream missing on "
                             f"{self.url}") from exc
        except (TimeoutError, nats.errors.Error) as exc:
            raise TopicError(f"read of topic {topic!r} partition {partition} on {self.url} "
                             f"failed: {exc or type(exc).__name__}") from exc
        out = []
        for m in msgs:
            ts, key, value = _decode(m.data)
            out.append(Record(partition, stream_sequence(m) - 1, ts, key, value))
        return out

    def _reader(self, t: _Topic, partition: int, seq: int) -> PullReader:
        """The partition's reader standing at ``seq``, else a new or least recently used one.

        Several groups of one process read a partition at different positions; a few
        readers each keep their consumer instead of repositioning one for every read.
        """
        readers = self._readers.setdefault((t.spec.name, partition), [])
        for i, reader in enumerate(readers):
            if reader.next_seq == seq:
                readers.append(readers.pop(i))  # most recently used last
                return reader
        if len(readers) < READERS_PER_PARTITION:
            readers.append(PullReader(self._conn, t.streams[partition]))
        else:
            readers.append(readers.pop(0))
        return readers[-1]

    async def _state(self, stream: str) -> Any:
        try:
            return (await self._js.stream_info(stream)).state
        except (TimeoutError, nats.errors.Error) as exc:  # NotFoundError too: a TopicError
            raise self._failed(f"reading the state of stream {stream}", exc) from exc

    def _failed(self, what: str, exc: BaseException) -> TopicError:
        """A NATS failure (e.g. a stream electing its leader) as the contract's error."""
        return TopicError(f"{what} on {self.url} failed: {exc or type(exc).__name__}")

    async def ranges(self, topic: str) -> list[PartitionRange]:
        t = await self._topic(topic)
        states = await asyncio.gather(*(self._state(s) for s in t.streams))
        return [PartitionRange(max(0, s.first_seq - 1), s.last_seq, s.bytes) for s in states]

    async def _timestamp(self, stream: str, seq: int) -> int:
        """The timestamp of message ``seq``; NotFoundError if it is not (or no longer) kept."""
        try:
            msg = await self._js.get_msg(stream, seq=seq, direct=True)
        except nats.js.errors.NotFoundError:
            raise
        except (TimeoutError, nats.errors.Error) as exc:
            raise self._failed(f"reading message {seq} of stream {stream}", exc) from exc
        return _decode(msg.data)[0]

    async def offset_for_time(self, topic: str, partition: int, timestamp_ms: int) -> int:
        """Binary search over the stored timestamps (a direct get per probe)."""
        t = await self._topic(topic)
        stream = t.streams[partition]
        state = await self._state(stream)
        lo, hi = state.first_seq, state.last_seq + 1  # answer in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            try:
                ts = await self._timestamp(stream, mid)
            except nats.js.errors.NotFoundError:  # trimmed meanwhile
                lo = mid + 1
                continue
            if ts >= timestamp_ms:
                hi = mid
            else:
                lo = mid + 1
        return lo - 1

    def _notices_for(self, topic: str) -> _Notices:
        notices = self._notices.get(topic)
        if notices is None:
            notices = self._notices[topic] = _Notices()
        return notices

    def append_generation(self, topic: str) -> int:
        return self._notices_for(topic).generation

    async def wait_for_append(self, topic: str, since: int, timeout: float) -> None:
        notices = self._notices_for(topic)
        if notices.generation != since or self._closed:
            return
        if notices.sub is None:
            # Not subscribed: an append may have come since ``since`` was read. Subscribe,
            # then answer "maybe" (the caller reads again, then waits on a live subscription).
            await self._subscribe(topic, notices)
            notices.bump()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        notices.waiters.add(fut)
        notices.unwaited = 0
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            pass
        finally:
            notices.waiters.discard(fut)

    async def _subscribe(self, topic: str, notices: _Notices) -> None:
        if notices.subscribing is not None:
            await asyncio.shield(notices.subscribing)
            return
        notices.subscribing = asyncio.get_running_loop().create_future()

        async def on_notice(_msg: Any) -> None:
            if notices.waiters:
                notices.unwaited = 0
            else:
                notices.unwaited += 1
                if notices.unwaited > BUSY_NOTICES and notices.sub is not None:
                    sub, notices.sub = notices.sub, None  # a busy reader: stop the notices
                    asyncio.get_running_loop().create_task(sub.unsubscribe())
            notices.bump()

        try:
            subject = f"{self.target.namespace}.evn.{escape_topic(topic)}.*"
            notices.sub = await self._conn.nc.subscribe(subject, cb=on_notice)
            await self._conn.nc.flush(REQUEST_TIMEOUT)
        finally:
            notices.subscribing.set_result(None)
            notices.subscribing = None

    def _wake_all(self) -> None:
        """After a reconnect notices may have been missed: everyone reads again."""
        for notices in self._notices.values():
            notices.bump()

    # -- retention -------------------------------------------------------------------
    async def apply_retention(self, topic: str) -> int:
        """Purge what is older than the retention age by the records' own timestamps.

        The size limit needs nothing here: a stream over ``max_bytes`` drops its oldest
        messages as it stores new ones.
        """
        t = await self._topic(topic)
        if t.spec.retention_seconds is None:
            return 0
        cutoff = int((time.time() - t.spec.retention_seconds) * 1000)
        removed = 0
        for p, stream in enumerate(t.streams):
            state = await self._state(stream)
            keep_from = await self.offset_for_time(topic, p, cutoff) + 1
            if keep_from > state.first_seq:
                try:
                    await self._js.purge_stream(stream, seq=keep_from)
                except (TimeoutError, nats.errors.Error) as exc:
                    raise self._failed(f"purging stream {stream}", exc) from exc
                removed += keep_from - state.first_seq
        return removed

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._conn.on_reconnect.discard(self._wake_all)
        for notices in self._notices.values():
            notices.bump()
            if notices.sub is not None:
                with contextlib.suppress(Exception):
                    await notices.sub.unsubscribe()
        for readers in self._readers.values():
            for reader in readers:
                await reader.close()
        self._readers.clear()
        await self._publisher.close()
        await release(self._conn)
