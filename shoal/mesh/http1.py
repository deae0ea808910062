"""The mesh client's hot path: a lean HTTP/1.1 client on httptools with keep-alive pools.

One ``Http1Connection`` is an asyncio protocol speaking HTTP/1.1 to one endpoint (TCP
``host:port`` or a unix socket); a ``ConnectionPool`` keeps a LIFO stack of idle keep-alive
connections per endpoint. A request runs entirely in the caller's task: the head is encoded
with one bytes join and written with one ``transport.write``; the caller awaits one future
that the protocol resolves as soon as the response head is parsed. No task is created per
request and nothing runs in a thread (only resolving a host *name* when a connection opens
may; mesh addresses are IP literals or unix paths, which never do). ``send_nowait`` (on a
connection from ``ConnectionPool.take_idle``) needs no caller task at all: the exchange
reports to an ``ExchangeListener``'s callbacks (the gateway's fast path).

Decisions, written down once:

* **Streaming with backpressure.** Body bytes go into the ``Response``'s buffer; above
  ``READ_HIGH_WATER`` the transport stops reading, and it resumes once the consumer drained
  the buffer below ``READ_LOW_WATER``. Memory per response is bounded by the high water
  plus one socket read, however large the body.
* **Release on last byte received.** The connection returns to its pool the moment the last
  byte of a reusable response has arrived (the rest of the body sits in the response's
  buffer, at most one high water of it), not when the caller finishes reading it. A caller
  who forgets to read a small response therefore cannot leak a connection, and ``active``
  counts exactly the exchanges still using a socket. A response closed *before* its body
  arrived closes the connection: we never drain an unknown amount of data to save a socket.
* **Reuse rules.** A connection is reused only if the exchange was HTTP/1.1 keep-alive, the
  body was framed (Content-Length or chunked), the whole request was sent, and nothing
  arrived after the response. Anything else closes it.
* **Stale keep-alive connections are invisible.** A server may close an idle keep-alive
  connection at any time. On checkout the pool discards idle connections whose peer closed
  (EOF seen, transport closing, or the socket polled readable while idle - a FIN the loop
  has not processed yet), so the request transparently uses another or a new connection.
  ``ConnectionLost(request_sent=False)`` is raised only when we *know* no byte left: the
  connection was already dead when the request was about to be written (the pool retries
  such a request once by itself). If the peer closes after our bytes were written and before
  any response byte, we cannot know whether the server read the request, so it is
  ``request_sent=True`` - like Go's net/http, we do not guess for non-idempotent methods.
* **Request bodies** are ``None``, bytes-like, or an async iterable of bytes, streamed
  chunked unless the caller gave a Content-Length, and paced by ``pause_writing``. The body
  is sent completely before the response is handed over (as httpx does); a response that
  completes early stops the upload and closes the connection.
* **Timeouts are not ours** (the resilience layer wraps calls in ``asyncio.timeout``), but
  cancellation at any point aborts an unfinished exchange, so no half-used connection ever
  returns to a pool. ``connect_timeout`` only bounds opening a connection.
* **Large bodies skip the parser.** httptools copies every body slice it reports; for a
  Content-Length body of ``RAW_BODY_MIN`` or more, socket reads after the head go to the
  response as they are (counted down to the length), and a fresh parser takes the next
  message. Small responses keep the plain path.
* **Hostile peers.** The response head is capped at ``MAX_HEAD_BYTES`` (64 KiB); malformed
  status lines, headers or chunk sizes, and unexpected upgrades raise ``ProtocolError``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import select
import ssl as _ssl
import weakref
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Protocol

import httptools
import msgspec

from shoal.errors import ConnectError, ConnectionLost, ProtocolError, ShoalError
from shoal.mesh.tls_reads import TlsReads

__all__ = [
    "MAX_HEAD_BYTES",
    "READ_HIGH_WATER",
    "READ_LOW_WATER",
    "Address",
    "ConnectionPool",
    "EncodedHeaders",
    "Http1Connection",
    "Response",
    "TlsHttp1Connection",
    "format_address",
    "parse_address",
]

MAX_HEAD_BYTES = 64 * 1024
"""Largest response head (status line + headers) accepted before ``ProtocolError``."""
READ_HIGH_WATER = 256 * 1024
"""Buffered body bytes above which the connection stops reading from the socket."""
READ_LOW_WATER = 64 * 1024
"""Buffered body bytes at or below which a paused connection reads again."""
RAW_BODY_MIN = 64 * 1024
"""Content-Length from which body bytes bypass the parser (handed on without a copy)."""

Address = str | tuple[str, int]
"""``"host:port"``, ``"http://host:port"``, ``("host", port)``, ``"unix:/path"`` or ``"/path"``."""
HeaderList = Iterable[tuple[str | bytes, str | bytes]]
Body = bytes | bytearray | memoryview | AsyncIterable[bytes] | None
TLSContext = _ssl.SSLContext | Callable[[], _ssl.SSLContext] | None
"""A context for TLS, or a provider of the current one (read per new connection)."""

_BYTES_LIKE = (bytes, bytearray, memoryview)
_EMPTY_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))
_LOOKED_AT = frozenset((4, 14, 17))  # lengths of host, content-length, transfer-encoding


def parse_address(address: Address) -> tuple[str, int] | str:
    """Normalise an address: ``(host, port)`` for TCP, a filesystem path for a unix socket."""
    if isinstance(address, tuple):
        return address[0], int(address[1])
    if address.startswith("unix:"):
        return address[5:]
    if address.startswith("/"):
        return address
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or host.endswith(":"):
        raise ValueError(f"address {address!r} is not host:port, unix:/path or /path")
    return host.strip("[]"), int(port)


def format_address(target: tuple[str, int] | str) -> str:
    """The address as shown in errors and Host headers: ``host:port`` or ``unix:/path``."""
    if isinstance(target, str):
        return f"unix:{target}"
    host, port = target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class EncodedHeaders:
    """Header lines already encoded (``name: value\r\n`` each, ``lines`` of them), taken
    as they are when a head is encoded: for a caller that builds the lines in the pass
    that chooses them (the gateway), instead of pairs encoded in a second pass. The lines
    are still checked for CR and LF. Iterating gives the ``(name, value)`` pairs.

    In a request (``Http1Connection``): ``host`` tells that a line is a Host header, and
    ``content_length`` is the value of the Content-Length line if there is one (no
    Transfer-Encoding line). In a response (``shoal.gateway.server``): no framing or
    persistence line, ``content_length`` is the length to announce for a HEAD or 304
    answer, and ``date`` tells that a line is a Date header."""

    __slots__ = ("block", "content_length", "date", "host", "lines")

    def __init__(self, block: bytes, lines: int, *, host: bool = False,
                 content_length: int | None = None, date: bool = False) -> None:
        self.block = block
        self.lines = lines
        self.host = host
        self.content_length = content_length
        self.date = date

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        for line in self.block.split(b"\r\n")[:self.lines]:
            name, _, value = line.partition(b":")
            yield name, value.strip(b" ")

    def __repr__(self) -> str:
        return f"<EncodedHeaders {self.lines} lines>"


class _StopParsing(Exception):
    """Raised inside a parser callback to stop parsing (end of a HEAD response's head,
    or bytes after the response: both leave the parser unusable, so it is replaced)."""


def _to_bytes(value: str | bytes) -> bytes:
    return value if type(value) is bytes else value.encode("latin-1")  # type: ignore[union-attr]


class Response:
    """A response whose head has arrived; the body streams through a bounded buffer."""

    __slots__ = (
        "__weakref__", "_buffered", "_chunks", "_closed", "_conn", "_content", "_done",
        "_error", "_exchange", "_waiter", "address", "headers", "http_version",
        "peak_buffered", "reason", "status",
    )

    def __init__(self, conn: Http1Connection, status: int, reason: bytes,
                 headers: list[tuple[bytes, bytes]], http_version: str) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.http_version = http_version
        self.address = conn.label
        self.peak_buffered = 0  # high-water mark of buffered body bytes (tests, metrics)
        self._conn: Http1Connection | None = conn  # set while the body is still arriving
        self._exchange = conn.exchanges  # which exchange of ``conn`` this response is
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._closed = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._content: bytes | None = None

    def __repr__(self) -> str:
        return f"<Response {self.status} from {self.address}>"

    def header(self, name: str | bytes, default: bytes | None = None) -> bytes | None:
        """The first value of header ``name`` (case-insensitive), or ``default``."""
        key = _to_bytes(name).lower()
        for k, v in self.headers:
            if k.lower() == key:
                return v
        return default

    # -- consumer side ---------------------------------------------------------------
    async def aread(self) -> bytes:
        """Read the whole body (and keep it: calling again returns the same bytes)."""
        if self._content is not None:
            return self._content
        parts: list[bytes] = []
        while True:
            if self._chunks:
                parts.extend(self._chunks)
                self._take_all()
            elif self._done:
                break
            elif not await self._wait():
                break
        self._content = parts[0] if len(parts) == 1 else b"".join(parts)
        return self._content

    def complete_body(self) -> bytes | None:
        """The whole body if all of it has arrived (kept, like ``aread``), else None: a
        relay answers a small response without a coroutine."""
        if self._content is not None:
            return self._content
        if not self._done or self._error is not None or self._closed:
            return None
        chunks = self._chunks
        content = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._take_all()
        self._content = content
        return content

    async def json(self) -> Any:
        """Read the whole body and decode it as JSON."""
        return msgspec.json.decode(await self.aread())

    def aiter_bytes(self) -> ChunkIterator:
        """Iterate over body chunks as they arrive (``async for chunk in r.aiter_bytes()``)."""
        return ChunkIterator(self)

    async def aclose(self) -> None:
        """Release the response; if its body has not fully arrived, close the connection."""
        self.close()

    def close(self) -> None:
        """Synchronous ``aclose``."""
        if self._closed:
            return
        self._closed = True
        self._chunks.clear()
        self._buffered = 0
        conn, self._conn = self._conn, None
        if conn is not None and conn._in_exchange and conn.exchanges == self._exchange:
            conn._abort_exchange()
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        # A response dropped mid-body must not pin its connection as "active" forever (the
        # connection only holds it by weak reference, so dropping it does reach here).
        conn = self._conn
        if conn is not None and conn._in_exchange and conn.exchanges == self._exchange:
            with contextlib.suppress(Exception):
                conn._abort_exchange()

    async def _next_chunk(self) -> bytes | None:
        """The next chunk, or None at the end of the body."""
        while not self._chunks:
            if self._done or not await self._wait():
                return None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        conn = self._conn
        if conn is not None and conn._reading_paused and self._buffered <= READ_LOW_WATER:
            conn._resume_reading()
        return chunk

    def _take_all(self) -> None:
        self._chunks.clear()
        self._buffered = 0
        conn = self._conn
        if conn is not None and conn._reading_paused:
            conn._resume_reading()

    async def _wait(self) -> bool:
        """Wait for more body or the end; False when the body has ended."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise RuntimeError(f"body of {self!r} read after it was closed")
        if self._done:
            return False
        conn = self._conn
        if conn is None:  # pragma: no cover - every detach sets _done, _error or _closed
            raise RuntimeError(f"{self!r} lost its connection")
        waiter = self._waiter = conn._loop.create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            self.close()  # a half-read exchange cannot be resumed: abort it
            raise
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error
        if self._closed and not self._chunks:
            raise RuntimeError(f"body of {self!r} read after it was closed")
        return True

    # -- producer side (called by the connection) ----------------------------------
    def _feed(self, chunk: bytes) -> None:
        if self._closed:
            return
        self._chunks.append(chunk)
        buffered = self._buffered = self._buffered + len(chunk)
        if buffered > self.peak_buffered:
            self.peak_buffered = buffered
        if buffered > READ_HIGH_WATER and self._conn is not None:
            self._conn._pause_reading()
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _finish(self) -> None:
        self._done = True
        self._conn = None
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._conn = None
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


class ChunkIterator:
    """Async iterator over a streamed body's chunks: ``await source._next_chunk()`` until
    None (responses here, requests in the gateway's server)."""

    __slots__ = ("_source",)

    def __init__(self, source: Any) -> None:
        self._source = source

    def __aiter__(self) -> ChunkIterator:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._source._next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class ExchangeListener(Protocol):
    """Callbacks of an exchange begun with ``Http1Connection.send_nowait``; exactly one of
    ``on_complete``, ``on_partial`` or ``on_failed`` ends it, always outside the parser."""

    def on_head(self, resp: Response) -> None:
        """The head arrived (called while parsing: keep ``resp``, do nothing else)."""

    def on_complete(self, resp: Response) -> None:
        """The whole response arrived; the connection is back in its pool."""

    def on_partial(self, resp: Response) -> None:
        """The head arrived but not all of the body: ``resp`` streams the rest."""

    def on_failed(self, exc: BaseException, resp: Response | None) -> None:
        """The exchange failed (``resp``: its head, if it had arrived)."""


class Http1Connection(asyncio.BaseProtocol):
    """One HTTP/1.1 client connection; one exchange at a time, reusable when keep-alive.

    A streaming protocol (loops call ``data_received``); over TLS ``open`` makes a
    ``TlsHttp1Connection`` instead, which is a ``BufferedProtocol`` (see ``tls_reads``)."""

    __slots__ = (
        "_broken", "_content_length", "_drain_waiter", "_eof", "_head_bytes", "_head_done",
        "_head_only", "_head_waiter", "_headers", "_host_line", "_in_exchange",
        "_keep_alive", "_listener", "_loop", "_message_done", "_owner", "_parser", "_poller",
        "_raw_remaining", "_reading_paused", "_reason", "_request_done", "_response_ref",
        "_transport", "_write_paused", "closed", "exchanges", "idle_since", "label", "target",
    )

    def __init__(self, address: Address, *, owner: ConnectionPool | None = None) -> None:
        self.target = parse_address(address)
        self.label = format_address(self.target)
        host = "localhost" if isinstance(self.target, str) else self.label
        self._host_line = b"Host: " + host.encode("idna") + b"\r\n"
        self._owner = owner
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._poller: select.poll | None = None
        self.closed = False
        self.exchanges = 0  # requests started on this connection
        self.idle_since = 0.0
        self._eof = False
        self._in_exchange = False
        self._request_done = False
        self._message_done = False
        self._keep_alive = False
        self._broken = False
        self._head_only = False
        self._head_done = False
        self._head_bytes = 0  # bytes read in this exchange before its head ended (a bound)
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._content_length: bytes | None = None
        self._raw_remaining = 0
        self._response_ref: weakref.ref[Response] | None = None
        self._head_waiter: asyncio.Future[Response] | None = None
        self._listener: ExchangeListener | None = None  # an exchange begun by send_nowait
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    @classmethod
    async def open(cls, address: Address, *, connect_timeout: float = 10.0,
                   owner: ConnectionPool | None = None,
                   ssl: _ssl.SSLContext | None = None) -> Http1Connection:
        """Connect to ``address`` (over TLS with ``ssl``); ``ConnectError`` if refused,
        unreachable, too slow, or the TLS handshake or peer verification failed."""
        conn = (TlsHttp1Connection if ssl is not None else cls)(address, owner=owner)
        loop, target = conn._loop, conn.target
        try:
            async with asyncio.timeout(connect_timeout):
                if isinstance(target, str):
                    await loop.create_unix_connection(lambda: conn, target, ssl=ssl,
                                                      server_hostname="" if ssl else None)
                else:
                    await loop.create_connection(lambda: conn, target[0], target[1], ssl=ssl)
        except TimeoutError:
            raise ConnectError(
                conn.label, f"timed out after {connect_timeout}s connecting to {conn.label}"
            ) from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise ConnectError(conn.label, f"cannot connect to {conn.label}: {reason}") from exc
        return conn

    def __repr__(self) -> str:
        state = "closed" if self.closed else "busy" if self._in_exchange else "idle"
        return f"<Http1Connection {self.label} {state} exchanges={self.exchanges}>"

    # -- public ----------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """An exchange is in progress on this connection."""
        return self._in_exchange

    def is_reusable(self) -> bool:
        """Idle and, as far as can be told without blocking, still open at both ends."""
        if self._in_exchange or self.closed or self._eof or self._broken:
            return False
        t = self._transport
        if t is None or t.is_closing():
            return False
        poller = self._poller
        # Readable while idle = a FIN (or stray bytes) the loop has not processed yet.
        return poller is None or not poller.poll(0)

    def close(self) -> None:
        """Close the connection (aborting any exchange in progress)."""
        if self._in_exchange:
            self._abort_exchange()
        else:
            self._close_transport()

    async def request(self, method: str | bytes, target: str | bytes,
                      headers: HeaderList = (), body: Body = None) -> Response:
        """Send one request; return the ``Response`` once its head has arrived."""
        t, head, stream, length = self._open_exchange(
            _to_bytes(method), _to_bytes(target), headers, body)
        waiter = self._head_waiter = self._loop.create_future()
        try:
            if stream is None:
                if body is None:
                    t.write(head)
                elif len(body) <= 65536:  # type: ignore[arg-type]
                    t.write(head + bytes(body))  # type: ignore[arg-type]
                else:
                    t.write(head)
                    t.write(body)  # type: ignore[arg-type]
                self._request_done = True
            else:
                await self._send_stream(head, stream, length)
            resp = await waiter
        except BaseException:
            if self._in_exchange and self._head_waiter is waiter:
                self._abort_exchange()
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # retrieved: the caller sees the exception raised here
            raise
        if self._head_waiter is waiter:
            self._head_waiter = None  # the caller owns the response; only it may keep it alive
        return resp

    def _open_exchange(self, method: bytes, target: bytes, headers: HeaderList, body: Body
                       ) -> tuple[Any, bytes, AsyncIterable[bytes] | None, int | None]:
        """Begin an exchange: the transport to write on and the encoded head (plus the body
        stream and its length, if streamed). Raises before anything is written (a bad header,
        or ``ConnectionLost(request_sent=False)``), the connection then untouched."""
        if self._in_exchange:
            raise RuntimeError(f"{self!r} already has an exchange in progress")
        self._begin_exchange(method == b"HEAD")
        try:
            head, stream, length = self._encode_head(method, target, headers, body)
        except BaseException:
            self._in_exchange = False  # nothing was written: the connection is untouched
            if self._owner is not None:
                self._owner._release(self, self.is_reusable())
            raise
        t = self._transport
        if self.closed or self._eof or t is None or t.is_closing():
            exc = ConnectionLost(self.label, f"connection to {self.label} was closed by the "
                                 "peer before the request was written", request_sent=False)
            self._end_exchange_failed(exc)
            raise exc
        return t, head, stream, length

    def send_nowait(self, method: bytes, target: bytes, headers: HeaderList,
                    body: bytes | None, listener: ExchangeListener) -> None:
        """Write a request with no body or a bytes body, without awaiting anything: the
        response is reported to ``listener``'s callbacks (see ``ExchangeListener``).

        Raises what ``request`` raises before writing (``ValueError`` for a bad header,
        ``ConnectionLost(request_sent=False)`` if the connection is dead); then no callback
        is ever made and the connection is back in its pool (or closed)."""
        t, head, _, _ = self._open_exchange(method, target, headers, body)
        t.write(head if body is None else head + body)
        self._request_done = True
        self._listener = listener

    # -- request encoding and sending ------------------------------------------------
    def _encode_head(self, method: bytes, target: bytes, headers: HeaderList, body: Body
                     ) -> tuple[bytes, AsyncIterable[bytes] | None, int | None]:
        """Encode the request head; for a streamed body also its declared length (None:
        chunked)."""
        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
        has_host = has_te = False
        length: int | None = None
        if type(headers) is EncodedHeaders:
            parts.append(headers.block)
            lines = headers.lines + 2  # the request line and the blank line
            has_host, length = headers.host, headers.content_length
        else:
            for name, value in headers:
                if type(name) is not bytes:
                    name = name.encode("latin-1")  # type: ignore[union-attr]
                if type(value) is not bytes:
                    value = value.encode("latin-1")  # type: ignore[union-attr]
                if len(name) in _LOOKED_AT:
                    low = name.lower()
                    if low == b"host":
                        has_host = True
                    elif low == b"content-length":
                        if not value.isdigit():
                            raise ValueError(f"Content-Length {value!r} is not a number")
                        length = int(value)
                    elif low == b"transfer-encoding":
                        has_te = True
                parts += (name, b": ", value, b"\r\n")
            lines = len(parts) // 4 + 1  # the request line, one per header, the blank line
        if not has_host:
            parts.append(self._host_line)
            lines += 1
        stream: AsyncIterable[bytes] | None = None
        if body is None:
            if method in _EMPTY_BODY_METHODS and length is None and not has_te:
                parts.append(b"Content-Length: 0\r\n")
                lines += 1
        elif isinstance(body, _BYTES_LIKE):
            if has_te:
                raise ValueError("Transfer-Encoding given with a bytes body; drop the header")
            if length is None:
                parts.append(b"Content-Length: %d\r\n" % len(body))
                lines += 1
            elif length != len(body):
                raise ValueError(f"Content-Length {length} but the body has {len(body)} bytes")
        else:
            stream = body
            if has_te:
                length = None
            elif length is None:
                parts.append(b"Transfer-Encoding: chunked\r\n")
                lines += 1
        parts.append(b"\r\n")
        head = b"".join(parts)
        # One C-speed scan instead of per-header checks: no CR or LF may hide in a name,
        # value or target (header injection / request smuggling).
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise ValueError("CR or LF in the request target or a header name/value")
        return head, stream, length

    async def _send_stream(self, head: bytes, body: AsyncIterable[bytes], length: int | None
                           ) -> None:
        t = self._transport
        assert t is not None
        t.write(head)
        sent = 0
        async for chunk in body:
            if not self._in_exchange or t.is_closing():
                break  # the response already ended (or the connection died): stop uploading
            n = len(chunk)
            if not n:
                continue  # an empty chunk would end a chunked body
            sent += n
            if length is not None:
                if sent > length:
                    raise ValueError(f"request body longer than its Content-Length {length}")
                t.write(chunk)
            elif n <= 65536:
                t.write(b"".join((b"%x\r\n" % n, chunk, b"\r\n")))
            else:
                t.writelines((b"%x\r\n" % n, chunk, b"\r\n"))
            if self._write_paused:
                await self._drain()
        else:
            if self._in_exchange and not t.is_closing():
                if length is None:
                    t.write(b"0\r\n\r\n")
                elif sent != length:
                    raise ValueError(f"request body of {sent} bytes, Content-Length {length}")
                self._request_done = True

    async def _drain(self) -> None:
        if not self._write_paused or self.closed:
            return
        waiter = self._drain_waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._drain_waiter = None

    # -- exchange state --------------------------------------------------------------
    def _response(self) -> Response | None:
        ref = self._response_ref
        return None if ref is None else ref()

    def _begin_exchange(self, head_only: bool) -> None:
        self._in_exchange = True
        self.exchanges += 1
        self._head_only = head_only
        self._request_done = False
        self._message_done = False
        self._keep_alive = False
        self._head_done = False
        self._head_bytes = 0
        self._headers = []
        self._reason = b""
        self._content_length = None
        self._raw_remaining = 0

    def _complete_exchange(self) -> None:
        """The last byte of the response has arrived: hand the connection back."""
        resp = self._response()
        listener, self._listener = self._listener, None
        self._response_ref = None
        self._head_waiter = None
        self._in_exchange = False
        self._message_done = False
        reusable = (self._keep_alive and self._request_done and not self._broken
                    and not self.closed and not self._eof)
        if reusable:
            if self._reading_paused:
                self._resume_reading()
            self.idle_since = self._loop.time()
        else:
            self._close_transport()
        if resp is not None:
            resp._finish()
        if self._owner is not None:
            self._owner._release(self, reusable)
        if listener is not None and resp is not None:
            listener.on_complete(resp)  # the connection is back in its pool already

    def _end_exchange_failed(self, exc: BaseException) -> None:
        """The exchange failed: deliver ``exc`` to whoever waits and drop the connection."""
        if not self._in_exchange:
            return
        self._in_exchange = False
        waiter, resp = self._head_waiter, self._response()
        self._head_waiter = self._response_ref = None
        listener, self._listener = self._listener, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        elif resp is not None:
            resp._fail(exc)
        self._close_transport()
        if self._owner is not None:
            self._owner._release(self, False)
        if listener is not None:
            listener.on_failed(exc, resp)

    def _abort_exchange(self) -> None:
        """The caller gave up (cancelled, closed the response early): drop the connection."""
        if not self._in_exchange:
            return
        self._in_exchange = False
        self._listener = None  # whoever aborts knows: no callback
        waiter, resp = self._head_waiter, self._response()
        self._head_waiter = self._response_ref = None
        if waiter is not None and not waiter.done():
            waiter.cancel()
        if resp is not None and not resp._closed:
            resp._fail(ConnectionLost(self.label, f"connection to {self.label} was closed "
                                      "locally mid-response", request_sent=True))
        self._close_transport()
        if self._owner is not None:
            self._owner._release(self, False)

    def _close_transport(self) -> None:
        self.closed = True
        t = self._transport
        if t is not None and not t.is_closing():
            t.abort()  # no lingering half-sent bytes; the peer sees a reset if mid-exchange

    def _pause_reading(self) -> None:
        t = self._transport
        if not self._reading_paused and t is not None and not t.is_closing():
            self._reading_paused = True
            t.pause_reading()

    def _resume_reading(self) -> None:
        t = self._transport
        if self._reading_paused and t is not None and not t.is_closing():
            self._reading_paused = False
            t.resume_reading()

    # -- asyncio protocol callbacks --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                poller = select.poll()
                poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
                self._poller = poller

    def data_received(self, data: bytes) -> None:
        if not self._in_exchange:
            self._broken = True  # bytes nobody asked for: this connection is unusable
            self._close_transport()
            if self._owner is not None:
                self._owner._discard(self)
            return
        if self._raw_remaining:
            self._raw_body(data)
            return
        if not self._head_done:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _StopParsing):
                self._parser = httptools.HttpResponseParser(self)
            elif isinstance(cause, ShoalError):
                self._end_exchange_failed(cause)
                return
            else:
                self._protocol_error(f"{exc} ({cause!r})")
                return
        except httptools.HttpParserUpgrade:
            self._protocol_error("unexpected protocol upgrade (status 101)")
            return
        except httptools.HttpParserError as exc:
            if self._message_done:
                self._broken = True  # garbage after a complete response: do not reuse
            else:
                self._protocol_error(str(exc) or type(exc).__name__)
                return
        if self._message_done:
            self._complete_exchange()
        elif not self._head_done:
            if self._head_bytes > MAX_HEAD_BYTES:
                self._protocol_error(f"response head exceeds {MAX_HEAD_BYTES} bytes")
        elif self._listener is not None:  # a head without all of its body: it streams
            listener, self._listener = self._listener, None
            resp = self._response()
            if resp is not None:
                listener.on_partial(resp)

    def _raw_body(self, data: bytes) -> None:
        """Body bytes of a large Content-Length response, past the parser."""
        remaining = self._raw_remaining - len(data)
        if remaining > 0:
            self._raw_remaining = remaining
        else:
            self._raw_remaining = 0
            if remaining < 0:
                self._broken = True  # bytes beyond the response: never reuse
                data = data[:remaining]
            self._message_done = True
            self._parser = httptools.HttpResponseParser(self)  # the old one is mid-body
        ref = self._response_ref
        resp = None if ref is None else ref()
        if resp is not None:
            resp._feed(data)
        if self._message_done:
            self._complete_exchange()

    def _protocol_error(self, detail: str) -> None:
        self._end_exchange_failed(
            ProtocolError(self.label, f"malformed HTTP response from {self.label}: {detail}"))

    def eof_received(self) -> bool | None:
        self._eof = True
        return None  # let the transport close; connection_lost does the bookkeeping

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._poller = None
        dw = self._drain_waiter
        if dw is not None and not dw.done():
            dw.set_result(None)
        if not self._in_exchange:
            if self._owner is not None:
                self._owner._discard(self)
            return
        resp = self._response()
        if resp is not None and exc is None and not self._message_done and _reads_to_eof(resp):
            self._message_done = True  # an unframed body ends at EOF (never reusable)
            self._complete_exchange()
            return
        how = f"reset ({exc})" if exc is not None else "closed by the peer"
        if not self._head_done:
            where = "before the response head arrived (the request was sent)"
        else:
            where = f"mid-response, {self._parser.get_status_code()} body incomplete"
        self._end_exchange_failed(
            ConnectionLost(self.label, f"connection to {self.label} {how} {where}",
                           request_sent=True))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        dw = self._drain_waiter
        if dw is not None and not dw.done():
            dw.set_result(None)

    # -- httptools callbacks ---------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._message_done or not self._in_exchange:
            self._broken = True  # a second message after our response: unusable
            raise _StopParsing

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))  # the head's size: see on_headers_complete
        if len(name) == 14 and name.lower() == b"content-length":
            self._content_length = value

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            return  # informational (100 Continue, 103 Early Hints): skipped
        if self._head_bytes > MAX_HEAD_BYTES and len(self._reason) + sum(
                [len(n) + len(v) + 4 for n, v in self._headers]) > MAX_HEAD_BYTES:
            # Only measured when the reads so far could hold a head over the limit.
            raise ProtocolError(self.label, f"malformed HTTP response from {self.label}: "
                                f"response head exceeds {MAX_HEAD_BYTES} bytes")
        self._head_done = True
        resp = Response(self, status, self._reason, self._headers, parser.get_http_version())
        self._response_ref = weakref.ref(resp)
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(resp)
        elif self._listener is not None:
            self._listener.on_head(resp)  # it keeps the response alive
        if self._head_only:  # the parser cannot know a HEAD response has no body
            self._keep_alive = parser.should_keep_alive()
            self._message_done = True
            raise _StopParsing
        cl = self._content_length
        if cl is not None and status != 204 and status != 304:
            length = int(cl)  # llhttp already rejected a malformed or conflicting one
            if length >= RAW_BODY_MIN:
                # The parser finishes the current read; later reads bypass it.
                self._raw_remaining = length
                self._keep_alive = parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self._raw_remaining:
            self._raw_remaining -= len(body)
        ref = self._response_ref
        resp = None if ref is None else ref()
        if resp is not None:
            resp._feed(body)

    def on_message_complete(self) -> None:
        if not self._head_done:  # end of an informational response: wait for the real one
            self._headers = []
            self._reason = b""
            return
        self._message_done = True
        self._raw_remaining = 0
        self._keep_alive = self._parser.should_keep_alive()


class TlsHttp1Connection(TlsReads, Http1Connection, asyncio.BufferedProtocol):
    """An ``Http1Connection`` over TLS: the loop decrypts into a reused buffer."""

    __slots__ = ()


def _reads_to_eof(resp: Response) -> bool:
    """True if the response body has no framing, so the peer's EOF ends it."""
    for name, value in resp.headers:
        low = name.lower()
        if low == b"content-length":
            return False
        if low == b"transfer-encoding" and value.lower().rstrip().endswith(b"chunked"):
            return False
    return True


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one endpoint: LIFO idle stack, bounded size."""

    def __init__(self, address: Address, *, max_connections: int = 100, max_idle: int = 32,
                 idle_timeout: float = 30.0, connect_timeout: float = 10.0,
                 ssl: TLSContext = None) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.address = address
        self.label = format_address(parse_address(address))
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.ssl = ssl  # TLS for new connections (shoal.mesh.security.MeshTLS.client_context)
        self.active = 0  # exchanges in flight (request sent, response not fully received)
        self.size = 0  # connections open or opening
        self.opened = 0  # connections ever opened (a reuse metric)
        self._idle: collections.deque[Http1Connection] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._prune_handle: asyncio.TimerHandle | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (f"<ConnectionPool {self.label} active={self.active} idle={len(self._idle)} "
                f"size={self.size}>")

    @property
    def idle(self) -> int:
        """Idle connections kept open."""
        return len(self._idle)

    async def request(self, method: str | bytes, target: str | bytes,
                      headers: HeaderList = (), body: Body = None) -> Response:
        """Send a request on an idle connection (most recently used first) or a new one."""
        conn = self._checkout() or await self._acquire()
        self.active += 1
        try:
            return await conn.request(method, target, headers, body)
        except ConnectionLost as exc:
            if exc.request_sent:
                raise
        # Nothing left the process: retry once on a fresh connection, safe for any method.
        conn = await self._acquire(fresh=True)
        self.active += 1
        return await conn.request(method, target, headers, body)

    def take_idle(self) -> Http1Connection | None:
        """An idle connection for ``Http1Connection.send_nowait``, counted active (its
        exchange's end, or ``give_back``, releases it), or None if none is idle."""
        conn = self._checkout()
        if conn is not None:
            self.active += 1
        return conn

    def give_back(self, conn: Http1Connection) -> None:
        """Return a connection from ``take_idle`` unused."""
        self._release(conn, conn.is_reusable())

    async def aclose(self) -> None:
        """Close idle connections now, in-flight ones when their exchange ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
            self.size -= 1
        if self._prune_handle is not None:
            self._prune_handle.cancel()
            self._prune_handle = None
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    # -- checkout ----------------------------------------------------------------------
    def _checkout(self) -> Http1Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.is_reusable():
                return conn
            conn.close()
            self.size -= 1
        return None

    async def _acquire(self, fresh: bool = False) -> Http1Connection:
        while True:
            if self._closed:
                raise ConnectError(self.label, f"connection pool for {self.label} is closed")
            if not fresh:
                conn = self._checkout()
                if conn is not None:
                    return conn
            if self.size < self.max_connections:
                self.size += 1
                try:
                    tls = self.ssl() if callable(self.ssl) else self.ssl
                    conn = await Http1Connection.open(
                        self.address, connect_timeout=self.connect_timeout, owner=self, ssl=tls)
                except BaseException:
                    self.size -= 1
                    self._wake_one()
                    raise
                self.opened += 1
                return conn
            if fresh and self._idle:  # full of idle ones: make room for a fresh one
                self._idle.popleft().close()
                self.size -= 1
                continue
            waiter = self._loop_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the wake-up on to the next waiter
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise

    @staticmethod
    def _loop_future() -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    # -- callbacks from connections --------------------------------------------------
    def _release(self, conn: Http1Connection, reusable: bool) -> None:
        """An exchange ended; keep ``conn`` idle if it can be reused."""
        self.active -= 1
        if reusable and not self._closed and len(self._idle) < self.max_idle:
            self._idle.append(conn)
            if self._prune_handle is None:
                self._prune_handle = conn._loop.call_later(self.idle_timeout, self._prune)
        else:
            conn.close()
            self.size -= 1
        if self._waiters:
            self._wake_one()

    def _discard(self, conn: Http1Connection) -> None:
        """An idle connection died (peer closed it): forget it now."""
        try:
            self._idle.remove(conn)
        except ValueError:
            return
        self.size -= 1

    def _prune(self) -> None:
        """Close connections idle for longer than ``idle_timeout`` (oldest are leftmost)."""
        self._prune_handle = None
        idle = self._idle
        if not idle:
            return
        loop = idle[0]._loop
        deadline = loop.time() - self.idle_timeout
        while idle and idle[0].idle_since <= deadline:
            idle.popleft().close()
            self.size -= 1
        if idle:
            delay = max(idle[0].idle_since - deadline, 0.01)
            self._prune_handle = loop.call_later(delay, self._prune)
