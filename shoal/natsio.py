"""What the ``nats://`` broker and store share: the URL, one connection per process, pulls.

URL: ``nats://HOST:PORT[,HOST:PORT...][/NAMESPACE][?replicas=N&storage=file|memory]``.

* Several ``HOST:PORT`` are the seed servers of one cluster; the client fails over between
  them and reconnects forever (a restarted server is picked up again).
* ``NAMESPACE`` (letters, digits, ``_``; default ``shoal``) prefixes every stream and
  subject, so several deployments (or tests) share one server without seeing each other.
* ``replicas`` (1..5, default 1) is the JetStream replication of every stream created;
  ``storage`` is ``file`` (default) or ``memory``.

One connection per (server list, event loop) is shared by every broker and store client
of the process (reference-counted): requests from one connection reach the server in the
order they were written, which is what lets a Store watch "from now" be exact for every
writer in the process (see ``shoal.store.nats``).

``PullReader`` reads a stream the way a consumer keeping up wants it: an ephemeral,
ack-less pull consumer positioned at a sequence, asked for up to N messages with
``no_wait`` (the server answers at once with what it has), reused while reads continue
where the last one ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec

from shoal.errors import ConfigError

try:
    import nats
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType
except ImportError:  # pragma: no cover - depends on the environment
    nats = None  # type: ignore[assignment]

_NAMESPACE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_HOSTPORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
REQUEST_TIMEOUT = 5.0  # seconds for any one JetStream request (covers a server restart)
INACTIVE_CONSUMER = 60.0  # an ephemeral reader the server forgets after this long unused
DOUBT_EMPTY = 2.0  # seconds of "nothing more" from one consumer before checking the stream
REPLICATE_FOR = 60.0  # seconds a stream's readers use replicated consumers after a timeout

log = logging.getLogger("shoal.natsio")


@dataclass(frozen=True, slots=True)
class NatsTarget:
    """A parsed ``nats://`` URL."""

    url: str
    servers: tuple[str, ...]
    namespace: str
    replicas: int
    storage: str  # "file" | "memory"


def parse_nats_url(url: str, what: str) -> NatsTarget:
    """Parse ``url``; a ConfigError naming ``what`` (``broker url``/``store url``) if bad."""
    if nats is None:
        raise ConfigError(f"{what} {url!r}: needs nats-py (pip install 'shoal[nats]')")
    parts = urlsplit(url)
    if parts.scheme != "nats":
        raise ConfigError(f"{what}: expected nats://HOST:PORT[/NAMESPACE], got {url!r}")
    hosts = [h for h in parts.netloc.split(",") if h]
    if not hosts:
        raise ConfigError(f"{what} {url!r}: no server (expected nats://HOST:PORT)")
    servers = []
    for h in hosts:
        h = h.rpartition("@")[2]
        if ":" not in h.rpartition("]")[2]:
            h += ":4222"
        if not _HOSTPORT.match(h) or not 0 < int(h.rpartition(":")[2]) < 65536:
            raise ConfigError(f"{what} {url!r}: bad server address {h!r} (expected HOST:PORT)")
        servers.append(f"nats://{h}")
    namespace = parts.path.strip("/") or "shoal"
    if not _NAMESPACE.match(namespace):
        raise ConfigError(
            f"{what} {url!r}: namespace {namespace!r} must be 1-64 letters, digits or '_'"
        )
    options = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(options) - {"replicas", "storage"}
    if unknown:
        raise ConfigError(f"{what} {url!r}: unknown option(s) {', '.join(sorted(unknown))}"
                          " (known: replicas, storage)")
    raw_replicas = options.get("replicas", "1")
    if raw_replicas not in ("1", "2", "3", "4", "5"):
        raise ConfigError(f"{what} {url!r}: replicas must be 1..5, got {raw_replicas[:20]!r}")
    storage = options.get("storage", "file")
    if storage not in ("file", "memory"):
        raise ConfigError(f"{what} {url!r}: storage must be file or memory, got {storage!r}")
    return NatsTarget(url, tuple(servers), namespace, int(raw_replicas), storage)


def storage_type(target: NatsTarget) -> StorageType:
    """The JetStream storage type the URL asks for."""
    return StorageType.MEMORY if target.storage == "memory" else StorageType.FILE


class SharedConnection:
    """One NATS connection (and JetStream context) shared within a process and loop."""

    def __init__(self, key: tuple[Any, ...], nc: NatsClient) -> None:
        self.key = key
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=REQUEST_TIMEOUT,
                                                 publish_async_max_pending=8192)
        self.refs = 0
        self.marks: set[asyncio.Future[Any]] = set()  # see shoal.store.nats (watch "now")
        self.on_reconnect: set[Any] = set()  # callables run after every reconnect
        self.replicate_until: dict[str, float] = {}  # stream -> until when (see PullReader)

    async def _reconnected(self) -> None:
        for fn in list(self.on_reconnect):
            fn()


# per event loop (weakly: a finished loop takes its entries along), per server list
_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], Any]] = (
    weakref.WeakKeyDictionary()
)


async def acquire(target: NatsTarget, what: str) -> SharedConnection:
    """The process's connection to ``target``'s servers (connecting on first use)."""
    loop = asyncio.get_running_loop()
    state = _per_loop.setdefault(loop, {})
    connections = state.setdefault("connections", {})
    connecting = state.setdefault("connecting", {})
    key = (target.servers,)
    conn = connections.get(key)
    if conn is not None and not conn.nc.is_closed:
        conn.refs += 1
        return conn
    pending = connecting.get(key)
    if pending is None:
        pending = connecting[key] = loop.create_future()
        try:
            conn = await _connect(key, target, what)
        except BaseException as exc:
            pending.set_exception(exc)
            pending.exception()  # retrieved: no "never retrieved" warning
            raise
        finally:
            del connecting[key]
        pending.set_result(conn)
        connections[key] = conn
    else:
        conn = await asyncio.shield(pending)
    conn.refs += 1
    return conn


async def _connect(key: tuple[Any, ...], target: NatsTarget, what: str) -> SharedConnection:
    holder: list[SharedConnection] = []

    async def reconnected() -> None:
        if holder:
            await holder[0]._reconnected()

    async def quiet(_: Exception) -> None:  # reconnects are expected; errors surface per call
        return None

    try:
        nc = await nats.connect(
            servers=list(target.servers), name="shoal", connect_timeout=2,
            max_reconnect_attempts=2, reconnect_time_wait=0.1,
            reconnected_cb=reconnected, error_cb=quiet, allow_reconnect=True,
        )
    except Exception as exc:
        raise ConfigError(f"{what} {target.url!r}: cannot connect: {exc or type(exc).__name__}"
                          ) from exc
    # A first connection fails fast (above); once connected, reconnect forever.
    nc.options["max_reconnect_attempts"] = -1
    conn = SharedConnection(key, nc)
    holder.append(conn)
    return conn


async def release(conn: SharedConnection) -> None:
    """Drop one reference; the last one closes the connection."""
    conn.refs -= 1
    if conn.refs > 0:
        return
    connections = _per_loop.get(asyncio.get_running_loop(), {}).get("connections", {})
    if connections.get(conn.key) is conn:
        del connections[conn.key]
    with contextlib.suppress(Exception):
        await conn.nc.close()


class PubAck(msgspec.Struct, frozen=True):
    """JetStream's answer to a publish: the sequence stored (or already there)."""

    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_decode_ack = msgspec.json.Decoder(PubAck).decode


class BulkPublisher:
    """JetStream publishes written as one buffer per batch, each ack matched to its future.

    nats-py's ``publish_async`` costs about 30 us of Python per message on this machine
    (semaphore, NUID, header encoding, one write call each); building the protocol lines
    of a whole batch in one ``bytes`` and acks decoded by msgspec cut the client's CPU per
    event roughly in half (see ``bench/bus.py --broker nats``).
    """

    def __init__(self, conn: SharedConnection) -> None:
        self.nc = conn.nc
        self._prefix = conn.nc.new_inbox() + "."
        self._sub: Any = None
        self._waiting: dict[str, asyncio.Future[PubAck]] = {}
        self._next = 0

    async def _on_ack(self, msg: Msg) -> None:
        fut = self._waiting.pop(msg.subject, None)
        if fut is None or fut.done():
            return
        status = status_of(msg)
        if status is not None:
            fut.set_exception(nats.errors.NoRespondersError() if status == "503"
                              else nats.errors.Error(f"status {status}"))
            return
        try:
            fut.set_result(_decode_ack(msg.data))
        except msgspec.DecodeError as exc:
            fut.set_exception(nats.errors.Error(f"bad publish ack {msg.data[:100]!r}: {exc}"))

    async def publish(self, items: list[tuple[str, bytes, str | None]],
                      timeout: float = REQUEST_TIMEOUT) -> list[PubAck]:
        """Publish ``(subject, payload, msg_id)`` in order; their acks (errors raise)."""
        nc = self.nc
        if self._sub is None:
            self._sub = await nc.subscribe(self._prefix + "*", cb=self._on_ack,
                                           pending_msgs_limit=1 << 20)
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        limit = nc.max_payload
        loop = asyncio.get_running_loop()
        parts: list[bytes] = []
        replies: list[str] = []
        futures: list[asyncio.Future[PubAck]] = []
        waiting, prefix = self._waiting, self._prefix
        n = self._next
        for subject, payload, msg_id in items:
            if len(payload) > limit:
                raise nats.errors.MaxPayloadError
            n += 1
            reply = f"{prefix}{n}"
            fut = loop.create_future()
            waiting[reply] = fut
            replies.append(reply)
            futures.append(fut)
            if msg_id is None:
                parts.append(f"PUB {subject} {reply} {len(payload)}\r\n".encode())
            else:
                hdr = f"NATS/1.0\r\nNats-Msg-Id: {msg_id}\r\n\r\n".encode()
                parts.append(f"HPUB {subject} {reply} {len(hdr)} {len(hdr) + len(payload)}"
                             "\r\n".encode())
                parts.append(hdr)
            parts.append(payload)
            parts.append(b"\r\n")
        self._next = n
        try:
            await nc._send_command(b"".join(parts))
            await nc._flush_pending()
            async with asyncio.timeout(timeout):
                acks = await asyncio.gather(*futures)
        finally:
            for reply in replies:
                waiting.pop(reply, None)
            for fut in futures:
                if not fut.done():
                    fut.cancel()
        return acks

    async def close(self) -> None:
        """Stop listening for acks."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None


def stream_sequence(msg: Msg) -> int:
    """The stream sequence of a message delivered by a consumer (from its ack subject)."""
    tokens = msg.reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def status_of(msg: Msg) -> str | None:
    """The status code of a JetStream control message (``404``, ``408``...), else None."""
    headers = msg.headers
    if headers and not msg.data:
        return headers.get("Status")
    return None


class PullReader:
    """An ephemeral ack-less pull consumer on ``stream``, read in no-wait batches.

    ``read(seq, limit)`` returns the stored messages from ``seq`` on (from the first kept,
    if ``seq`` was trimmed), at most ``limit``, and ``[]`` at the end. The consumer is kept
    while reads continue from where the last ended; any other position recreates it.

    A kept consumer is not believed forever when it says "nothing more": after a node of
    the cluster died, a consumer can go on answering so although the stream has moved on
    (seen with nats-server 2.9 after kill -9 of a node: a partition read nothing for good).
    After ``doubt_empty`` seconds of empty answers, one empty answer is checked against
    the stream's last sequence (one ``stream_info``), and a consumer found wrong is made
    again.

    A reader's consumer is R1 (cheap), which the server may place on a node that died
    but is not yet known dead (nats-server 2.9 keeps choosing it for ~30 s after a
    kill -9): its creation then goes unanswered. After such a timeout every reader of
    that stream on this connection makes consumers with the stream's replication for
    ``REPLICATE_FOR`` seconds (their leader is elected among the live nodes).
    """

    def __init__(
        self, conn: SharedConnection, stream: str, filter_subject: str | None = None,
        deliver: DeliverPolicy = DeliverPolicy.BY_START_SEQUENCE,
    ) -> None:
        self.conn = conn
        self.stream = stream
        self.filter_subject = filter_subject
        self.deliver = deliver
        self.consumer: str | None = None
        self.next_seq = -1  # where the consumer stands
        self._inbox = conn.nc.new_inbox()
        self._sub: Any = None
        self._request = 0
        self._lock = asyncio.Lock()
        self.doubt_empty = DOUBT_EMPTY
        self._empty_since: float | None = None  # when the kept consumer last had nothing

    async def _position(self, seq: int) -> None:
        if self.consumer is not None and self.next_seq == seq:
            return
        await self._drop_consumer()
        replicated = self.conn.replicate_until.get(self.stream, 0.0) > time.monotonic()
        config = ConsumerConfig(
            deliver_policy=self.deliver, ack_policy=AckPolicy.NONE,
            inactive_threshold=INACTIVE_CONSUMER, mem_storage=True,
            num_replicas=0 if replicated else 1,  # 0: the stream's
            filter_subject=self.filter_subject, max_waiting=16,
        )
        if self.deliver == DeliverPolicy.BY_START_SEQUENCE:
            config.opt_start_seq = max(1, seq)
        try:
            info = await self.conn.js.add_consumer(self.stream, config)
        except (TimeoutError, nats.errors.TimeoutError):
            if not replicated:
                log.warning("stream %s: creating a reader timed out; replicated readers for "
                            "%.0f s", self.stream, REPLICATE_FOR)
            self.conn.replicate_until[self.stream] = time.monotonic() + REPLICATE_FOR
            raise
        self.consumer, self.next_seq = info.name, seq

    async def _drop_consumer(self) -> None:
        if self.consumer is not None:
            name, self.consumer = self.consumer, None
            with contextlib.suppress(Exception):
                await self.conn.js.delete_consumer(self.stream, name)

    async def read(self, seq: int, limit: int) -> list[Msg]:
        """Up to ``limit`` messages from stream sequence ``seq`` on."""
        async with self._lock:
            for attempt in range(2):
                try:
                    await self._position(seq)
                    msgs = await self._pull(limit)
                except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.NotFoundError):
                    if attempt:
                        raise
                    self.consumer = None  # lost (server restart): make another
                    continue
                if msgs:
                    self.next_seq = stream_sequence(msgs[-1]) + 1
                    self._empty_since = None
                elif attempt == 0 and await self._wrongly_empty(seq):
                    self.consumer = None  # (left to the server's inactivity threshold)
                    continue
                return msgs
        return []  # pragma: no cover

    async def _wrongly_empty(self, seq: int) -> bool:
        """True if the consumer has said "nothing more" for ``doubt_empty`` seconds while
        the stream holds ``seq`` (checked at most once per period)."""
        if self.deliver != DeliverPolicy.BY_START_SEQUENCE:
            return False
        now = time.monotonic()
        if self._empty_since is None:
            self._empty_since = now
        if now - self._empty_since < self.doubt_empty:
            return False
        self._empty_since = now
        last = (await self.conn.js.stream_info(self.stream)).state.last_seq
        if last < seq:
            return False
        log.warning("stream %s: consumer %s answered nothing from sequence %d on, but the "
                    "stream ends at %d; reading through a new consumer",
                    self.stream, self.consumer, seq, last)
        return True

    async def _pull(self, limit: int) -> list[Msg]:
        nc = self.conn.nc
        if self._sub is None:
            self._sub = await nc.subscribe(self._inbox + ".*", pending_bytes_limit=256 << 20)
        self._request += 1
        reply = f"{self._inbox}.{self._request}"
        request = json.dumps({"batch": limit, "no_wait": True}).encode()
        await nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}", request, reply=reply
        )
        sub = self._sub
        queue: asyncio.Queue[Msg] = sub._pending_queue
        out: list[Msg] = []
        try:
            while len(out) < limit:
                try:
                    msg = queue.get_nowait()
                except asyncio.QueueEmpty:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        msg = await queue.get()
                sub._pending_size -= len(msg.data)
                status = status_of(msg)
                if status is None:  # data messages keep their stream subject
                    out.append(msg)
                elif msg.subject != reply:
                    continue  # the end of an earlier request
                elif status in ("404", "408", "409"):  # no (more) messages: request done
                    if status == "409" and not out:
                        raise nats.js.errors.NotFoundError
                    break
                elif status == "503":  # no responders: the consumer is gone (restart)
                    raise nats.js.errors.NotFoundError
                # 100 (heartbeat) and others: keep waiting
        except BaseException:
            # An abandoned request may still deliver: read the next one on a new inbox.
            self._sub, self._inbox = None, nc.new_inbox()
            self.consumer = None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            raise
        return out

    async def close(self) -> None:
        """Delete the consumer and the inbox subscription."""
        await self._drop_consumer()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
