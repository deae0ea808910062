"""The gateway's HTTP/1.1 server core: an asyncio protocol on ``httptools``, built for
hostile clients and for speed.

``HttpServer(handler, limits=ServerLimits(...))`` listens on TCP or a unix socket; every
request that passes the checks below is handed to ``handler(request)``, which returns a
``Response`` (or any object with ``status``, ``headers`` and ``body``, or one with
``aiter_bytes()`` such as ``shoal.mesh.http1.Response``), directly or as an awaitable.

Decisions, written down once:

* **One task per request, or none.** Parsing, validation and writing run in the protocol's
  callbacks. An async handler runs in one task, which also writes the response; a handler
  that returns a ``Response`` synchronously (bytes body) runs with no task at all. Nothing
  runs in a thread. The handler is started after the read that completed its head has
  been parsed, so a small body that came along is already complete when it runs.
* **A fast handler** goes with a handler that is the bound method ``obj.handle`` of an
  object with ``fast_handle(request, answer)`` (the gateway's ``Gateway``): a request
  whose body has wholly arrived is given to it instead. It returns what ``handle`` would
  (answered as above), or an object with ``answer_later = True``, ``cancel()`` and
  ``done()``: the request is then answered when the fast handler calls
  ``answer(request, result)`` from a protocol callback (no task, no coroutine), and is
  cancelled like a task if the client leaves or shutdown gives up on it. Both the fast
  handler's start and its answer are deferred until the loop turn's I/O callbacks are done
  and run together (``HttpServer._soon``), so that its writes go out grouped, as the task
  scheduler groups the coroutine path's: written one at a time from the I/O callbacks, each
  woke its peer alone, and the fast path measured ~10% *more* CPU per request than the
  coroutine path instead of ~25% less.
* **Timeouts without timers.** One sweep per server, every quarter of the shortest timeout
  (at most 1 s), compares each connection's deadline to the clock: starting or finishing a
  request is an attribute store, never a timer handle. The header timeout runs from the
  first byte of a request (or from accept, for the first one) and is not extended by
  trickled bytes (slowloris: ``408`` then close). An idle keep-alive connection is closed
  *silently* when ``keep_alive_timeout`` runs out: an unsolicited ``408`` there can race with
  a request the client is sending and be taken as its answer. A body that stops arriving
  while the server wants it gets ``408`` after ``body_timeout``; a client that stops reading
  the response is dropped after ``send_timeout``. Deadlines are suspended while the server
  itself stops reading (backpressure, pipelining).
* **Refusals are answered by the server, never by the handler.** A refused request gets a
  short JSON body ``{"error", "layer": "gateway", "reason"}``, a ``shoal-error: gateway;
  <reason>`` header, and the connection is closed after it (with a lingering close: our side
  is shut down first and the client's late bytes are read and dropped for a moment, so a
  reset cannot destroy the answer in flight). A request refused in its head never reaches
  the handler. One refused in its body (a chunked body over the limit, a malformed chunk, a
  stalled upload) has already been handed over for streaming: its body stream raises
  ``ClientRequestError``, the handler task is cancelled, and the server's refusal is what the
  client gets; if the response had already started, the connection is closed after it.
* **Smuggling.** llhttp (strict mode) already refuses Content-Length with
  Transfer-Encoding, repeated or non-numeric Content-Length, bad chunk sizes, bare CR or LF,
  control characters in names and values, and obs-fold. On top we refuse
  Transfer-Encoding other than exactly ``chunked`` (case-insensitive, one header),
  Transfer-Encoding in HTTP/1.0, missing or repeated Host (RFC 9112 §3.2), versions other
  than 1.0/1.1 (``505``), CONNECT (``501``), and protocol upgrades that carry a body. An
  upgrade without a body is answered as plain HTTP and the connection closed after it.
* **Pipelining.** Requests are answered strictly in order: a request parsed while another
  is being answered waits in a queue, and the server stops reading while anything waits. A
  read that holds more than ``max_pipelined`` waiting requests gets the earlier ones
  answered and then ``503 pipeline-limit``. A refusal takes its place in the order. No new
  request is taken while the client leaves earlier answers unread (``pause_writing``), so
  a client that pipelines without reading cannot grow the server's buffers.
* **Streaming with backpressure, both ways.** Request body bytes go to the request's bounded
  buffer; above ``READ_HIGH_WATER`` the server stops reading until the handler drains it
  below ``READ_LOW_WATER``. Pieces under 1 KiB (a body sent as 1-byte chunks) are gathered
  into one buffer, so they cost their bytes and not an object each. Content-Length bodies
  of ``RAW_BODY_MIN`` or more bypass the parser (reads are handed over without a copy).
  Response bodies that are async iterables are written as they come, pausing on
  ``pause_writing``: fixed-length if the handler gave a Content-Length (checked), chunked
  otherwise (close-delimited for HTTP/1.0 clients).
* **Framing is the server's.** ``Transfer-Encoding``, ``Connection`` and ``Keep-Alive`` from
  the handler are dropped and written by the server; ``Content-Length`` is computed for
  bytes bodies. CR or LF in a response header is refused (``500``), not sent.
* **A client's FIN is a half-close** (HAProxy's default): requests already received are
  answered, then the connection closes; a FIN in the middle of a request gets ``400
  incomplete-request``. A FIN cannot be told from a client that left until we write; the cost
  of answering one that left is bounded by the handler's own timeouts, and a reset (or a
  failed write) cancels the handler at once.
* **A handler that answers before reading the body** keeps the connection if the rest of
  the body is small (``DISCARD_MAX``, read and dropped); otherwise, or if ``100 Continue``
  was never sent, the response says ``connection: close``. ``100 Continue`` is sent when the
  handler first reads the body, so a handler that refuses early saves the upload.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import socket
import ssl as _ssl
import stat
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

import httptools
import msgspec

from shoal.errors import ShoalError
from shoal.mesh.http1 import ChunkIterator, EncodedHeaders
from shoal.mesh.security.spiffe import spiffe_id_of_peercert
from shoal.mesh.tls_reads import TlsReads
from shoal.units import parse_duration, parse_size

__all__ = [
    "DISCARD_MAX",
    "RAW_BODY_MIN",
    "READ_HIGH_WATER",
    "READ_LOW_WATER",
    "ClientRequestError",
    "Headers",
    "HttpServer",
    "Request",
    "Response",
    "ServerLimits",
]

log = logging.getLogger("shoal.gateway")

READ_HIGH_WATER = 256 * 1024
"""Buffered request body bytes above which the server stops reading from the client."""
READ_LOW_WATER = 64 * 1024
"""Buffered request body bytes at or below which a paused connection reads again."""
RAW_BODY_MIN = 64 * 1024
"""Content-Length from which request body reads bypass the parser."""
_SMALL_PIECE = 1024  # request body pieces below this are gathered into one buffer
DISCARD_MAX = 64 * 1024
"""Unread request body the server reads and drops to keep a connection alive."""
LINGER_SECONDS = 2.0
"""How long a closing connection reads and drops the client's late bytes."""

HeaderPairs = Iterable[tuple[bytes | str, bytes | str]]
Body = bytes | bytearray | memoryview | AsyncIterable[bytes] | None
Handler = Callable[["Request"], "Awaitable[Any] | Response"]
FastHandler = Callable[["Request", Callable[["Request", Any], None]], Any]
"""``fast_handle(request, answer)``: what ``handler`` returns, or an object with
``answer_later = True``, ``cancel()`` and ``done()`` that calls ``answer(request, result)``
later (from a protocol callback: no task)."""

_INF = math.inf
# read deadline kinds (index into the connection's timeout table)
_NONE, _IDLE, _HEAD, _BODY, _LINGER = range(5)
# reasons for not reading (bit mask)
_PAUSE_BODY, _PAUSE_PIPELINE, _PAUSE_DEAD, _PAUSE_WRITE = 1, 2, 4, 8
# response body modes
_EMPTY, _BYTES, _FIXED, _CHUNKED, _TO_EOF = range(5)

_BYTES_LIKE = (bytes, bytearray, memoryview)
_FRAMING_NAME_LENGTHS = frozenset((4, 10, 14, 17))
_SERVER_HEADERS = frozenset((b"content-length", b"transfer-encoding", b"connection",
                             b"keep-alive"))
_METHODS = {m.encode(): m for m in (
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


# -- limits and errors ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What a client may ask of the server; each limit has its own status and reason."""

    max_header_bytes: int = 32 * 1024
    """Request line + headers (431 ``header-too-large``; a longer target alone: 414)."""
    max_headers: int = 100
    """Header lines per request (431 ``too-many-headers``)."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Request body (413 ``body-too-large``, mid-stream for chunked bodies)."""
    max_connections: int = 10_000
    """Open connections; one more is answered 503 ``max-connections`` and closed."""
    max_pipelined: int = 32
    """Requests waiting behind the one being answered (503 ``pipeline-limit``)."""
    max_requests_per_connection: int = 0
    """Requests on one connection before it is closed; 0 means no limit."""
    header_timeout: float = 10.0
    """Seconds to receive a whole request head (408 ``header-timeout``)."""
    keep_alive_timeout: float = 15.0
    """Seconds an idle keep-alive connection is kept (then closed silently)."""
    body_timeout: float = 30.0
    """Seconds without request body bytes while the server wants them (408 ``body-timeout``)."""
    send_timeout: float = 30.0
    """Seconds a client may leave the response unread before the connection is dropped."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"ServerLimits.{f.name}: expected a number >= 0, got {value!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ServerLimits:
        """Limits from config values: sizes like ``"64KiB"``, durations like ``"10s"``."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in config.items():
            if name not in known:
                raise ValueError(f"ServerLimits: unknown limit {name!r}")
            if name.endswith("_timeout"):
                values[name] = parse_duration(value, name=name)
            elif name.endswith("_bytes"):
                values[name] = parse_size(value, name=name)
            else:
                values[name] = int(value)
        return cls(**values)


class ClientRequestError(ShoalError):
    """A request broke a limit or the protocol, or the client left mid-body: the server
    answers ``status`` with ``reason`` (a stable token) and closes the connection."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def _malformed(exc: Exception) -> ClientRequestError:
    """Name what llhttp refused (its messages are stable strings)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        reason = "invalid-method"
    elif isinstance(exc, httptools.HttpParserInvalidURLError):
        reason = "invalid-target"
    elif "PRI" in text:
        return ClientRequestError(505, "version-not-supported",
                                  "HTTP/2 is not served on this port: use HTTP/1.1")
    elif "Content-Length" in text and "Transfer-Encoding" in text:
        reason = "content-length-with-transfer-encoding"
    elif "Duplicate Content-Length" in text:
        reason = "duplicate-content-length"
    elif "Content-Length" in text:
        reason = "invalid-content-length"
    elif "Transfer-Encoding" in text:
        reason = "invalid-transfer-encoding"
    elif "chunk" in text.lower():
        reason = "invalid-chunk"
    elif "CR" in text or "LF" in text:
        reason = "invalid-line-ending"
    elif "header" in text.lower():
        reason = "invalid-header"
    elif "version" in text.lower() or "HTTP/" in text:
        reason = "invalid-request-line"
    else:
        reason = "malformed-request"
    return ClientRequestError(400, reason, f"malformed request: {text}")


_FRAMING_NAMES = frozenset((b"content-length", b"transfer-encoding", b"expect"))
_LOOKED_AT = frozenset(len(n) for n in (b"host", *_FRAMING_NAMES))


def _check_framing(framing: list[tuple[bytes, bytes]], version: str, limits: ServerLimits
                   ) -> tuple[bool, int | None, bool]:
    """Check Content-Length, Transfer-Encoding and Expect: (chunked, length, 100-continue)."""
    cls = [v for n, v in framing if n == b"content-length"]
    tes = [v for n, v in framing if n == b"transfer-encoding"]
    expects = [v for n, v in framing if n == b"expect"]
    chunked = False
    length: int | None = None
    if tes:
        if version == "1.0":
            raise ClientRequestError(400, "transfer-encoding-http10",
                                     "Transfer-Encoding is not allowed in HTTP/1.0")
        if cls:
            raise ClientRequestError(400, "content-length-with-transfer-encoding",
                                     "Content-Length together with Transfer-Encoding")
        if len(tes) > 1 or tes[0].strip(b" \t").lower() != b"chunked":
            raise ClientRequestError(
                400, "unsupported-transfer-encoding",
                f"Transfer-Encoding must be exactly 'chunked', got {b', '.join(tes)[:64]!r}")
        chunked = True
    elif cls:
        if len(cls) > 1:
            raise ClientRequestError(400, "duplicate-content-length",
                                     "Content-Length given more than once")
        if not cls[0].isdigit():
            raise ClientRequestError(400, "invalid-content-length",
                                     f"Content-Length {cls[0][:32]!r} is not a number")
        length = int(cls[0])
    expect_continue = False
    if expects and version == "1.1":
        if len(expects) > 1 or expects[0].strip(b" \t").lower() != b"100-continue":
            raise ClientRequestError(417, "unsupported-expectation",
                                     f"Expect {b', '.join(expects)[:64]!r} is not supported")
        expect_continue = True
    if length is not None and length > limits.max_body_bytes:
        raise ClientRequestError(417 if expect_continue else 413, "body-too-large",
                                 f"request body of {length} bytes exceeds the limit of "
                                 f"{limits.max_body_bytes} bytes")
    return chunked, length, expect_continue and (chunked or bool(length))


def _error_body(status: int, reason: str, message: str, layer: str) -> bytes:
    return msgspec.json.encode({"error": message, "layer": layer, "reason": reason})


# -- headers, request, response --------------------------------------------------------------
def _b(value: bytes | str) -> bytes:
    return value if type(value) is bytes else value.encode("latin-1")  # type: ignore[union-attr]


def _split_absolute(target: bytes) -> tuple[bytes, bytes, str]:
    """Path, query and authority of an absolute-form target; the authority replaces the Host
    header (RFC 9112 §3.2.2). ``ClientRequestError`` if it is not an http(s) URL."""
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        url = None
    if url is None or url.schema not in (b"http", b"https") or not url.host:
        raise ClientRequestError(400, "invalid-target",
                                 f"request target {target[:64]!r} is not a path or an http URL")
    host = url.host.decode("latin-1").lower()
    if ":" in host:
        host = f"[{host}]"
    if url.port:
        host = f"{host}:{url.port}"
    return url.path or b"/", url.query or b"", host


class Headers(list[tuple[bytes, bytes]]):
    """Request header lines in order, as ``(name, value)`` bytes; lookups ignore case."""

    __slots__ = ()

    def get(self, name: str | bytes, default: bytes | None = None) -> bytes | None:
        """The first value of ``name``, or ``default``."""
        key = _b(name).lower()
        for k, v in self:
            if len(k) == len(key) and k.lower() == key:
                return v
        return default

    def get_all(self, name: str | bytes) -> list[bytes]:
        """Every value of ``name``, in order."""
        key = _b(name).lower()
        return [v for k, v in self if k.lower() == key]


class Request:
    """One request whose head passed every check; its body streams through a bounded buffer."""

    __slots__ = (
        "_buffered", "_chunks", "_complete", "_conn", "_content", "_discard", "_error",
        "_expect_continue", "_head_sent", "_host", "_received", "_refusal", "_responded",
        "_split",
        "_streamed", "_tail", "_task", "_waiter", "chunked", "client", "content_length", "headers",
        "http_version", "keep_alive", "method", "peak_buffered", "target",
    )

    def __init__(self, conn: _ServerConnection, method: str, target: bytes, http_version: str,
                 headers: Headers, keep_alive: bool, content_length: int | None,
                 chunked: bool, host: bytes | None = None) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked
        self.client = conn.client
        self.peak_buffered = 0  # high-water mark of buffered body bytes (tests, metrics)
        self._conn = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._tail: bytearray | None = None
        self._buffered = 0
        self._received = 0
        self._complete = False
        self._error: ClientRequestError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._content: bytes | None = None
        self._streamed = False
        self._discard = False
        self._expect_continue = False
        self._head_sent = False
        self._responded = False
        self._refusal: ClientRequestError | None = None
        self._task: Any = None  # an asyncio.Task, or a fast handler's answer to come
        self._split: tuple[bytes, bytes, str | None] | None = None
        self._host = host  # the Host header's value (the server checked there is one)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target.decode('latin-1')!r}>"

    # -- target --------------------------------------------------------------------------
    def _parts(self) -> tuple[bytes, bytes, str | None]:
        split = self._split
        if split is None:
            target = self.target
            if target[:1] == b"/" or target == b"*":
                path, _, query = target.partition(b"?")
                split = (path, query, None)
            else:  # absolute-form (checked when the head was parsed)
                split = _split_absolute(target)
            self._split = split
        return split

    @property
    def raw_path(self) -> bytes:
        """The path of the target as sent (percent-encoded)."""
        return self._parts()[0]

    @property
    def raw_query(self) -> bytes:
        """The query string as sent, without ``?``."""
        return self._parts()[1]

    @property
    def path(self) -> str:
        """The path, percent-decoded (UTF-8, invalid bytes replaced)."""
        return unquote(self._parts()[0].decode("latin-1"))

    @property
    def query(self) -> str:
        """The query string as text (not percent-decoded: use ``query_params``)."""
        return self._parts()[1].decode("latin-1")

    @property
    def query_params(self) -> list[tuple[str, str]]:
        """The query's ``name=value`` pairs, decoded, in order."""
        return parse_qsl(self.query, keep_blank_values=True)

    @property
    def host(self) -> str | None:
        """The authority of an absolute-form target, else the Host header."""
        split = self._split
        if split is not None and split[2] is not None:
            return split[2]  # absolute-form (split when the head was parsed)
        value = self._host
        return None if value is None else value.decode("latin-1")

    @property
    def peer_identity(self) -> str | None:
        """The client's verified SPIFFE id (mutual TLS), else None."""
        return self._conn.peer_identity

    def header(self, name: str | bytes, default: bytes | None = None) -> bytes | None:
        """The first value of header ``name`` (case-insensitive), or ``default``."""
        return self.headers.get(name, default)

    # -- body ----------------------------------------------------------------------------
    async def body(self) -> bytes:
        """The whole body (at most ``max_body_bytes``); raises ``ClientRequestError``."""
        if self._content is not None:
            return self._content
        if self._streamed:
            raise RuntimeError(f"body of {self!r} was already consumed by stream()")
        self._streamed = True
        parts: list[bytes] = []
        while True:
            chunk = await self._next_chunk()
            if chunk is None:
                break
            parts.append(chunk)
        self._content = parts[0] if len(parts) == 1 else b"".join(parts)
        return self._content

    def complete_body(self) -> bytes | None:
        """The whole body if it has all arrived and nothing consumed it (kept, like
        ``body()``); else None. ``b""`` for a request without a body."""
        if self._content is not None:
            return self._content
        if not self._complete or self._streamed or self._error is not None or \
                self._expect_continue:
            return None
        parts = list(self._chunks)
        if self._tail is not None:
            parts.append(bytes(self._tail))
        self._streamed = True
        self._drop_buffer()
        self._content = parts[0] if len(parts) == 1 else b"".join(parts)
        return self._content

    def stream(self) -> AsyncIterator[bytes]:
        """Iterate over body chunks as they arrive, with backpressure on the client."""
        if self._streamed:
            raise RuntimeError(f"body of {self!r} was already consumed")
        self._streamed = True
        return ChunkIterator(self)

    async def _next_chunk(self) -> bytes | None:
        if self._expect_continue:
            self._expect_continue = False
            self._conn._send_continue(self)
        while not self._chunks and self._tail is None:
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            if self._discard or self._responded:
                raise RuntimeError(f"body of {self!r} read after the response was sent")
            waiter = self._waiter = self._conn._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        if self._error is not None:
            raise self._error
        if self._chunks:
            chunk = self._chunks.popleft()
        else:  # small pieces, gathered (they always come after the queued chunks)
            chunk = bytes(self._tail)  # type: ignore[arg-type]
            self._tail = None
        buffered = self._buffered = self._buffered - len(chunk)
        conn = self._conn
        if conn._pause_mask & _PAUSE_BODY and buffered <= READ_LOW_WATER:
            conn._resume(_PAUSE_BODY)
        return chunk

    def _feed(self, data: bytes) -> None:
        n = len(data)
        if n < _SMALL_PIECE:
            # Small pieces (a body sent as tiny chunks) are gathered in one buffer, so they
            # cost their bytes, not an object each.
            tail = self._tail
            if tail is None:
                self._tail = bytearray(data)
            else:
                tail += data
        else:
            if self._tail is not None:
                self._chunks.append(bytes(self._tail))
                self._tail = None
            self._chunks.append(data)
        buffered = self._buffered = self._buffered + n
        if buffered > self.peak_buffered:
            self.peak_buffered = buffered
        if buffered > READ_HIGH_WATER:
            self._conn._pause(_PAUSE_BODY)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _drop_buffer(self) -> None:
        self._chunks.clear()
        self._tail = None
        self._buffered = 0

    def _finish_body(self) -> None:
        self._complete = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: ClientRequestError) -> None:
        if self._complete:
            return
        self._error = exc
        self._drop_buffer()
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


class Response:
    """What a handler returns: a status, headers, and a body of bytes or an async iterable
    of bytes (streamed; chunked unless the headers give a Content-Length)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, body: Body = b"", status: int = 200, headers: HeaderPairs | None = None,
                 *, content_type: str | bytes | None = None) -> None:
        self.body = body
        self.status = status
        if content_type is not None:
            hs = list(headers) if headers else []
            hs.append((b"content-type", _b(content_type)))
            self.headers: HeaderPairs = hs
        else:
            self.headers = headers if headers is not None else ()

    def __repr__(self) -> str:
        return f"<Response {self.status}>"

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: HeaderPairs | None = None) -> Response:
        """A JSON response (encoded with msgspec)."""
        return cls(msgspec.json.encode(data), status, headers, content_type=b"application/json")

    @classmethod
    def error(cls, status: int, reason: str, message: str, *, layer: str = "gateway",
              headers: HeaderPairs | None = None) -> Response:
        """Shoal's error answer: ``{"error", "layer", "reason"}`` and a ``shoal-error`` header."""
        hs = list(headers) if headers else []
        hs.append((b"content-type", b"application/json"))
        hs.append((b"shoal-error", f"{layer}; {reason}".encode("latin-1")))
        return cls(_error_body(status, reason, message, layer), status, hs)


def _header_lines(headers: HeaderPairs, first: bytes) -> tuple[bytes, int, bytes | None, bytes]:
    """``first`` and the handler's header lines, without the server's own (framing,
    persistence), as one bytes; how many lines; the handler's Content-Length; the ``date``
    line unless the handler gave one. Bytes names and values are taken as they are (a str
    or another value is the slow case: found by the join, encoded, then done again)."""
    parts = [first]
    handler_length: bytes | None = None
    date = _date_line()
    for name, value in headers:
        if len(name) in _FRAMING_NAME_LENGTHS:
            low = name.lower()
            if low in _SERVER_HEADERS:  # framing and persistence are the server's
                if low == b"content-length":
                    handler_length = value  # type: ignore[assignment]
                continue
            if low == b"date":
                date = b""
        parts += (name, b": ", value, b"\r\n")
    try:
        block = b"".join(parts)
    except TypeError:
        return _header_lines(_as_bytes(headers), first)  # once: all are bytes now
    return block, len(parts) // 4 + 1, handler_length, date


def _as_bytes(headers: HeaderPairs) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in headers:
        if type(value) is not bytes:
            value = value.encode("latin-1") if isinstance(value, str) else str(value).encode()
        out.append((_b(name), value))
    return out


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")
    return line


_date_cache: list[Any] = [0.0, b""]  # [next second, the line]


def _date_line() -> bytes:
    """The ``date`` header line, formatted once a second."""
    now = time.time()
    if now >= _date_cache[0]:
        second = int(now)
        _date_cache[0] = second + 1.0
        _date_cache[1] = b"date: " + formatdate(second, usegmt=True).encode() + b"\r\n"
    return _date_cache[1]  # type: ignore[no-any-return]


# -- the connection --------------------------------------------------------------------------
class _ServerConnection(asyncio.BaseProtocol):
    """One client connection: parses requests, checks them, runs the handler, writes answers.

    A streaming protocol (``data_received``); TLS connections are ``_TlsServerConnection``,
    a ``BufferedProtocol`` that decrypts into a reused buffer (see ``shoal.mesh.tls_reads``).
    """

    __slots__ = (
        "_active",
        "_closed",
        "_closing",
        "_dead",
        "_discarded",
        "_drain_waiter",
        "_eof",
        "_fast",
        "_feed_len",
        "_feed_seq",
        "_feeding",
        "_framing",
        "_handler",
        "_headers",
        "_host_count",
        "_host_value",
        "_in_head",
        "_limits",
        "_lingering",
        "_loop",
        "_max_head",
        "_max_headers",
        "_parser",
        "_pause_mask",
        "_queue",
        "_raw_head",
        "_raw_remaining",
        "_read_deadline",
        "_read_kind",
        "_req",
        "_requests",
        "_seq",
        "_server",
        "_start_pending",
        "_timeouts",
        "_trailer_size",
        "_transport",
        "_url",
        "_write_deadline",
        "_write_paused",
        "client",
        "peer_identity",
    )

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = server._loop
        self._handler = server.handler
        self._fast = server._fast
        limits = self._limits = server.limits
        self._max_head = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._timeouts = (_INF, limits.keep_alive_timeout, limits.header_timeout,
                          limits.body_timeout, LINGER_SECONDS)
        self._transport: asyncio.Transport = None  # type: ignore[assignment]
        self._parser = httptools.HttpRequestParser(self)
        self.client: Any = None
        self._closed = False
        self._closing = False  # close after the response in progress (shutdown)
        self._dead = False  # nothing more is parsed (refusal, upgrade, EOF)
        self._lingering = False
        self._eof = False
        self._feeding = False
        self._start_pending = False
        self._pause_mask = 0
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_kind = _HEAD
        self._read_deadline = _INF
        self._write_deadline = _INF
        self._active: Request | ClientRequestError | None = None  # or _WRITE_WAIT
        self._queue: collections.deque[Request | ClientRequestError] = collections.deque()
        self._req: Request | None = None  # the request whose body is being received
        self._requests = 0
        self._seq = 0
        self._raw_remaining = 0
        self._raw_head = 0
        self._discarded = 0
        self._trailer_size = 0
        self._in_head = False
        self._url = b""
        self._headers = Headers()
        self._feed_seq = 0
        self._feed_len = 0
        self._host_count = 0
        self._host_value: bytes | None = None
        self._framing: list[tuple[bytes, bytes]] | None = None

    # -- asyncio protocol callbacks -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        server = self._server
        server._conns.add(self)
        self.client = transport.get_extra_info("peername")
        self.peer_identity = spiffe_id_of_peercert(transport.get_extra_info("peercert"))
        self._arm_read(_HEAD)
        if len(server._conns) > self._limits.max_connections:
            server.refused_connections += 1
            self._refuse(ClientRequestError(
                503, "max-connections",
                f"the gateway has reached its limit of {self._limits.max_connections} "
                "connections; retry later"))
        elif server._shutting:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._dead:
            return  # refused, upgraded or lingering: late bytes are dropped
        if self._read_kind == _BODY:
            self._read_deadline = self._loop.time() + self._limits.body_timeout
        if self._raw_remaining:
            self._raw_body(data)
            return
        seq = self._feed_seq = self._seq
        self._feed_len = len(data)
        self._feeding = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ClientRequestError):
                self._refuse(cause)
            elif isinstance(cause, _DropConnection):
                self._close_gracefully()
            else:
                log.error("gateway: internal error parsing a request from %s", self.client,
                          exc_info=cause or exc)
                self._refuse(ClientRequestError(500, "internal-error",
                                                "the gateway failed to parse the request"))
        except httptools.HttpParserUpgrade:
            self._dead = True  # what follows an upgrade request is not HTTP/1.1 for us
            self._pause(_PAUSE_DEAD)
        except httptools.HttpParserError as exc:
            self._refuse(_malformed(exc))
        finally:
            self._feeding = False
        if self._in_head and seq == self._seq and not self._dead:
            # This whole read belongs to a head that began in an earlier read: a bound on
            # what httptools accumulates before it reports a header.
            self._raw_head += len(data)
            if self._raw_head > self._max_head:
                self._refuse(self._head_too_large())
        if self._start_pending:
            self._start_pending = False
            active = self._active
            if active is not None and active is not _WRITE_WAIT:
                self._start(active)
        if self._queue:
            self._pause(_PAUSE_PIPELINE)

    def _raw_body(self, data: bytes) -> None:
        """Body bytes of a large Content-Length request, past the parser."""
        req = self._req
        remaining = self._raw_remaining - len(data)
        if remaining > 0:
            self._raw_remaining = remaining
            if req is not None:
                try:
                    self._body_bytes(req, data)
                except _DropConnection:
                    self._close_gracefully()
            return
        rest = data[len(data) + remaining:] if remaining else b""
        if remaining:
            data = data[:len(data) + remaining]
        self._raw_remaining = 0
        self._parser = httptools.HttpRequestParser(self)  # the old one is mid-body
        if req is not None:
            try:
                self._body_bytes(req, data)
            except _DropConnection:
                self._close_gracefully()
                return
        self.on_message_complete()
        if rest and not self._dead and not self._closed:
            self.data_received(rest)

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._lingering:
            return False
        if self._in_head or self._req is not None:
            self._refuse(ClientRequestError(
                400, "incomplete-request", "the client closed its side mid-request"))
            return True  # keep the write side open for the answer
        if self._active is not None or self._queue:
            self._dead = True
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._dead = True
        gone = ClientRequestError(400, "client-disconnected", "the client disconnected")
        req = self._req
        if req is not None:
            req._fail(gone)
        active = self._active
        if type(active) is Request:
            active._fail(gone)
            task = active._task
            if task is not None and not task.done():
                task.cancel()
        self._queue.clear()
        dw = self._drain_waiter
        if dw is not None and not dw.done():
            dw.set_exception(ConnectionResetError("the client disconnected"))
        self._server._forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        dw = self._drain_waiter
        if dw is not None and not dw.done():
            dw.set_result(None)
        if self._active is _WRITE_WAIT:
            self._write_deadline = _INF
            self._resume(_PAUSE_WRITE)
            self._next()

    # -- httptools callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._queue and len(self._queue) >= self._limits.max_pipelined:
            raise ClientRequestError(
                503, "pipeline-limit",
                f"more than {self._limits.max_pipelined} pipelined requests are waiting")
        self._seq += 1
        self._in_head = True
        self._raw_head = 0
        self._url = b""
        self._headers = Headers()
        self._host_count = 0
        self._host_value = None
        self._framing = None
        if self._read_kind != _HEAD:
            self._read_kind = _HEAD
            self._read_deadline = (_INF if self._pause_mask
                                   else self._loop.time() + self._timeouts[_HEAD])

    def on_url(self, url: bytes) -> None:
        url = self._url = self._url + url
        if len(url) > self._max_head:
            raise ClientRequestError(
                414, "target-too-long", f"request target exceeds {self._max_head} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # The size is checked when the head is complete: until then one read (at most
        # 256 KiB) bounds what accumulates, and data_received bounds the rest.
        if self._in_head:
            headers = self._headers
            headers.append((name, value))
            if len(headers) > self._max_headers:  # here, not later: tiny headers cost memory
                raise ClientRequestError(431, "too-many-headers",
                                         f"request has more than {self._max_headers} header lines")
            if len(name) in _LOOKED_AT:  # host, content-length, transfer-encoding, expect
                low = name.lower()
                if low == b"host":
                    self._host_count += 1
                    self._host_value = value
                elif low in _FRAMING_NAMES:
                    if self._framing is None:
                        self._framing = []
                    self._framing.append((low, value))
            return
        self._trailer_size += len(name) + len(value) + 4  # a trailer: checked, then dropped
        if self._trailer_size > self._max_head:
            raise self._head_too_large()

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise ClientRequestError(505, "version-not-supported",
                                     f"HTTP/{version} is not supported: use HTTP/1.1")
        url = self._url
        headers = self._headers
        limits = self._limits
        if self._seq == self._feed_seq or self._feed_len > self._max_head:
            # The head did not come whole in one read no larger than the limit: measure it.
            size = len(url) + 20 + sum([len(n) + len(v) + 4 for n, v in headers])
            if size > self._max_head:
                raise self._head_too_large()
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("latin-1")
        if method == "CONNECT":
            raise ClientRequestError(501, "connect-not-supported",
                                     "CONNECT is not supported by the gateway")
        hosts = self._host_count
        if hosts != 1 and (hosts or version == "1.1"):
            raise ClientRequestError(400, "duplicate-host" if hosts else "missing-host",
                                     "an HTTP/1.1 request needs exactly one Host header, "
                                     f"got {hosts}")
        framing = self._framing
        if framing is None:
            chunked, length, expect_continue = False, None, False
        else:
            chunked, length, expect_continue = _check_framing(framing, version, limits)
        keep_alive = parser.should_keep_alive()
        if parser.should_upgrade():
            if chunked or length:
                raise ClientRequestError(400, "upgrade-with-body",
                                         "protocol upgrade requests must not carry a body")
            keep_alive = False  # answered as plain HTTP; the connection ends after it
        self._requests += 1
        if self._closing or (limits.max_requests_per_connection
                             and self._requests >= limits.max_requests_per_connection):
            keep_alive = False
        req = Request(self, method, url, version, headers, keep_alive, length, chunked,
                      self._host_value)
        if url[:1] != b"/":
            if url != b"*" or method != "OPTIONS":
                req._split = _split_absolute(url)  # or 400: CONNECT's authority-form is gone
        self._req = req
        if chunked or length:
            req._expect_continue = expect_continue
            self._arm_read(_BODY)
            if length is not None and length >= RAW_BODY_MIN:
                self._raw_remaining = length  # later reads bypass the parser
        else:
            self._read_kind = _NONE
            self._read_deadline = _INF
        self._trailer_size = 0
        if self._active is None:
            self._active = req
            self._start_pending = True  # started once this read is parsed
        else:
            self._queue.append(req)

    def on_body(self, body: bytes) -> None:
        if self._raw_remaining:
            self._raw_remaining -= len(body)
        req = self._req
        if req is not None:
            self._body_bytes(req, body)

    def on_message_complete(self) -> None:
        req = self._req
        self._req = None
        self._raw_remaining = 0
        if self._read_kind == _BODY:
            self._arm_read(_NONE)
        if req is None:
            return
        req._finish_body()
        if req is self._active and req._responded:
            self._next()

    def _body_bytes(self, req: Request, data: bytes) -> None:
        if req._discard:
            self._discarded += len(data)
            if self._discarded > DISCARD_MAX:
                raise _DropConnection
            return
        received = req._received + len(data)
        if received > self._limits.max_body_bytes:
            raise ClientRequestError(413, "body-too-large", "request body exceeds the limit "
                                     f"of {self._limits.max_body_bytes} bytes")
        req._received = received
        req._feed(data)

    def _head_too_large(self) -> ClientRequestError:
        return ClientRequestError(431, "header-too-large",
                                  f"request header block exceeds {self._max_head} bytes")

    # -- flow control and deadlines ----------------------------------------------------------
    def _pause(self, reason: int) -> None:
        if self._lingering:
            return  # a closing connection reads (and drops) until the client's EOF
        mask = self._pause_mask
        self._pause_mask = mask | reason
        if not mask:
            self._read_deadline = _INF
            t = self._transport
            if not t.is_closing():
                t.pause_reading()

    def _resume(self, reason: int) -> None:
        mask = self._pause_mask
        if not mask & reason:
            return
        mask = self._pause_mask = mask & ~reason
        if not mask:
            t = self._transport
            if not t.is_closing():
                t.resume_reading()
            self._arm_read(self._read_kind)

    def _arm_read(self, kind: int) -> None:
        self._read_kind = kind
        if kind == _NONE or self._pause_mask:
            self._read_deadline = _INF
        else:
            self._read_deadline = self._loop.time() + self._timeouts[kind]

    def _read_timeout(self) -> None:
        """Called by the server's sweep when the read deadline has passed."""
        kind = self._read_kind
        self._read_deadline = _INF
        if kind == _IDLE:
            self._transport.close()
        elif kind == _HEAD:
            self._refuse(ClientRequestError(
                408, "header-timeout", "the request head did not arrive within "
                f"{self._limits.header_timeout:g}s"))
        elif kind == _BODY:
            self._refuse(ClientRequestError(
                408, "body-timeout", "no request body bytes arrived for "
                f"{self._limits.body_timeout:g}s"))
        elif kind == _LINGER:
            t = self._transport
            if t.get_write_buffer_size():
                t.abort()
            else:
                t.close()

    def _write_timeout(self) -> None:
        self._write_deadline = _INF
        log.info("gateway: dropping %s: response unread for %gs", self.client,
                 self._limits.send_timeout)
        self._transport.abort()

    # -- refusals ----------------------------------------------------------------------------
    def _refuse(self, err: ClientRequestError) -> None:
        """Stop parsing; answer ``err`` in its place in the order, then close."""
        if self._closed or self._lingering:
            return
        self._dead = True
        self._in_head = False
        self._arm_read(_NONE)
        self._pause(_PAUSE_DEAD)
        req, self._req = self._req, None
        self._raw_remaining = 0
        if req is not None:  # refused mid-body: the request was handed over already
            req._refusal = err
            req._fail(err)
            if req is not self._active:
                return  # queued: answered with the refusal when its turn comes
            if req._responded:
                self._close_gracefully()
            elif not req._head_sent:
                task = req._task
                if task is not None and not task.done():
                    task.cancel()  # _run answers the refusal
            else:
                self._closing = True  # a response is under way: close after it
            return
        if self._active is None:
            self._active = err
            self._start(err)
        else:
            self._queue.append(err)

    def _write_refusal(self, err: ClientRequestError, req: Request | None = None) -> None:
        if req is not None:
            req._head_sent = req._responded = True
        t = self._transport
        if self._closed or t.is_closing():
            return
        body = _error_body(err.status, err.reason, err.message, "gateway")
        t.write(b"".join((
            _status_line(err.status), _date_line(),
            b"content-type: application/json\r\nshoal-error: gateway; ", err.reason.encode(),
            b"\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body), body)))
        self._close_gracefully()

    def _close_gracefully(self) -> None:
        """Shut our side down, read and drop the client's late bytes for a moment, close."""
        if self._lingering or self._closed:
            return
        self._lingering = self._dead = True
        self._queue.clear()  # pipelined requests after a close are not answered
        t = self._transport
        if t.is_closing():
            return
        if self._eof or self._server._shutting or not t.can_write_eof():
            t.close()  # the client already shut its side, or the server is going away
            return
        try:
            t.write_eof()
        except (OSError, RuntimeError):
            t.abort()
            return
        if self._pause_mask:
            self._pause_mask = 0
            t.resume_reading()
        self._read_kind = _LINGER
        self._read_deadline = self._loop.time() + (
            self._limits.send_timeout if t.get_write_buffer_size() else LINGER_SECONDS)

    # -- dispatch ----------------------------------------------------------------------------
    def _start(self, item: Request | ClientRequestError) -> None:
        """Answer ``item`` (already the active one): run the handler or write the refusal."""
        if self._feeding:
            self._start_pending = True
            return
        if type(item) is not Request:
            self._write_refusal(item)  # type: ignore[arg-type]
            return
        req: Request = item  # type: ignore[assignment]
        if req._refusal is not None:
            self._write_refusal(req._refusal, req)
            return
        if self._fast is not None and req._complete:
            self._server._soon(self._start_fast, req)  # with the others of this loop turn
            return
        try:
            result = self._handler(req)
        except ClientRequestError as exc:
            self._write_refusal(exc, req)
            return
        except Exception:
            log.exception("gateway: handler failed on %s %r", req.method, req.target)
            result = _internal_error("handler-error", "the request handler failed")
        self._answer(req, result)

    def _start_fast(self, req: Request) -> None:
        """Run the fast handler for ``req`` (deferred by ``_start``)."""
        if self._closed or req is not self._active:
            return
        try:
            result = self._fast(req, self._answer_soon)  # type: ignore[misc]
            if getattr(result, "answer_later", False) is True:
                req._task = result  # cancelled like a task if the client leaves
                return
        except ClientRequestError as exc:
            self._write_refusal(exc, req)
            return
        except Exception:
            log.exception("gateway: handler failed on %s %r", req.method, req.target)
            result = _internal_error("handler-error", "the request handler failed")
        self._answer(req, result)

    def _answer_soon(self, req: Request, result: Any) -> None:
        """``_answer``, deferred with the others of this loop turn (the fast handler's)."""
        self._server._soon(self._answer, req, result)

    def _answer(self, req: Request, result: Any) -> None:
        """Write the handler's ``result`` for ``req`` (the active request): a response at
        once, or in a task if it is awaitable or streams. The fast handler calls it later."""
        if self._closed or req is not self._active or req._head_sent:
            if hasattr(result, "close"):  # a coroutine, or an upstream response
                with contextlib.suppress(Exception):
                    result.close()
            return
        req._task = None
        if type(result) is not Response and hasattr(result, "__await__"):
            req._task = self._loop.create_task(self._run(req, result))
            return
        streaming = self._respond(req, result)
        if streaming is not None:
            req._task = self._loop.create_task(streaming)

    async def _run(self, req: Request, pending: Awaitable[Any]) -> None:
        """The request's task: await the handler, then write its response."""
        try:
            resp = await pending
        except asyncio.CancelledError:
            if req._refusal is None or self._closed:
                return
            resp = None
        except ClientRequestError as exc:
            if req._refusal is None:
                req._refusal = exc
            resp = None
        except Exception:
            log.exception("gateway: handler failed on %s %r", req.method, req.target)
            resp = _internal_error("handler-error", "the request handler failed")
        if req._refusal is not None:
            if not req._head_sent:
                self._write_refusal(req._refusal, req)
            return
        streaming = self._respond(req, resp)
        if streaming is not None:
            await streaming

    def _respond(self, req: Request, resp: Any) -> Awaitable[None] | None:
        """Write ``resp``; for a streamed body return the coroutine that writes the rest."""
        if self._closed:
            _close_quietly(resp)
            return None
        try:
            head, body, mode, length = self._encode(req, resp)
        except Exception as exc:
            log.error("gateway: invalid response to %s %r: %s", req.method, req.target, exc)
            _close_quietly(resp)
            head, body, mode, length = self._encode(
                req, _internal_error("invalid-response", f"the handler's response is "
                                     f"invalid: {exc}"))
        t = self._transport
        req._head_sent = True
        if mode == _BYTES:
            t.write(head)
            if body:
                t.write(body)  # type: ignore[arg-type]
        elif mode == _EMPTY:
            t.write(head)
            _close_quietly(resp)
        else:
            return self._stream(req, resp, head, body, mode, length)  # type: ignore[arg-type]
        self._finish_response(req)
        return None

    def _encode(self, req: Request, resp: Any) -> tuple[bytes, Any, int, int]:
        """The response head (with a small bytes body appended), the body left to write,
        its mode and, for a fixed-length stream, its length."""
        if type(resp) is Response:
            status, headers, body = resp.status, resp.headers, resp.body
        else:
            status = resp.status
            headers = getattr(resp, "headers", None) or ()
            body = getattr(resp, "body", _MISSING)
            if body is _MISSING:
                aiter = getattr(resp, "aiter_bytes", None)
                body = aiter() if aiter is not None else b""
        if type(status) is not int:
            if not isinstance(status, int) or isinstance(status, bool):
                raise ValueError(f"status {status!r} is not an int")
            status = int(status)  # an HTTPStatus
        if status < 200 or status > 999:
            raise ValueError(f"status {status} is not from 200 to 999")
        if type(headers) is dict:
            headers = headers.items()
        if type(headers) is EncodedHeaders:  # lines without framing (the proxy's relay)
            block = _status_line(status) + headers.block
            lines = headers.lines + 2  # the status line and the blank line
            length_given = headers.content_length
            handler_length = None if length_given is None else b"%d" % length_given
            date = b"" if headers.date else _date_line()
        else:
            block, lines, handler_length, date = _header_lines(headers, _status_line(status))
            lines += 1  # the blank line
        if body is None:
            body = b""
        keep_alive = req.keep_alive and not self._closing
        length = 0
        if isinstance(body, _BYTES_LIKE):
            mode = _BYTES
            if status == 204 or status == 304 or req.method == "HEAD":
                if status == 204 or (handler_length is None and status == 304):
                    framing = b""
                else:
                    framing = b"content-length: %s\r\n" % (handler_length or b"%d" % len(body))
                body = b""
            else:
                framing = b"content-length: %d\r\n" % len(body)
        elif not hasattr(body, "__aiter__"):
            raise ValueError(f"body must be bytes or an async iterable of bytes, not "
                             f"{type(body).__name__}")
        elif status == 204 or status == 304 or req.method == "HEAD":
            mode = _EMPTY
            framing = (b"content-length: %s\r\n" % handler_length
                       if handler_length is not None and status != 204 else b"")
        elif handler_length is not None:
            if not handler_length.isdigit():
                raise ValueError(f"Content-Length {handler_length!r} is not a number")
            mode = _FIXED
            length = int(handler_length)
            framing = b"content-length: %s\r\n" % handler_length
        elif req.http_version == "1.1":
            mode = _CHUNKED
            framing = b"transfer-encoding: chunked\r\n"
        else:
            mode = _TO_EOF
            framing = b""
            keep_alive = False
        if keep_alive and not req._complete and (
                req._expect_continue or (req.content_length is not None
                                         and req.content_length - req._received > DISCARD_MAX)):
            keep_alive = False  # the rest of the body is not worth reading to keep the socket
        req.keep_alive = keep_alive
        if not keep_alive:
            persistence = b"connection: close\r\n"
        elif req.http_version == "1.0":
            persistence = b"connection: keep-alive\r\n"
        else:
            persistence = b""
        lines += (date != b"") + (framing != b"") + (persistence != b"")
        if mode == _BYTES and len(body) <= 16384:
            size = len(body)
            head = b"".join((block, date, framing, persistence, b"\r\n", body))
            body = b""
            end = len(head) - size
            ok = head.count(b"\n", 0, end) == lines and head.count(b"\r", 0, end) == lines
        else:
            head = b"".join((block, date, framing, persistence, b"\r\n"))
            ok = head.count(b"\n") == lines and head.count(b"\r") == lines
        if not ok:
            raise ValueError("CR or LF in a response header name or value")
        return head, body, mode, length

    async def _stream(self, req: Request, resp: Any, head: bytes, body: AsyncIterable[bytes],
                      mode: int, length: int) -> None:
        """Write a streamed body: fixed-length, chunked or to EOF, pausing on backpressure."""
        t = self._transport
        ok = False
        try:
            t.write(head)
            sent = 0
            async for chunk in body:
                if self._closed:
                    raise ConnectionResetError("the client disconnected")
                n = len(chunk)
                if not n:
                    continue
                sent += n
                if mode == _CHUNKED:
                    if n <= 16384:
                        t.write(b"".join((b"%x\r\n" % n, chunk, b"\r\n")))
                    else:
                        t.writelines((b"%x\r\n" % n, chunk, b"\r\n"))
                else:
                    if mode == _FIXED and sent > length:
                        raise ValueError(f"response body longer than its Content-Length {length}")
                    t.write(chunk)
                if self._write_paused:
                    await self._drain()
            if mode == _CHUNKED:
                t.write(b"0\r\n\r\n")
            elif mode == _FIXED and sent != length:
                raise ValueError(f"response body of {sent} bytes, Content-Length {length}")
            ok = True
        except (asyncio.CancelledError, ConnectionError):
            pass  # the client left (or the server is going away): nothing to answer
        except Exception as exc:
            log.error("gateway: response to %s %r failed mid-body: %r", req.method, req.target,
                      exc)
        finally:
            for target in (body, resp):
                aclose = getattr(target, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
        if ok and not self._closed:
            if mode == _TO_EOF:
                req.keep_alive = False
            self._finish_response(req)
        elif not self._closed:
            t.abort()  # a response cut short: the client must see it is incomplete

    async def _drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("the client disconnected")
        waiter = self._drain_waiter = self._loop.create_future()
        self._write_deadline = self._loop.time() + self._limits.send_timeout
        try:
            await waiter
        finally:
            self._drain_waiter = None
            self._write_deadline = _INF

    def _send_continue(self, req: Request) -> None:
        t = self._transport
        if req is self._active and not req._head_sent and not t.is_closing():
            t.write(_CONTINUE)

    def _finish_response(self, req: Request) -> None:
        """The response to the active request is written: go on with the next one."""
        req._responded = True
        if req._buffered:  # body the handler did not read: drop it, and read on
            req._drop_buffer()
        if self._pause_mask & _PAUSE_BODY:
            self._resume(_PAUSE_BODY)  # a queued request's buffer re-pauses on its next read
        if not req.keep_alive or self._closing:
            self._close_gracefully()
        elif req._complete or self._dead:
            self._next()  # the next request, a queued refusal, or the close after one
        else:  # answered before the whole body arrived: drop the rest, keep the connection
            req._discard = True
            self._discarded = 0

    def _next(self) -> None:
        self._active = None
        if self._closed:
            return
        if self._write_paused:
            # The client is not reading what we wrote: take no new request until it does
            # (a client pipelining without reading must not grow our buffers).
            self._active = _WRITE_WAIT
            self._pause(_PAUSE_WRITE)
            self._write_deadline = self._loop.time() + self._limits.send_timeout
            return
        if self._closing:  # shutting down: what was pipelined after this is not answered
            self._close_gracefully()
            return
        if self._queue:
            item = self._active = self._queue.popleft()
            if not self._queue:
                self._resume(_PAUSE_PIPELINE)
            self._start(item)
            return
        if self._dead:
            self._close_gracefully()
            return
        self._resume(_PAUSE_PIPELINE)
        if not self._in_head:
            self._arm_read(_IDLE)

    # -- shutdown ----------------------------------------------------------------------------
    def _begin_shutdown(self) -> None:
        """Close now if idle; otherwise close after the request in progress."""
        self._closing = True
        t = self._transport
        if self._lingering:
            if not t.get_write_buffer_size():
                t.close()  # the answer is out: no need to wait for the client's EOF
        elif self._active is None and not self._in_head and not self._queue:
            t.close()
        elif type(self._active) is Request and not self._active._head_sent:
            self._active.keep_alive = False

    def _abort(self) -> None:
        active = self._active
        if type(active) is Request and active._task is not None:
            active._task.cancel()
        self._transport.abort()


class _TlsServerConnection(TlsReads, _ServerConnection, asyncio.BufferedProtocol):
    """A ``_ServerConnection`` over TLS."""

    __slots__ = ()


class _DropConnection(Exception):
    """Raised in a parser callback to end the connection without an answer."""


_WRITE_WAIT: Any = object()
"""Stands in for the active request while the client catches up on reading."""


_MISSING: Any = object()


def _internal_error(reason: str, message: str) -> Response:
    return Response.error(500, reason, message)


def _close_quietly(resp: Any) -> None:
    """Release a response object that will not be streamed (an upstream response)."""
    close = getattr(resp, "close", None)
    if close is not None and not isinstance(resp, Response):
        with contextlib.suppress(Exception):
            close()


def _fast_handler_of(handler: Handler) -> FastHandler | None:
    """The fast handler that goes with ``handler``: ``obj.fast_handle`` when ``handler`` is
    the bound method ``obj.handle`` (the gateway's), else None."""
    owner = getattr(handler, "__self__", None)
    if owner is None or getattr(handler, "__name__", None) != "handle":
        return None
    return getattr(owner, "fast_handle", None)


def _remove_stale_socket(path: str) -> None:
    """Remove a unix socket left by an earlier run (never a regular file or directory)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


# -- the server ------------------------------------------------------------------------------
class HttpServer:
    """An HTTP/1.1 server: ``handler(request)`` answers each request that passed the checks."""

    def __init__(self, handler: Handler, *, limits: ServerLimits | None = None,
                 ssl: _ssl.SSLContext | None = None) -> None:
        self._fast: FastHandler | None = None
        self.handler = handler
        self.ssl = ssl  # TLS on every listener (shoal.mesh.security builds mesh contexts)
        self.limits = limits if limits is not None else ServerLimits()
        self.refused_connections = 0
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._conns: set[_ServerConnection] = set()
        self._shutting = False
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Future[None] | None = None
        self._later: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        shortest = min(self.limits.header_timeout, self.limits.keep_alive_timeout,
                       self.limits.body_timeout, self.limits.send_timeout, LINGER_SECONDS)
        self._tick = min(max(shortest / 4, 0.02), 1.0)

    @property
    def handler(self) -> Handler:
        """What answers requests (on connections opened after it was set)."""
        return self._handler

    @handler.setter
    def handler(self, handler: Handler) -> None:
        self._handler = handler
        self._fast = _fast_handler_of(handler)

    @property
    def connections(self) -> int:
        """Open client connections."""
        return len(self._conns)

    @property
    def addresses(self) -> list[tuple[str, int] | str]:
        """Where the server listens: ``(host, port)`` pairs and unix socket paths."""
        out: list[tuple[str, int] | str] = []
        for srv in self._servers:
            for sock in srv.sockets:
                name = sock.getsockname()
                out.append(name if isinstance(name, str) else (name[0], name[1]))
        return out

    @property
    def port(self) -> int:
        """The first TCP port listened on (useful with port 0)."""
        for addr in self.addresses:
            if isinstance(addr, tuple):
                return addr[1]
        raise RuntimeError("the server does not listen on TCP")

    async def start(self, host: str | None = None, port: int | None = None, *,
                    sock: socket.socket | None = None, path: str | None = None,
                    reuse_port: bool = False, backlog: int = 1024) -> None:
        """Listen on ``host:port``, an already bound ``sock``, or the unix socket ``path``;
        may be called again to listen on more addresses."""
        if self._shutting:
            raise RuntimeError("the server was shut down")
        loop = self._loop = asyncio.get_running_loop()
        factory: Callable[[], _ServerConnection] = self._factory
        tls: dict[str, Any] = {}
        if self.ssl is not None:
            factory = self._tls_factory
            tls = {"ssl": self.ssl, "ssl_handshake_timeout": self.limits.header_timeout or None}

        if path is not None:
            _remove_stale_socket(path)
            srv = await loop.create_unix_server(factory, path, backlog=backlog, **tls)
            self._unix_paths.append(path)
        elif sock is not None:
            if sock.family == socket.AF_UNIX:
                srv = await loop.create_unix_server(factory, sock=sock, backlog=backlog, **tls)
            else:
                srv = await loop.create_server(factory, sock=sock, backlog=backlog, **tls)
        else:
            srv = await loop.create_server(factory, host, port, backlog=backlog,
                                           reuse_port=reuse_port or None, **tls)
        self._servers.append(srv)
        if self._sweep_handle is None:
            self._sweep_handle = loop.call_later(self._tick, self._sweep)

    def _factory(self) -> _ServerConnection:
        return _ServerConnection(self)

    def _tls_factory(self) -> _ServerConnection:
        return _TlsServerConnection(self)

    async def adopt(self, sock: socket.socket, *, ssl: _ssl.SSLContext | None = None) -> None:
        """Serve one connection accepted elsewhere (TLS with ``ssl``): the hook of
        ``shoal.mesh.security.PermissiveListener``."""
        if self._shutting:
            raise RuntimeError("the server was shut down")
        self._loop = asyncio.get_running_loop()
        if self._sweep_handle is None:
            self._sweep_handle = self._loop.call_later(self._tick, self._sweep)
        extra: dict[str, Any] = {}
        if ssl is not None:
            extra["ssl_handshake_timeout"] = self.limits.header_timeout or None
        factory = self._factory if ssl is None else self._tls_factory
        await self._loop.connect_accepted_socket(factory, sock, ssl=ssl, **extra)

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting, close idle connections, let requests in progress finish within
        ``grace`` seconds (their responses say ``connection: close``), then close the rest."""
        if self._loop is None:
            return
        first = not self._shutting
        self._shutting = True
        if first:
            for srv in self._servers:
                srv.close()
            for conn in list(self._conns):
                conn._begin_shutdown()
        if self._conns:
            self._all_closed = self._all_closed or self._loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._all_closed), grace)
        if self._conns:
            log.warning("gateway: %d connection(s) still busy after %gs grace: closing them",
                        len(self._conns), grace)
            for conn in list(self._conns):
                conn._abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._all_closed), 1.0)  # type: ignore[arg-type]
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths.clear()

    async def __aenter__(self) -> HttpServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    def _forget(self, conn: _ServerConnection) -> None:
        self._conns.discard(conn)
        if not self._conns and self._all_closed is not None and not self._all_closed.done():
            self._all_closed.set_result(None)

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Call ``fn(*args)`` once the loop has run this turn's I/O callbacks, together
        with the others deferred in this turn (one loop callback for all of them). The fast
        path's writes are so grouped as the coroutine path's are by the task scheduler: a
        peer woken by the first finds the rest ready, and its answers come back together."""
        later = self._later
        later.append((fn, args))
        if len(later) == 1:
            self._loop.call_soon(self._run_later)

    def _run_later(self) -> None:
        later, self._later = self._later, []
        for fn, args in later:
            try:
                fn(*args)
            except Exception:  # pragma: no cover - a bug must not stop the others
                log.exception("gateway: deferred %r failed", fn)

    def _sweep(self) -> None:
        """Expire deadlines of every connection (one timer for the whole server)."""
        now = self._loop.time()
        for conn in list(self._conns):
            try:
                if now >= conn._read_deadline:
                    conn._read_timeout()
                if now >= conn._write_deadline:
                    conn._write_timeout()
            except Exception:  # pragma: no cover - a bug must not stop the sweep
                log.exception("gateway: timeout handling failed for %s", conn.client)
                conn._transport.abort()
        self._sweep_handle = self._loop.call_later(self._tick, self._sweep)
