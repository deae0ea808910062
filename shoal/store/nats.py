"""The distributed Store: keys in one JetStream stream, the way JetStream KV keeps them.

Why a stream and not nats-py's KV API: the contract needs a watch from any revision and a
compaction error, arbitrary Unicode keys, and prefix scans on ``/``; a bucket's stream
used directly gives all of it with the same server-side machinery (KV is this stream
shape plus a client library).

Layout (``NS`` is the URL's namespace):

* ``NS-kv`` on subjects ``NS.kv.<token>``: one subject per key, ``token`` the base64url
  SHA-256 of the key (any key fits a subject; the key itself is in the payload). A
  message is ``msgpack [key, value, lease]``; ``value`` nil is a delete marker. The store
  revision is the stream sequence: one counter for every write, never reused.
  ``max_msgs_per_subject`` = ``history`` keeps each key's last writes for watch replay;
  JetStream removes older ones, which a watcher sees as a gap in the sequence (a watch
  reads every subject, so a gap can only be compaction) and answers with the contract's
  "fell behind" ``StoreError``.
* ``cas`` is a publish with ``Nats-Expected-Last-Subject-Sequence`` (JetStream checks
  and stores in one step); "absent" (0) also matches a key whose last message is a
  delete marker, by retrying against the marker's sequence.
* Leases: the server is nats-server 2.9 here, without per-message TTLs (2.11), so leases
  are records in ``NS-lease`` (subject ``NS.lease.<id>``, ``msgpack [ttl, expires_at]``
  with wall-clock expiry, one message kept per lease). Keepalive republishes the record
  fenced on its last sequence; revoke writes a nil record. Every store client follows
  the lease stream (an ordered consumer) and keeps a timer for the earliest expiry; when
  it fires, the client re-reads the record and, if it is still expired, replaces it with
  a nil record fenced on its sequence (so exactly one sweeper wins against a late
  keepalive) and deletes every key still attached to the lease (a scan of the keys'
  last messages, each delete fenced on the key's revision). So the keys of a holder
  killed with -9 vanish about ``ttl`` after its last keepalive, as long as any client
  is running; reads also sweep leases already due first. Clocks of the hosts must agree
  to well within a TTL (NTP).
* Watch: an ordered push consumer on ``NS.kv.*`` from ``after_revision + 1``, filtered
  by prefix in the client. "From now" is the stream's last sequence read by a request
  sent when ``watch()`` is called; writes of this process wait for such pending reads
  (they share one connection, so the server sees them after the read), which makes
  "now" exact for every writer in the process.

Durability is JetStream's (see ``shoal.events.brokers.nats``): acknowledged writes are
stored by a quorum of ``replicas`` and fsynced on ``sync_interval``.

Known limits: delete markers (one per deleted key) and ended-lease records stay in their
streams (no compaction yet); ending a lease scans every key's last message; a put racing
the sweep of its (just expired) lease can leave a key no sweep will find; ``cas`` on the
revision of a delete marker succeeds; "now" of a watch is exact only for writers in the
same process (another process's write racing the ``watch()`` call may or may not be in).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import secrets
import time
from typing import Any

import msgspec

from shoal.errors import ConfigError, LeaseExpired, StoreError
from shoal.natsio import (
    REQUEST_TIMEOUT,
    NatsTarget,
    PullReader,
    SharedConnection,
    acquire,
    parse_nats_url,
    release,
    storage_type,
)
from shoal.store.base import Change, Entry, Lease, Store
from shoal.store.validation import (
    check_key,
    check_prefix,
    check_revision,
    check_ttl,
    check_value,
)
from shoal.store.watch import ChangeStream

try:
    import nats
    from nats.js.api import DeliverPolicy, DiscardPolicy, StreamConfig
except ImportError:  # pragma: no cover - parse_nats_url explains
    pass

log = logging.getLogger("shoal.store.nats")

DEFAULT_KEY_HISTORY = 64  # writes kept per key for watch replay (JetStream KV's maximum)
SCAN_BATCH = 1000
EXPIRY_SLACK = 0.005
WRONG_LAST_SEQUENCE = 10071

_kv = msgspec.msgpack.Encoder().encode
_kv_decode = msgspec.msgpack.Decoder(tuple[str, bytes | None, int | None]).decode
_lease_decode = msgspec.msgpack.Decoder(tuple[float, float] | None).decode


def key_token(key: str) -> str:
    """The subject token of ``key``: base64url SHA-256 (fixed length, subject-safe)."""
    digest = hashlib.sha256(key.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _wrong_sequence(exc: Exception) -> bool:
    return getattr(exc, "err_code", None) == WRONG_LAST_SEQUENCE


class NatsLease(Lease):
    """A lease record in the store's lease stream."""

    def __init__(self, store: NatsStore, lease_id: int, ttl: float, seq: int,
                 expires_at: float) -> None:
        self._store = store
        self.id = lease_id
        self.ttl = ttl
        self._seq = seq
        self._expires_at = expires_at
        self._revoked = False
        self._attempt: bytes | None = None  # a keepalive record whose answer was lost
        self._last_attempt: bytes | None = None

    def _expired(self) -> bool:
        return self._revoked or time.time() >= self._expires_at

    async def keepalive(self) -> None:
        store = self._store
        self._last_attempt, self._attempt = self._attempt, None
        if self._expired():
            store._schedule_sweep(self.id)
            raise LeaseExpired(f"lease {self.id} (ttl {self.ttl}s) expired or was revoked")
        expires_at = time.time() + self.ttl
        record = _kv((self.ttl, expires_at))
        subject = store._lease_subject(self.id)
        try:
            self._seq = await store._publish(subject, record, expect=self._seq,
                                             stream=store._lease_stream)
        except StoreError as exc:
            if not _wrong_sequence(exc.__cause__):  # type: ignore[arg-type]
                self._attempt = record  # its answer was lost, but it may have landed
                raise
            last = await store._last(subject, store._lease_stream, consistent=True)
            if last is None or self._last_attempt is None or last.data != self._last_attempt:
                self._revoked = True
                raise LeaseExpired(
                    f"lease {self.id} (ttl {self.ttl}s) expired or was revoked"
                ) from None
            self._seq = int(last.seq)  # an earlier keepalive did land: carry on from it
            self._seq = await store._publish(subject, record, expect=self._seq,
                                             stream=store._lease_stream)
        self._expires_at = expires_at
        store._lease_seen(self.id, expires_at)

    async def revoke(self) -> None:
        if self._revoked:
            return
        self._revoked = True
        store = self._store
        await store._publish(store._lease_subject(self.id), _kv(None),
                             stream=store._lease_stream)
        store._leases.pop(self.id, None)
        await store._delete_keys_of(self.id)

    def __repr__(self) -> str:
        return f"NatsLease(id={self.id}, ttl={self.ttl})"


class _NatsChangeStream(ChangeStream):
    def __init__(self, store: NatsStore, prefix: str, last: int,
                 start: asyncio.Future[int] | None) -> None:
        holder: dict[str, Any] = {}  # the subscription, for the close callback
        super().__init__(prefix, last, functools.partial(_stop_watch, store, holder))
        self._holder = holder
        self._store = store
        self._start = start
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._subscribing: asyncio.Task[Any] | None = None
        store._watches.append((self._queue, holder))

    async def _subscribe(self) -> None:
        store = self._store
        if self._start is not None:
            self.last = await self._start
            self._start = None
        queue = self._queue

        async def on_msg(msg: Any) -> None:
            queue.put_nowait(msg)

        try:
            self._holder["sub"] = await store._js.subscribe(
                f"{store.target.namespace}.kv.*", stream=store._kv_stream, cb=on_msg,
                ordered_consumer=True, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                config=nats.js.api.ConsumerConfig(opt_start_seq=self.last + 1),
            )
        except (TimeoutError, nats.errors.Error) as exc:  # e.g. the stream electing a leader
            raise StoreError(f"store {store.url}: watch on {self.prefix!r} cannot start: "
                             f"{exc or type(exc).__name__}") from exc
        if self._ended:  # closed while subscribing
            _stop_watch(store, self._holder)

    async def _fetch(self) -> list[Change] | None:
        store = self._store
        if self._subscribing is None:
            self._subscribing = asyncio.ensure_future(self._subscribe())
        if store._closed:
            return None
        await asyncio.shield(self._subscribing)
        while True:
            msg = await self._queue.get()
            batch: list[Change] = []
            while True:
                if msg is None:  # the store closed
                    return None
                seq = msg.metadata.sequence.stream
                if seq > self.last:
                    if seq != self.last + 1:
                        raise StoreError(
                            f"store {store.url}: watch on {self.prefix!r} fell behind: "
                            f"changes {self.last + 1}..{seq - 1} were compacted (each key "
                            f"keeps {store.history} writes); list again and watch from the "
                            f"current revision"
                        )
                    self.last = seq
                    key, value, _ = _kv_decode(msg.data)
                    if key.startswith(self.prefix):
                        kind = "delete" if value is None else "put"
                        batch.append(Change(kind, key, value, seq))
                try:
                    msg = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
            if batch:
                return batch



def _stop_watch(store: NatsStore, holder: dict[str, Any]) -> None:
    """End a watch's subscription (its consumer goes with it)."""
    sub = holder.pop("sub", None)
    if sub is not None and not store._loop.is_closed():
        store._loop.create_task(_unsubscribe(sub))


async def _unsubscribe(sub: Any) -> None:
    with contextlib.suppress(Exception):
        await sub.unsubscribe()


class NatsStore(Store):
    """Store adapter on JetStream (see the module docstring)."""

    def __init__(self, target: NatsTarget, conn: SharedConnection, history: int) -> None:
        self.url = target.url
        self.target = target
        self.history = history
        self._conn = conn
        self._js = conn.js
        self._loop = asyncio.get_running_loop()
        ns = target.namespace
        self._kv_stream = f"{ns}-kv"
        self._lease_stream = f"{ns}-lease"
        self._closed = False
        self._leases: dict[int, float] = {}  # lease id -> expires_at (time.time())
        self._timer: asyncio.TimerHandle | None = None
        self._sweeps: dict[int, asyncio.Task[None]] = {}
        self._ended: set[int] = set()  # leases this client ended, keys not yet all deleted
        self._lease_sub: Any = None
        self._watches: list[tuple[asyncio.Queue[Any], dict[str, Any]]] = []

    @classmethod
    async def open(cls, url: str, *, history: int = DEFAULT_KEY_HISTORY) -> NatsStore:
        """Connect to ``nats://...`` and create the store's streams if needed."""
        target = parse_nats_url(url, "store url")
        if not isinstance(history, int) or not 1 <= history <= 1_000_000:
            raise ConfigError(f"store history: must be an int in 1..1000000, got {history!r}")
        conn = await acquire(target, "store url")
        self = cls(target, conn, history)
        try:
            await self._ensure_stream(self._kv_stream, f"{target.namespace}.kv.*", history)
            await self._ensure_stream(self._lease_stream, f"{target.namespace}.lease.*", 1)
            self._lease_sub = await self._js.subscribe(
                f"{target.namespace}.lease.*", stream=self._lease_stream,
                cb=self._on_lease_record, ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            )
        except BaseException:
            await release(conn)
            raise
        return self

    async def _ensure_stream(self, name: str, subject: str, per_subject: int) -> None:
        try:
            await self._js.stream_info(name)
            return
        except nats.js.errors.NotFoundError:
            pass
        except (TimeoutError, nats.errors.Error) as exc:
            raise StoreError(f"store {self.url}: cannot reach JetStream: {exc}") from exc
        config = StreamConfig(
            name=name, subjects=[subject], storage=storage_type(self.target),
            num_replicas=self.target.replicas, max_msgs_per_subject=per_subject,
            discard=DiscardPolicy.OLD, allow_direct=True,
        )
        try:
            await self._js.add_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code != 10058:  # created concurrently with another history: use it
                raise StoreError(f"store {self.url}: cannot create stream {name}: "
                                 f"{exc.description}") from exc

    # -- plumbing ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.url}: closed")

    def _subject(self, key: str) -> str:
        return f"{self.target.namespace}.kv.{key_token(key)}"

    def _lease_subject(self, lease_id: int) -> str:
        return f"{self.target.namespace}.lease.{lease_id}"

    async def _publish(self, subject: str, payload: bytes, *, expect: int | None = None,
                       stream: str | None = None) -> int:
        """Publish after pending "now" reads; the stored sequence. StoreError on failure
        (its ``__cause__`` tells a failed expectation, see ``_wrong_sequence``)."""
        self._check_open()
        if self._conn.marks:
            await asyncio.wait(list(self._conn.marks))
        headers = None
        if expect is not None:
            headers = {"Nats-Expected-Last-Subject-Sequence": str(expect)}
        limit = self._conn.nc.max_payload
        if len(payload) + 200 > limit:
            raise StoreError(
                f"store {self.url}: a write of {len(payload)} bytes exceeds the server's "
                f"max_payload ({limit} bytes); set max_payload: 2MB in nats-server's config "
                f"for values up to 1 MiB"
            )
        try:
            ack = await self._js.publish(subject, payload, timeout=REQUEST_TIMEOUT,
                                         stream=stream or self._kv_stream, headers=headers)
        except (TimeoutError, nats.errors.Error) as exc:
            raise StoreError(f"store {self.url}: write failed: {exc or type(exc).__name__}"
                             ) from exc
        return int(ack.seq)

    async def _last(self, subject: str, stream: str | None = None, *,
                    consistent: bool = False) -> Any | None:
        """The last message on ``subject``, or None. A direct get (any replica answers,
        so a lagging follower may answer with an older message) unless ``consistent``:
        then the stream leader answers (for the reads a conditional write decides on)."""
        self._check_open()
        try:
            return await self._js.get_last_msg(stream or self._kv_stream, subject,
                                               direct=not consistent)
        except nats.js.errors.NotFoundError:
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            raise StoreError(f"store {self.url}: read failed: {exc or type(exc).__name__}"
                             ) from exc

    async def _current(self, key: str, *, consistent: bool = False
                       ) -> tuple[int, bytes | None, int | None] | None:
        """(revision, value, lease) of the key's last message (value None: deleted)."""
        msg = await self._last(self._subject(key), consistent=consistent)
        if msg is None:
            return None
        _, value, lease = _kv_decode(msg.data)
        return int(msg.seq), value, lease

    def _lease_id(self, lease: Lease | None) -> int | None:
        if lease is None:
            return None
        if (not isinstance(lease, NatsLease) or lease._store.target.servers != self.target.servers
                or lease._store.target.namespace != self.target.namespace):
            raise StoreError(f"store {self.url}: {lease!r} was granted by another store")
        if lease._expired():
            self._schedule_sweep(lease.id)
            raise LeaseExpired(f"lease {lease.id} (ttl {lease.ttl}s) expired or was revoked")
        return lease.id

    # -- key-value ---------------------------------------------------------------------
    async def get(self, key: str) -> Entry | None:
        key = check_key(key)
        await self._sweep_due()
        current = await self._current(key)
        if current is None or current[1] is None:
            return None
        return Entry(key, current[1], current[0], current[2])

    async def _scan(self) -> list[tuple[int, str, bytes | None, int | None]]:
        """Every key's last message: (revision, key, value, lease), delete markers included."""
        self._check_open()
        reader = PullReader(self._conn, self._kv_stream, f"{self.target.namespace}.kv.*",
                            deliver=DeliverPolicy.LAST_PER_SUBJECT)
        out = []
        try:
            seq = 0
            while True:
                msgs = await reader.read(seq, SCAN_BATCH)
                if not msgs:
                    break
                for m in msgs:
                    key, value, lease = _kv_decode(m.data)
                    out.append((m.metadata.sequence.stream, key, value, lease))
                seq = reader.next_seq
        except (TimeoutError, nats.errors.Error) as exc:
            raise StoreError(f"store {self.url}: scan failed: {exc or type(exc).__name__}"
                             ) from exc
        finally:
            await reader.close()
        return out

    async def list(self, prefix: str) -> list[Entry]:
        prefix = check_prefix(prefix)
        await self._sweep_due()
        entries = [
            Entry(key, value, rev, lease)
            for rev, key, value, lease in await self._scan()
            if value is not None and key.startswith(prefix)
        ]
        return sorted(entries, key=lambda e: e.key)

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        key = check_key(key)
        value = check_value(key, value)
        self._check_open()
        lease_id = self._lease_id(lease)
        return await self._publish(self._subject(key), _kv((key, value, lease_id)))

    async def cas(
        self, key: str, value: bytes, *, expected_revision: int, lease: Lease | None = None
    ) -> int | None:
        key = check_key(key)
        value = check_value(key, value)
        expect = check_revision(expected_revision, "cas expected_revision")
        self._check_open()
        lease_id = self._lease_id(lease)
        payload = _kv((key, value, lease_id))
        subject = self._subject(key)
        for _ in range(8):
            try:
                return await self._publish(subject, payload, expect=expect)
            except StoreError as exc:
                if not _wrong_sequence(exc.__cause__):  # type: ignore[arg-type]
                    raise
            if expected_revision != 0:
                return None
            # Absent also means "last was a delete". From the leader: a stale answer (the
            # claim before its delete) would refuse the claim, again at every rebalance.
            current = await self._current(key, consistent=True)
            if current is None or current[1] is not None:
                return None
            expect = current[0]
        return None  # pragma: no cover - deleted and recreated 8 times meanwhile

    async def delete(self, key: str, *, expected_revision: int | None = None) -> bool:
        key = check_key(key)
        if expected_revision is not None:
            check_revision(expected_revision, "delete expected_revision")
        self._check_open()
        subject, marker = self._subject(key), _kv((key, None, None))
        for _ in range(8):
            current = await self._current(key, consistent=True)
            if current is None or current[1] is None:
                return False
            if expected_revision not in (None, current[0]):
                return False
            try:
                await self._publish(subject, marker, expect=current[0])
                return True
            except StoreError as exc:
                if not _wrong_sequence(exc.__cause__):  # type: ignore[arg-type]
                    raise
        return False  # pragma: no cover - rewritten 8 times meanwhile

    async def revision(self) -> int:
        self._check_open()
        try:
            return int((await self._js.stream_info(self._kv_stream)).state.last_seq)
        except (TimeoutError, nats.errors.Error) as exc:
            raise StoreError(f"store {self.url}: read failed: {exc or type(exc).__name__}"
                             ) from exc

    # -- leases ------------------------------------------------------------------------
    async def lease(self, ttl: float) -> Lease:
        ttl = check_ttl(ttl)
        self._check_open()
        lease_id = secrets.randbits(62) + 1
        expires_at = time.time() + ttl
        seq = await self._publish(self._lease_subject(lease_id), _kv((ttl, expires_at)),
                                  expect=0, stream=self._lease_stream)
        self._lease_seen(lease_id, expires_at)
        return NatsLease(self, lease_id, ttl, seq, expires_at)

    async def _on_lease_record(self, msg: Any) -> None:
        lease_id = int(msg.subject.rpartition(".")[2])
        record = _lease_decode(msg.data)
        if record is None:
            self._leases.pop(lease_id, None)
        else:
            self._lease_seen(lease_id, record[1])

    def _lease_seen(self, lease_id: int, expires_at: float) -> None:
        self._leases[lease_id] = expires_at
        self._arm_timer()

    def _arm_timer(self) -> None:
        """One timer for the earliest expiry among the leases no sweep is working on."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting = [exp for i, exp in self._leases.items() if i not in self._sweeps]
        if waiting and not self._closed:
            due = min(waiting) - time.time() + EXPIRY_SLACK
            self._timer = self._loop.call_later(max(0.0, due), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = time.time()
        for lease_id, expires_at in list(self._leases.items()):
            if expires_at <= now:
                self._schedule_sweep(lease_id)
        self._arm_timer()

    def _schedule_sweep(self, lease_id: int) -> asyncio.Task[None] | None:
        if self._closed:
            return None
        task = self._sweeps.get(lease_id)
        if task is None:
            task = self._loop.create_task(self._sweep(lease_id))
            self._sweeps[lease_id] = task

            def done(_: object) -> None:
                self._sweeps.pop(lease_id, None)
                self._arm_timer()

            task.add_done_callback(done)
        return task

    async def _sweep_due(self) -> None:
        """Sweep the leases already due (so a read after an expiry never sees their keys)."""
        self._check_open()
        now = time.time()
        tasks = [self._schedule_sweep(i) for i, exp in list(self._leases.items()) if exp <= now]
        if tasks:
            await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)

    async def _sweep(self, lease_id: int) -> None:
        """Until lease ``lease_id`` is renewed or ended (by us or another client)."""
        pause, warned = 0.02, False
        while not self._closed:
            try:
                if await self._try_sweep(lease_id):
                    return
            except StoreError as exc:  # e.g. the stream is electing a leader: retry
                if not warned:
                    warned = True
                    log.warning("store %s: sweeping lease %s failed (retrying): %s",
                                self.url, lease_id, exc)
            await asyncio.sleep(pause)
            pause = min(2 * pause, 1.0)

    async def _try_sweep(self, lease_id: int) -> bool:
        """One attempt: True once the lease is renewed or ended and its keys are gone."""
        if lease_id in self._ended:  # we ended it; deleting its keys failed: again
            await self._delete_keys_of(lease_id)
            self._ended.discard(lease_id)
            return True
        if lease_id not in self._leases:  # ended meanwhile (the lease record said so)
            return True
        subject = self._lease_subject(lease_id)
        msg = await self._last(subject, self._lease_stream)
        record = None if msg is None else _lease_decode(msg.data)
        if record is not None and record[1] > time.time():  # renewed
            self._leases[lease_id] = record[1]
            return True
        if record is not None:
            try:
                await self._publish(subject, _kv(None), expect=int(msg.seq),
                                    stream=self._lease_stream)
            except StoreError as exc:
                if _wrong_sequence(exc.__cause__):  # type: ignore[arg-type]
                    return False  # a keepalive or another sweeper came first: look again
                raise
            self._ended.add(lease_id)  # we ended it: its keys are ours to delete
            await self._delete_keys_of(lease_id)
            self._ended.discard(lease_id)
        self._leases.pop(lease_id, None)
        return True

    async def _delete_keys_of(self, lease_id: int) -> None:
        """Delete (in key order) every key whose last write carried ``lease_id``."""
        held = sorted((key, rev) for rev, key, value, lease in await self._scan()
                      if value is not None and lease == lease_id)
        for key, rev in held:
            try:
                await self._publish(self._subject(key), _kv((key, None, None)), expect=rev)
            except StoreError as exc:
                if not _wrong_sequence(exc.__cause__):  # type: ignore[arg-type]
                    raise  # else: rewritten meanwhile, no longer ours

    # -- watch -------------------------------------------------------------------------
    def watch(self, prefix: str, *, after_revision: int | None = None) -> ChangeStream:
        """Changes under ``prefix``; "now" is this call (see the module docstring)."""
        prefix = check_prefix(prefix)
        self._check_open()
        start: asyncio.Future[int] | None = None
        if after_revision is None:
            start = self._loop.create_task(self.revision())
            marks = self._conn.marks
            marks.add(start)
            start.add_done_callback(marks.discard)
            last = 0
        else:
            last = check_revision(after_revision, "watch after_revision")
        return _NatsChangeStream(self, prefix, last, start)

    async def close(self) -> None:
        """End this client's watchers and lease timers; the connection is shared."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._sweeps.values()):
            task.cancel()
        for queue, holder in self._watches:
            queue.put_nowait(None)
            sub = holder.pop("sub", None)
            if sub is not None:
                await _unsubscribe(sub)
        if self._lease_sub is not None:
            await _unsubscribe(self._lease_sub)
        await release(self._conn)

    def __repr__(self) -> str:
        return f"NatsStore({self.url!r})"
