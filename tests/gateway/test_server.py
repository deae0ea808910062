"""shoal.gateway.server against raw sockets, on asyncio and uvloop: every limit and smuggling
case is answered by the server (status, ``shoal-error`` header, JSON body), never reaches the
handler, and closes the connection; pipelining keeps order; bodies stream both ways with
bounded buffers; timeouts (slowloris), graceful shutdown, and a hypothesis fuzz test of the
request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.gateway import ClientRequestError, HttpServer, Request, Response, ServerLimits
from shoal.gateway.server import READ_HIGH_WATER

MiB = 1024 * 1024
ONE_READ = 256 * 1024  # the most one socket read delivers (asyncio and uvloop)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    """Run a scenario coroutine function on a fresh loop of the parametrized kind."""
    runner = asyncio.run if request.param == "asyncio" else uvloop.run

    def _run(scenario: Callable[[], Awaitable[Any]]) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(30):
                return await scenario()

        return runner(bounded())

    return _run


# -- the handler under test and the server -------------------------------------------------
class Recorder:
    """A handler that records what it was given and what it fully read, and echoes it."""

    def __init__(self, delays: dict[str, float] | None = None, read_body: bool = True) -> None:
        self.delays = delays or {}
        self.read_body = read_body
        self.started: list[str] = []  # targets the handler was called for
        self.seen: list[tuple[str, str, bytes]] = []  # (method, target, body) read completely
        self.requests: list[Request] = []

    async def __call__(self, req: Request) -> Response:
        target = req.target.decode("latin-1")
        self.started.append(target)
        self.requests.append(req)
        body = await req.body() if self.read_body else b""
        delay = self.delays.get(req.path)
        if delay:
            await asyncio.sleep(delay)
        self.seen.append((req.method, target, body))
        return Response.json({"method": req.method, "target": target, "path": req.path,
                              "query": req.query, "host": req.host,
                              "body": body.decode("latin-1")})


@contextlib.asynccontextmanager
async def serving(handler: Any, **limits: Any) -> AsyncIterator[HttpServer]:
    server = HttpServer(handler, limits=ServerLimits(**limits))
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.shutdown(grace=1.0)


# -- a raw client ----------------------------------------------------------------------------
@dataclass
class Wire:
    """One response as it came off the wire."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _ResponseCollector:
    done: list[Wire] = field(default_factory=list)
    parser: Any = None
    _headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    _body: bytearray = field(default_factory=bytearray)

    def on_message_begin(self) -> None:
        self._headers, self._body = [], bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append(Wire(self.parser.get_status_code(), self._headers, bytes(self._body)))


def parse_responses(raw: bytes) -> list[Wire]:
    """Every complete response in ``raw`` (a 100 Continue counts as one)."""
    c = _ResponseCollector()
    c.parser = httptools.HttpResponseParser(c)
    with contextlib.suppress(httptools.HttpParserError):
        c.parser.feed_data(raw)
    return c.done


class Client:
    """A raw TCP client: bytes out, responses in, and whether the server closed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.raw = bytearray()
        self.eof = False
        self.taken = 0  # responses returned by response()
        self._c = _ResponseCollector()
        self._c.parser = httptools.HttpResponseParser(self._c)

    @classmethod
    async def connect(cls, server: HttpServer) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", server.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def _read(self) -> None:
        try:
            data = await self.reader.read(ONE_READ)
        except ConnectionError:
            data = b""
        if not data:
            self.eof = True
            return
        self.raw += data
        with contextlib.suppress(httptools.HttpParserError):
            self._c.parser.feed_data(data)

    async def responses(self, n: int, timeout: float = 3.0) -> list[Wire]:
        """Wait for ``n`` complete responses (or EOF)."""
        async with asyncio.timeout(timeout):
            while len(self._c.done) < n and not self.eof:
                await self._read()
        return self._c.done[:n]

    async def response(self, timeout: float = 3.0) -> Wire:
        """The next response not returned yet."""
        got = await self.responses(self.taken + 1, timeout)
        assert len(got) > self.taken, f"no response before EOF: {bytes(self.raw)!r}"
        self.taken += 1
        return got[-1]

    async def closed(self, timeout: float = 3.0) -> bool:
        """Read until the server closes; False if it is still open after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while not self.eof:
                    await self._read()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.writer.close()


async def exchange(server: HttpServer, data: bytes) -> tuple[list[Wire], bool]:
    """Send ``data`` on a new connection and half-close it; every response and whether the
    server closed (it answers what it parsed, then closes)."""
    c = Client(*await asyncio.open_connection("127.0.0.1", server.port))
    await c.send(data)
    with contextlib.suppress(OSError):
        c.writer.write_eof()
    closed = await c.closed(3.0)
    c.close()
    return parse_responses(bytes(c.raw)), closed


def assert_refused(resp: Wire, status: int, reason: str | None = None) -> None:
    assert resp.status == status, (resp.status, resp.body)
    shoal_error = resp.header(b"shoal-error")
    assert shoal_error is not None and shoal_error.startswith(b"gateway; "), resp.headers
    body = resp.json()
    assert body["layer"] == "gateway" and body["error"]
    assert shoal_error == f"gateway; {body['reason']}".encode()
    if reason is not None:
        assert body["reason"] == reason, body
    assert resp.header(b"connection") == b"close"


def get(target: str = "/", extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {target} HTTP/{version}\r\nHost: t\r\n{extra}\r\n".encode()


# -- basics ------------------------------------------------------------------------------------
def test_keep_alive_absolute_form_and_head(run: Any) -> None:
    async def scenario() -> None:
        rec = Recorder()
        async with serving(rec) as server:
            c = await Client.connect(server)
            await c.send(get("/a%20b?x=1&y=%C3%A9"))
            r = await c.response()
            assert r.status == 200 and r.header(b"connection") is None
            assert r.json()["path"] == "/a b" and r.json()["query"] == "x=1&y=%C3%A9"
            assert r.header(b"date") and r.header(b"content-length") == b"%d" % len(r.body)
            assert rec.requests[0].query_params == [("x", "1"), ("y", "é")]
            await c.send(get("http://example.com:8080/p/q?z=2"))
            r = await c.response()
            assert r.json() | {"body": ""} == {
                "method": "GET", "target": "http://example.com:8080/p/q?z=2", "path": "/p/q",
                "query": "z=2", "host": "example.com:8080", "body": ""}
            await c.send(get("http://[::1]:8080/v6") + b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await c.response()).json()["host"] == "[::1]:8080"
            assert (await c.response()).json()["path"] == "*"
            await c.send(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n" + get("/after"))
            await c.responses(5)
            head = bytes(c.raw).split(b"HTTP/1.1 200 OK")[5]
            assert b"content-length: " in head and head.endswith(b"\r\n\r\n")  # no body
            assert rec.seen[-1][1] == "/after" and rec.requests[0].headers.get("HOST") == b"t"
            c.close()

    run(scenario)


def test_http10_and_connection_close(run: Any) -> None:
    async def scenario() -> None:
        async with serving(Recorder()) as server:
            resps, closed = await exchange(server, b"GET /old HTTP/1.0\r\n\r\n")
            assert resps[0].status == 200 and resps[0].header(b"connection") == b"close"
            assert closed
            c = await Client.connect(server)
            await c.send(b"GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert (await c.response()).header(b"connection") == b"keep-alive"
            await c.send(get("/again", "Connection: close\r\n"))
            assert (await c.response()).header(b"connection") == b"close"
            assert await c.closed()

    run(scenario)


async def wait_no_connections(server: HttpServer) -> None:
    for _ in range(200):
        if not server.connections:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{server.connections} connection(s) still open on the server")


def test_close_with_pipelined_requests_leaves_no_connection(run: Any) -> None:
    """``Connection: close`` followed by pipelined requests, answered without a task: the
    rest is dropped and the server lets go of the connection (regression: it stayed)."""
    async def scenario() -> None:
        async with serving(lambda req: Response(req.path.encode())) as server:
            c = await Client.connect(server)
            await c.send(get("/1", "Connection: close\r\n") + get("/2") + get("/3"))
            assert [r.body for r in await c.responses(3)] == [b"/1"]
            assert await c.closed()
            c.close()
            await wait_no_connections(server)

    run(scenario)


def test_refusal_while_streaming_a_response_closes_after_it(run: Any) -> None:
    async def handler(req: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for i in range(3):
                await asyncio.sleep(0.05)
                yield b"part%d " % i
        return Response(body())  # answers before reading the (broken) request body

    async def scenario() -> None:
        async with serving(handler) as server:
            c = await Client.connect(server)
            await c.send(f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n"
                         "3\r\nabc\r\n".encode())
            await asyncio.sleep(0.02)
            await c.send(b"zz\r\nbroken\r\n")
            r = await c.response()
            assert r.status == 200 and r.body == b"part0 part1 part2 "
            assert await c.closed()
            c.close()
            await wait_no_connections(server)

    run(scenario)


def test_handler_errors_and_invalid_responses(run: Any) -> None:
    async def handler(req: Request) -> Any:
        if req.path == "/boom":
            raise RuntimeError("boom")
        if req.path == "/inject":
            return Response(b"x", headers=[(b"x-a", b"1\r\nset-cookie: evil=1")])
        if req.path == "/status":
            return Response(b"x", status=99)
        if req.path == "/refuse":
            raise ClientRequestError(403, "denied", "not for you")
        return Response(b"ok")

    async def scenario() -> None:
        async with serving(handler) as server:
            c = await Client.connect(server)
            for path, reason in (("/boom", "handler-error"), ("/inject", "invalid-response"),
                                 ("/status", "invalid-response")):
                await c.send(get(path))
                r = await c.response()
                assert r.status == 500 and r.json()["reason"] == reason
                assert r.header(b"shoal-error") == f"gateway; {reason}".encode()
                assert r.header(b"set-cookie") is None
            await c.send(get("/fine"))  # the connection survived all three
            assert (await c.response()).body == b"ok"
            await c.send(get("/refuse"))
            assert_refused(await c.response(), 403, "denied")
            assert await c.closed()

    logging.getLogger("shoal.gateway").disabled = True
    try:
        run(scenario)
    finally:
        logging.getLogger("shoal.gateway").disabled = False


def test_limits_from_config() -> None:
    limits = ServerLimits.from_config({"max_body_bytes": "1MiB", "header_timeout": "250ms",
                                       "max_headers": 50})
    assert (limits.max_body_bytes, limits.header_timeout, limits.max_headers) == (MiB, 0.25, 50)
    with pytest.raises(ValueError, match="unknown limit"):
        ServerLimits.from_config({"max_bodies": 1})
    with pytest.raises(ValueError, match="max_headers"):
        ServerLimits(max_headers=-1)


def test_listen_on_socket_and_reuse_port(run: Any) -> None:
    async def scenario() -> None:
        a = HttpServer(lambda req: Response(b"a"))
        b = HttpServer(lambda req: Response(b"b"))
        await a.start("127.0.0.1", 0, reuse_port=True)
        await b.start("127.0.0.1", a.port, reuse_port=True)  # SO_REUSEPORT: both listen
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        c = HttpServer(lambda req: Response(b"c"))
        await c.start(sock=sock)
        for server, body in ((a, {b"a", b"b"}), (c, {b"c"})):
            resps, _ = await exchange(server, get())
            assert resps[0].body in body
        for server in (a, b, c):
            await server.shutdown(1.0)

    run(scenario)


def test_unix_socket(run: Any, tmp_path: Path) -> None:
    async def scenario() -> None:
        server = HttpServer(lambda req: Response(b"unix"))
        path = str(tmp_path / "gw.sock")
        await server.start(path=path)
        assert server.addresses == [path]
        r, w = await asyncio.open_unix_connection(path)
        w.write(get())
        assert (await r.read(4096)).endswith(b"\r\n\r\nunix")
        w.close()
        await server.shutdown(1.0)

    run(scenario)
    assert not os.path.exists(tmp_path / "gw.sock")


# -- request smuggling and malformed requests ----------------------------------------------------
H = "Host: t\r\n"
SMUGGLING = [
    # (id, request, status, reason)
    ("cl-and-te", f"POST /s HTTP/1.1\r\n{H}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
     "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n", 400,
     "content-length-with-transfer-encoding"),
    ("te-and-cl", f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
     "5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n", 400, "content-length-with-transfer-encoding"),
    ("cl-repeated", f"POST /s HTTP/1.1\r\n{H}Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
     400, "duplicate-content-length"),
    ("cl-conflicting", f"POST /s HTTP/1.1\r\n{H}Content-Length: 3\r\nContent-Length: 40\r\n\r\n"
     "abc", 400, "duplicate-content-length"),
    ("cl-list", f"POST /s HTTP/1.1\r\n{H}Content-Length: 3, 3\r\n\r\nabc", 400,
     "invalid-content-length"),
    ("cl-plus", f"POST /s HTTP/1.1\r\n{H}Content-Length: +3\r\n\r\nabc", 400,
     "invalid-content-length"),
    ("cl-negative", f"POST /s HTTP/1.1\r\n{H}Content-Length: -3\r\n\r\nabc", 400,
     "invalid-content-length"),
    ("cl-hex", f"POST /s HTTP/1.1\r\n{H}Content-Length: 0x3\r\n\r\nabc", 400,
     "invalid-content-length"),
    ("te-gzip-chunked", f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding: gzip, chunked\r\n\r\n"
     "0\r\n\r\n", 400, "unsupported-transfer-encoding"),
    ("te-chunked-gzip", f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding: chunked, gzip\r\n\r\n"
     "0\r\n\r\n", 400, "invalid-transfer-encoding"),
    ("te-xchunked", f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400,
     None),
    ("te-identity", f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding: identity\r\n\r\n", 400, None),
    ("te-repeated", f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n"
     "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, None),
    ("te-vertical-tab", f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n",
     400, "invalid-header"),
    ("te-http10", "POST /s HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
     "transfer-encoding-http10"),
    ("chunk-size-0x", f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n"
     "0\r\n\r\n", 400, "invalid-chunk"),
    ("chunk-size-garbage", f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\nzz\r\n"
     "abc\r\n0\r\n\r\n", 400, "invalid-chunk"),
    ("chunk-size-overflow", f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n"
     "fffffffffffffffff\r\nabc\r\n0\r\n\r\n", 400, "invalid-chunk"),
    ("chunk-size-negative", f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n-1\r\n"
     "abc\r\n0\r\n\r\n", 400, "invalid-chunk"),
    ("chunk-size-space", f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n3 \r\n"
     "abc\r\n0\r\n\r\n", 400, None),
    ("chunk-size-bare-lf", f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n3\nabc\r\n"
     "0\r\n\r\n", 400, None),
    ("chunk-data-overrun", f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n3\r\n"
     "abcdef\r\n0\r\n\r\n", 400, None),
    ("bare-lf-request-line", f"GET /s HTTP/1.1\n{H}\r\n", 400, "invalid-line-ending"),
    ("bare-lf-header", f"GET /s HTTP/1.1\r\n{H}X-A: 1\nX-B: 2\r\n\r\n", 400,
     "invalid-line-ending"),
    ("bare-lf-end", f"GET /s HTTP/1.1\r\n{H}\n", 400, None),
    ("bare-cr", f"GET /s HTTP/1.1\r\n{H}X-A: 1\rX-B: 2\r\n\r\n", 400, "invalid-line-ending"),
    ("nul-in-value", f"GET /s HTTP/1.1\r\n{H}X-A: a\x00b\r\n\r\n", 400, "invalid-header"),
    ("ctl-in-value", f"GET /s HTTP/1.1\r\n{H}X-A: a\x01b\r\n\r\n", 400, "invalid-header"),
    ("del-in-value", f"GET /s HTTP/1.1\r\n{H}X-A: a\x7fb\r\n\r\n", 400, "invalid-header"),
    ("space-in-name", f"GET /s HTTP/1.1\r\n{H}X A: b\r\n\r\n", 400, "invalid-header"),
    ("space-before-colon", f"GET /s HTTP/1.1\r\n{H}Content-Length : 0\r\n\r\n", 400,
     "invalid-header"),
    ("empty-name", f"GET /s HTTP/1.1\r\n{H}: b\r\n\r\n", 400, "invalid-header"),
    ("separator-in-name", f"GET /s HTTP/1.1\r\n{H}X(a): b\r\n\r\n", 400, "invalid-header"),
    ("obs-fold", f"GET /s HTTP/1.1\r\n{H}X-A: a\r\n b\r\n\r\n", 400, "invalid-header"),
    ("obs-fold-tab", f"GET /s HTTP/1.1\r\n{H}X-A: a\r\n\tb\r\n\r\n", 400, "invalid-header"),
    ("obs-fold-te", f"POST /s HTTP/1.1\r\n{H}Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
     400, None),
    ("missing-host", "GET /s HTTP/1.1\r\n\r\n", 400, "missing-host"),
    ("duplicate-host", f"GET /s HTTP/1.1\r\n{H}Host: u\r\n\r\n", 400, "duplicate-host"),
    ("lowercase-method", f"get /s HTTP/1.1\r\n{H}\r\n", 400, "invalid-method"),
    ("control-in-target", f"GET /s\x01 HTTP/1.1\r\n{H}\r\n", 400, "invalid-target"),
    ("space-in-target", f"GET /s x HTTP/1.1\r\n{H}\r\n", 400, None),
    ("http-1.2", f"GET /s HTTP/1.2\r\n{H}\r\n", 400, "invalid-request-line"),
    ("http-2.0", f"GET /s HTTP/2.0\r\n{H}\r\n", 505, "version-not-supported"),
    ("http-0.9", "GET /s\r\n\r\n", 505, "version-not-supported"),
    ("h2-preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "version-not-supported"),
    ("connect", f"CONNECT t:443 HTTP/1.1\r\n{H}\r\n", 501, "connect-not-supported"),
    ("target-not-http", f"GET ftp://t/x HTTP/1.1\r\n{H}\r\n", 400, "invalid-target"),
    ("target-no-host", f"GET http:///x HTTP/1.1\r\n{H}\r\n", 400, "invalid-target"),
    ("target-star-get", f"GET * HTTP/1.1\r\n{H}\r\n", 400, "invalid-target"),
    ("upgrade-with-body", f"POST /s HTTP/1.1\r\n{H}Upgrade: h2c\r\nConnection: Upgrade\r\n"
     "Content-Length: 3\r\n\r\nabc", 400, "upgrade-with-body"),
    ("unknown-expectation", f"GET /s HTTP/1.1\r\n{H}Expect: 200-ok\r\n\r\n", 417,
     "unsupported-expectation"),
]


@pytest.mark.parametrize(("request_bytes", "status", "reason"),
                         [pytest.param(r.encode("latin-1"), s, why, id=i)
                          for i, r, s, why in SMUGGLING])
def test_smuggling_refused(run: Any, request_bytes: bytes, status: int,
                           reason: str | None) -> None:
    async def scenario() -> None:
        rec = Recorder()
        async with serving(rec) as server:
            resps, closed = await exchange(server, request_bytes)
            assert len(resps) == 1, resps
            assert_refused(resps[0], status, reason)
            assert closed
            assert rec.started == []  # the handler never saw it, nor what it smuggled
            resps, _ = await exchange(server, get("/next"))  # the server is still fine
            assert resps[0].status == 200

    run(scenario)


def test_refusal_keeps_pipelined_order(run: Any) -> None:
    """A valid request, then a smuggling attempt on the same connection: the first is
    answered first, then the refusal; nothing after the refusal is parsed."""
    async def scenario() -> None:
        rec = Recorder(delays={"/slow": 0.1})
        async with serving(rec) as server:
            resps, closed = await exchange(server, get("/slow") + (
                f"POST /s HTTP/1.1\r\n{H}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                "0\r\n\r\n").encode() + get("/never"))
            assert [r.status for r in resps] == [200, 400] and closed
            assert resps[0].json()["path"] == "/slow"
            assert_refused(resps[1], 400, "content-length-with-transfer-encoding")
            assert rec.started == ["/slow"]

    run(scenario)


def test_upgrade_answered_as_http_then_closed(run: Any) -> None:
    """h2c/websocket upgrades are not performed: the request is answered as plain HTTP and
    whatever follows it on the connection is never parsed (no smuggling through it)."""
    async def scenario() -> None:
        rec = Recorder()
        async with serving(rec) as server:
            resps, closed = await exchange(server, get(
                "/u", "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n") + get("/smuggled"))
            assert [r.status for r in resps] == [200] and closed
            assert resps[0].header(b"connection") == b"close"
            assert rec.started == ["/u"]

    run(scenario)


# -- limits ----------------------------------------------------------------------------------------
def test_header_limits(run: Any) -> None:
    async def scenario() -> None:
        rec = Recorder()
        async with serving(rec, max_header_bytes=4096, max_headers=20) as server:
            big = get("/", f"X-Big: {'a' * 5000}\r\n")
            resps, closed = await exchange(server, big)
            assert_refused(resps[0], 431, "header-too-large")
            assert closed
            many = get("/", "".join(f"X-{i}: v\r\n" for i in range(21)))
            resps, closed = await exchange(server, many)
            assert_refused(resps[0], 431, "too-many-headers")
            assert closed
            resps, closed = await exchange(server, get("/" + "a" * 5000))
            assert_refused(resps[0], 414, "target-too-long")
            # A head trickled in small pieces without an end is cut off by size, not time.
            c = await Client.connect(server)
            await c.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: ")
            for _ in range(40):
                await c.send(b"a" * 200)
                await asyncio.sleep(0.002)
                if c.eof or server.connections == 0:
                    break
            assert_refused(await c.response(), 431, "header-too-large")
            assert await c.closed()
            ok = get("/", f"X-Fine: {'a' * 3000}\r\n")  # just under the limit
            resps, _ = await exchange(server, ok)
            assert resps[0].status == 200
            # Heads that span reads are measured exactly: over by a little in two halves
            # (each well under the limit) is refused, under the limit in two halves is not.
            for filler, status in ((4060, 431), (3000, 200)):
                head = get("/", f"X-Split: {'b' * filler}\r\n")
                c = await Client.connect(server)
                await c.send(head[:len(head) // 2])
                await asyncio.sleep(0.05)
                await c.send(head[len(head) // 2:])
                assert (await c.response()).status == status, filler
                c.close()
            assert rec.started == ["/", "/"]

    run(scenario)


def test_body_limits(run: Any) -> None:
    async def scenario() -> None:
        rec = Recorder()
        async with serving(rec, max_body_bytes=1000) as server:
            resps, closed = await exchange(
                server, f"POST /big HTTP/1.1\r\n{H}Content-Length: 1001\r\n\r\n".encode()
                + b"x" * 1001)
            assert_refused(resps[0], 413, "body-too-large")
            assert closed and rec.started == []
            # Expect: 100-continue with a body over the limit: 417, and no 100 first.
            resps, closed = await exchange(
                server, f"POST /big HTTP/1.1\r\n{H}Content-Length: 5000\r\n"
                "Expect: 100-continue\r\n\r\n".encode())
            assert len(resps) == 1 and closed and rec.started == []
            assert_refused(resps[0], 417, "body-too-large")
            # A chunked body crosses the limit mid-stream: the handler had been called to
            # stream it, but never gets the whole body, and its answer is replaced by 413.
            chunks = b"".join(b"%x\r\n%s\r\n" % (300, b"y" * 300) for _ in range(4))
            resps, closed = await exchange(
                server, f"POST /chunky HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n".encode()
                + chunks + b"0\r\n\r\n")
            assert [r.status for r in resps] == [413] and closed
            assert_refused(resps[0], 413, "body-too-large")
            assert rec.seen == []
            # Exactly at the limit is fine, chunked or not.
            chunks = b"".join(b"%x\r\n%s\r\n" % (250, b"z" * 250) for _ in range(4))
            resps, _ = await exchange(
                server, f"POST /ok HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n".encode()
                + chunks + b"0\r\n\r\n")
            assert resps[0].status == 200 and len(resps[0].json()["body"]) == 1000

    run(scenario)


def test_max_connections(run: Any) -> None:
    async def scenario() -> None:
        rec = Recorder()
        async with serving(rec, max_connections=2) as server:
            a, b = await Client.connect(server), await Client.connect(server)
            for c in (a, b):
                await c.send(get("/held"))
                assert (await c.response()).status == 200
            resps, closed = await exchange(server, get("/third"))
            assert_refused(resps[0], 503, "max-connections")
            assert closed and server.refused_connections == 1
            assert rec.started == ["/held", "/held"]
            a.close()
            for _ in range(100):
                if server.connections < 2:
                    break
                await asyncio.sleep(0.01)
            resps, _ = await exchange(server, get("/fourth"))
            assert resps[0].status == 200
            b.close()

    run(scenario)


def test_pipeline_limit(run: Any) -> None:
    async def scenario() -> None:
        rec = Recorder(delays={"/0": 0.05})
        async with serving(rec, max_pipelined=2) as server:
            resps, closed = await exchange(server, b"".join(get(f"/{i}") for i in range(6)))
            assert [r.status for r in resps] == [200, 200, 200, 503] and closed
            assert [r.json()["path"] for r in resps[:3]] == ["/0", "/1", "/2"]
            assert_refused(resps[3], 503, "pipeline-limit")
            assert rec.started == ["/0", "/1", "/2"]

    run(scenario)


def test_max_requests_per_connection(run: Any) -> None:
    async def scenario() -> None:
        async with serving(Recorder(), max_requests_per_connection=2) as server:
            resps, closed = await exchange(server, get("/1") + get("/2") + get("/3"))
            assert [r.status for r in resps] == [200, 200] and closed
            assert resps[0].header(b"connection") is None
            assert resps[1].header(b"connection") == b"close"

    run(scenario)


# -- timeouts ----------------------------------------------------------------------------------
def test_slowloris_gets_408_at_header_timeout(run: Any) -> None:
    async def scenario() -> None:
        rec = Recorder()
        async with serving(rec, header_timeout=0.5) as server:
            # First request of a connection: the clock starts at accept.
            c = await Client.connect(server)
            t0 = time.monotonic()
            answer = asyncio.create_task(c.response())
            for byte in b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 200:
                if answer.done():
                    break
                await c.send(bytes([byte]))
                await asyncio.sleep(0.02)
            assert_refused(await answer, 408, "header-timeout")
            elapsed = time.monotonic() - t0
            assert 0.45 <= elapsed < 1.2, elapsed
            assert await c.closed()
            # On a keep-alive connection the clock starts at the request's first byte.
            c = await Client.connect(server)
            await c.send(get("/first"))
            assert (await c.response()).status == 200
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            await c.send(b"GET /second HTTP/1.1\r\n")
            assert_refused(await c.response(), 408, "header-timeout")
            assert 0.45 <= time.monotonic() - t0 < 1.2
            assert await c.closed()
            assert rec.started == ["/first"]

    run(scenario)


def test_idle_and_body_timeouts(run: Any) -> None:
    async def scenario() -> None:
        rec = Recorder()
        async with serving(rec, keep_alive_timeout=0.3, body_timeout=0.3) as server:
            c = await Client.connect(server)
            await c.send(get("/idle"))
            await c.response()
            t0 = time.monotonic()
            n = len(c.raw)
            assert await c.closed(2.0)
            assert len(c.raw) == n  # closed silently: no unsolicited 408
            assert 0.25 <= time.monotonic() - t0 < 1.0
            # A body that stops arriving: 408, and the handler never gets the body.
            c = await Client.connect(server)
            await c.send(f"POST /stall HTTP/1.1\r\n{H}Content-Length: 100\r\n\r\n".encode()
                         + b"x" * 10)
            assert_refused(await c.response(), 408, "body-timeout")
            assert await c.closed()
            assert rec.started == ["/idle", "/stall"] and [s[1] for s in rec.seen] == ["/idle"]

    run(scenario)


# -- Expect: 100-continue ----------------------------------------------------------------------
def test_expect_100_continue(run: Any) -> None:
    async def scenario() -> None:
        async def early(req: Request) -> Response:
            return Response(b"no thanks", status=403)

        async with serving(Recorder()) as server:
            c = await Client.connect(server)
            await c.send(f"POST /up HTTP/1.1\r\n{H}Content-Length: 5\r\n"
                         "Expect: 100-continue\r\n\r\n".encode())
            r = await c.response()
            assert r.status == 100
            await c.send(b"hello")
            r = await c.response()
            assert r.status == 200 and r.json()["body"] == "hello"
            c.close()
        async with serving(early) as server:
            # The handler answers without reading: no 100, and the connection closes.
            resps, closed = await exchange(
                server, f"POST /up HTTP/1.1\r\n{H}Content-Length: 5\r\n"
                "Expect: 100-continue\r\n\r\n".encode())
            assert [r.status for r in resps] == [403] and closed
            assert resps[0].header(b"connection") == b"close"

    run(scenario)


# -- pipelining ----------------------------------------------------------------------------------
def test_pipelining_keeps_order(run: Any) -> None:
    async def scenario() -> None:
        rec = Recorder(delays={"/1": 0.15, "/3": 0.05})
        async with serving(rec) as server:
            data = (get("/1")
                    + f"POST /2 HTTP/1.1\r\n{H}Content-Length: 5\r\n\r\nhello".encode()
                    + get("/3")
                    + f"POST /4 HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n"
                      "3\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n".encode()
                    + get("/5", "Connection: close\r\n"))
            resps, closed = await exchange(server, data)
            assert [r.json()["path"] for r in resps] == ["/1", "/2", "/3", "/4", "/5"]
            assert [r.json()["body"] for r in resps] == ["", "hello", "", "abcde", ""]
            assert closed
            # The same bytes in 7-byte pieces: same answers.
            c = await Client.connect(server)
            for i in range(0, len(data), 7):
                await c.send(data[i:i + 7])
            resps = await c.responses(5)
            assert [r.json()["path"] for r in resps] == ["/1", "/2", "/3", "/4", "/5"]
            assert await c.closed()

    run(scenario)


def test_early_response_drops_small_unread_body(run: Any) -> None:
    """A handler that answers without reading the body keeps the connection when the rest is
    small (it is read and dropped), and closes it when it is large."""
    async def scenario() -> None:
        rec = Recorder(read_body=False)
        async with serving(rec) as server:
            c = await Client.connect(server)
            await c.send(f"POST /a HTTP/1.1\r\n{H}Content-Length: 20000\r\n\r\n".encode())
            r = await c.response()
            assert r.status == 200 and r.header(b"connection") is None
            await c.send(b"x" * 20000 + get("/b"))
            assert (await c.response()).json()["path"] == "/b"
            await c.send(f"POST /c HTTP/1.1\r\n{H}Content-Length: 10000000\r\n\r\n".encode())
            assert (await c.response()).header(b"connection") == b"close"
            assert await c.closed()

    run(scenario)


def test_unread_body_over_high_water_does_not_stall(run: Any) -> None:
    """A body the handler never reads, complete but above the buffer's high water when the
    response is sent: the connection reads on (regression: it stayed paused)."""
    async def scenario() -> None:
        rec = Recorder(read_body=False, delays={"/ignore": 0.1})
        async with serving(rec) as server:
            c = await Client.connect(server)
            n = READ_HIGH_WATER + 40_000
            await c.send(f"POST /ignore HTTP/1.1\r\n{H}Content-Length: {n}\r\n\r\n".encode()
                         + b"x" * n)
            assert (await c.response()).status == 200
            await asyncio.sleep(0.05)
            await c.send(get("/after"))
            assert (await c.response()).json()["path"] == "/after"
            c.close()

    run(scenario)


def test_pipelining_client_that_never_reads(run: Any) -> None:
    """Requests keep coming but responses are not read: the server stops taking requests
    once its output backs up, so its buffers stay bounded."""
    async def scenario() -> None:
        big = b"r" * (256 * 1024)
        async with serving(lambda req: Response(big), max_pipelined=1000) as server:
            c = await Client.connect(server)
            for _ in range(50):  # 200 requests would be 50 MiB of answers
                c.writer.write(get("/x") * 4)
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.2)
            (conn,) = server._conns
            assert conn._transport.get_write_buffer_size() <= 2 * len(big)
            answered = 0
            while answered < 200:  # reading resumes the server
                answered = len(await c.responses(answered + 1, timeout=5.0))
            c.close()

    run(scenario)


# -- streaming ---------------------------------------------------------------------------------
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_streaming_upload_50mib_bounded(run: Any, framing: str) -> None:
    size = 50 * MiB
    block = os.urandom(MiB)
    expected = hashlib.sha256(block * 50).hexdigest()

    async def slow_hasher(req: Request) -> Response:
        h = hashlib.sha256()
        total = 0
        async for chunk in req.stream():
            h.update(chunk)
            total += len(chunk)
            await asyncio.sleep(0.0005)  # a handler slower than the client
        return Response.json({"n": total, "sha": h.hexdigest(), "peak": req.peak_buffered})

    async def scenario() -> None:
        async with serving(slow_hasher, max_body_bytes=64 * MiB) as server:
            c = await Client.connect(server)
            if framing == "chunked":
                await c.send(f"PUT /up HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n".encode())
                for _ in range(50):
                    await c.send(b"%x\r\n" % MiB + block + b"\r\n")
                await c.send(b"0\r\n\r\n")
            else:
                await c.send(f"PUT /up HTTP/1.1\r\n{H}Content-Length: {size}\r\n\r\n".encode())
                for _ in range(50):
                    await c.send(block)
            r = (await c.response(10.0)).json()
            assert r["n"] == size and r["sha"] == expected
            assert r["peak"] <= READ_HIGH_WATER + ONE_READ, r["peak"]
            await c.send(get("/again"))  # the connection is still usable
            assert (await c.response()).status == 200
            c.close()

    run(scenario)


def test_tiny_chunks_are_gathered_in_order(run: Any) -> None:
    """A body sent as thousands of 1-byte chunks (mixed with larger ones) arrives intact,
    and its pieces are gathered rather than kept as one object each."""
    pieces = [bytes([65 + i % 26]) * (1 if i % 500 else 3000) for i in range(20_000)]
    body = b"".join(pieces)
    held: list[int] = []

    async def handler(req: Request) -> Response:
        await asyncio.sleep(0.2)  # let the body pile up
        held.append(len(req._chunks))
        data = await req.body()
        return Response(hashlib.sha256(data).hexdigest().encode())

    async def scenario() -> None:
        async with serving(handler) as server:
            c = await Client.connect(server)
            await c.send(f"POST /tiny HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n".encode()
                         + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
                         + b"0\r\n\r\n")
            assert (await c.response()).body == hashlib.sha256(body).hexdigest().encode()
            assert held[0] <= 2 * (len(body) // 3000 + 1)  # big pieces only, not 20000
            c.close()

    run(scenario)


def test_streaming_download_with_backpressure(run: Any) -> None:
    total = 64 * MiB
    block = b"d" * (64 * 1024)
    produced = [0]
    closed = []

    async def body() -> AsyncIterator[bytes]:
        try:
            while produced[0] < total:
                produced[0] += len(block)
                yield block
        finally:
            closed.append(True)

    class Upstream:  # shaped like shoal.mesh.http1.Response
        status = 200
        headers = [(b"content-length", b"%d" % (8 * MiB)), (b"transfer-encoding", b"chunked")]

        def __init__(self) -> None:
            self.closed = False

        async def aiter_bytes(self) -> AsyncIterator[bytes]:
            for _ in range(128):
                yield block

        async def aclose(self) -> None:
            self.closed = True

    upstreams: list[Upstream] = []

    async def handler(req: Request) -> Any:
        if req.path == "/upstream":
            upstreams.append(Upstream())
            return upstreams[-1]
        return Response(body(), headers=[(b"content-type", b"application/octet-stream")])

    async def scenario() -> None:
        async with serving(handler) as server:
            c = await Client.connect(server)
            await c.send(get("/big"))
            while len(c.raw) < MiB:
                await c._read()
            await asyncio.sleep(0.2)
            stalled_at = produced[0]
            await asyncio.sleep(0.2)
            assert produced[0] == stalled_at < total / 2  # paced by the slow reader
            r = await c.response(20.0)
            assert r.header(b"transfer-encoding") == b"chunked" and len(r.body) == total
            assert closed == [True]
            # Fixed length from an upstream-like response: framing is the server's own.
            await c.send(get("/upstream"))
            r = await c.response(10.0)
            assert r.header(b"content-length") == b"%d" % (8 * MiB)
            assert r.header(b"transfer-encoding") is None and len(r.body) == 8 * MiB
            assert upstreams[0].closed
            c.close()

    run(scenario)


def test_client_disconnect_cancels_handler(run: Any) -> None:
    async def scenario() -> None:
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def handler(req: Request) -> Response:
            started.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return Response(b"late")

        async with serving(handler) as server:
            c = await Client.connect(server)
            await c.send(get("/hang"))
            await started.wait()
            sock = c.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.writer.close()  # a reset: the client is gone for sure
            async with asyncio.timeout(2):
                await cancelled.wait()
            for _ in range(100):
                if not server.connections:
                    break
                await asyncio.sleep(0.01)
            assert server.connections == 0

    run(scenario)


# -- graceful shutdown ----------------------------------------------------------------------------
def test_graceful_shutdown(run: Any) -> None:
    async def scenario() -> None:
        rec = Recorder(delays={"/slow": 0.4})
        server = HttpServer(rec)
        await server.start("127.0.0.1", 0)
        port = server.port
        idle = await Client.connect(server)
        await idle.send(get("/quick"))
        await idle.response()
        busy = await Client.connect(server)
        await busy.send(get("/slow") + get("/pipelined"))
        while "/slow" not in rec.started:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        stopping = asyncio.create_task(server.shutdown(grace=5.0))
        assert await idle.closed(1.0)  # idle keep-alive connections close at once
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)  # no longer accepting
        r = await busy.response()
        assert r.status == 200 and r.json()["path"] == "/slow"
        assert r.header(b"connection") == b"close"
        assert await busy.closed(1.0)
        assert len(parse_responses(bytes(busy.raw))) == 1  # nothing after "connection: close"
        await stopping
        assert time.monotonic() - t0 < 2.0 and server.connections == 0
        assert "/pipelined" not in rec.started

    run(scenario)


def test_shutdown_grace_expires(run: Any) -> None:
    async def scenario() -> None:
        cancelled = asyncio.Event()

        async def stuck(req: Request) -> Response:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return Response(b"never")

        server = HttpServer(stuck)
        await server.start("127.0.0.1", 0)
        c = await Client.connect(server)
        await c.send(get("/stuck"))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        logging.getLogger("shoal.gateway").disabled = True
        try:
            await server.shutdown(grace=0.3)
        finally:
            logging.getLogger("shoal.gateway").disabled = False
        assert 0.25 <= time.monotonic() - t0 < 2.0
        assert cancelled.is_set() and server.connections == 0
        assert await c.closed(1.0) and c.raw == b""

    run(scenario)


# -- fuzzing the request path -----------------------------------------------------------------
class FuzzServer:
    """A server on uvloop in a thread, whose handler records every request it completed."""

    def __init__(self) -> None:
        self.calls: dict[Any, set[int]] = {}  # client address -> call ids
        self.errors: list[str] = []
        self._ids = itertools.count(1)
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self._thread = threading.Thread(target=uvloop.run, args=(self._main(),), daemon=True)

    async def _handler(self, req: Request) -> Response:
        await req.body()  # raises if the body is refused: the call is not recorded
        _ = (req.path, req.query_params, req.host, req.headers.get("x"))  # must not raise
        call = next(self._ids)
        self.calls.setdefault(req.client, set()).add(call)
        return Response(b"ok", headers=[(b"x-call", b"%d" % call)])

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, ctx: self.errors.append(str(ctx)))
        errors = self.errors

        class Capture(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                errors.append(record.getMessage())

        logging.getLogger("shoal.gateway").addHandler(Capture(logging.ERROR))
        server = HttpServer(self._handler, limits=ServerLimits(
            max_header_bytes=2048, max_headers=20, max_body_bytes=4096, header_timeout=2.0,
            body_timeout=2.0, max_pipelined=4))
        await server.start("127.0.0.1", 0)
        self.port = server.port
        self._stop = asyncio.Event()
        self._loop = loop
        self._ready.set()
        await self._stop.wait()
        await server.shutdown(1.0)

    def __enter__(self) -> FuzzServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def send(self, data: bytes, cuts: tuple[int, ...] = ()) -> tuple[list[Wire], Any, bool]:
        """One connection: send ``data`` (in pieces at ``cuts``), half-close, read until the
        server closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            me = s.getsockname()
            with contextlib.suppress(OSError):
                start = 0
                for cut in (*sorted(cuts), len(data)):
                    s.sendall(data[start:cut])
                    start = cut
                    if cut < len(data):
                        time.sleep(0.0005)  # let the server read the piece on its own
                s.shutdown(socket.SHUT_WR)
            raw = bytearray()
            closed = False
            with contextlib.suppress(OSError):
                while True:
                    got = s.recv(65536)
                    if not got:
                        closed = True
                        break
                    raw += got
        return parse_responses(bytes(raw)), me, closed or not raw


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[FuzzServer]:
    with FuzzServer() as server:
        yield server


VALID = [
    b"GET /m HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /m HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /m HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PUT /m HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /m HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /n HTTP/1.0\r\n\r\n",
    b"GET http://a/m?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET /u HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
]
INSERTS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b",", b";", b"\x7f", b"\xff",
           b"0", b"\r\n\r\n", b"-", b"+", b"\x0b", b"\r\n "]
HEADER_LINES = [b"Content-Length: 5", b"Content-Length: 0", b"Content-Length: 99999999",
                b"Content-Length: 3, 3", b"Transfer-Encoding: chunked",
                b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: identity", b"Host: b",
                b"Expect: 100-continue", b"Connection: close", b"Upgrade: h2c",
                b"Connection: Upgrade", b" folded", b"X: a\rb", b"X: " + b"v" * 2100]
CHUNK_SIZES = [b"0", b"5", b"3", b"ffffffff", b"-1", b"0x5", b"5 ", b"5;ext=1", b"", b"g",
               b"1" * 30, b"1000", b"5\n"]


@st.composite
def hostile_requests(draw: st.DrawFn) -> bytes:
    """Valid requests, mutated: inserted CR/LF/NUL, duplicated or injected header lines,
    odd chunk sizes, deletions, truncation; or plain random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    data = draw(st.sampled_from(VALID))
    if draw(st.booleans()):
        sizes = draw(st.lists(st.sampled_from(CHUNK_SIZES), min_size=1, max_size=4))
        chunks = b"".join(s + b"\r\n" + b"x" * 5 + b"\r\n" for s in sizes)
        data = (b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
                + draw(st.sampled_from([b"0\r\n\r\n", b"", b"0\r\nT: 1\r\n\r\n"])))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.integers(0, 5))
        pos = draw(st.integers(0, len(data)))
        if op == 0:
            data = data[:pos] + draw(st.sampled_from(INSERTS)) + data[pos:]
        elif op == 1:
            data = data[:pos] + data[pos + draw(st.integers(1, 8)):]
        elif op == 2:
            lines = data.split(b"\r\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            data = b"\r\n".join(lines)
        elif op == 3:
            line = draw(st.sampled_from(HEADER_LINES))
            first = data.find(b"\r\n") + 2
            data = data[:first] + line + b"\r\n" + data[first:]
        elif op == 4:
            data = data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1:]
        else:
            data = data + draw(st.sampled_from(VALID))
    if draw(st.integers(0, 5)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return data


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=hostile_requests(), cuts=st.lists(st.integers(0, 400), max_size=3))
def test_fuzz_request_path(fuzz_server: FuzzServer, data: bytes, cuts: list[int]) -> None:
    """Hostile bytes, sent whole or in pieces, never crash the server, never hang a
    connection, and never get a refused request through to the handler: every request the
    handler completed was answered by the handler, and every refusal carries no handler
    answer."""
    resps, me, closed = fuzz_server.send(data, tuple(c for c in cuts if c < len(data)))
    assert closed, f"the server kept the connection open after EOF: {data!r}"
    answered = {int(r.header(b"x-call") or 0) for r in resps if r.header(b"x-call")}
    assert fuzz_server.calls.pop(me, set()) == answered, data
    for r in resps:
        if r.header(b"shoal-error") is not None:
            assert r.header(b"x-call") is None and r.status >= 400
            assert r.json()["layer"] == "gateway"
        else:
            assert r.status in (100, 200), (r, data)
    # still up: a valid request on a new connection is answered
    resps, me, _ = fuzz_server.send(VALID[0])
    assert [r.status for r in resps] == [200]
    fuzz_server.calls.pop(me, None)
    assert fuzz_server.errors == []


def test_header_names_and_values_of_any_kind_are_encoded(run: Any) -> None:
    """Bytes headers are taken as they are; str (and other) names and values are encoded,
    framing headers given as str are still the server's, and a ready block of lines
    (``EncodedHeaders``, the proxy's relay) is checked for CR/LF like any header."""
    from shoal.mesh.http1 import EncodedHeaders

    async def handler(req: Request) -> Any:
        if req.path == "/str":
            return Response(b"hello", headers=[("X-Text", "caf\xe9"), ("x-count", 7),
                                               ("Content-Length", "99"), (b"x-b", b"1"),
                                               ("Connection", "close")])
        if req.path == "/dict":
            return Response(b"hi", headers={"x-d": "1", "date": "Tue, 01 Jan 2030 00:00:00 GMT"})
        if req.path == "/block":
            return Response(b"blk", headers=EncodedHeaders(b"x-e: 1\r\n", 1, date=False))
        if req.path == "/head-length":
            return Response(b"", headers=EncodedHeaders(b"x-e: 2\r\n", 1, content_length=42))
        return Response(b"x", headers=EncodedHeaders(b"x-e: 1\r\nset-cookie: evil=1\r\n", 1))

    async def scenario() -> None:
        async with serving(handler) as server:
            c = await Client.connect(server)
            await c.send(get("/str"))
            r = await c.response()
            assert r.status == 200 and r.body == b"hello"
            assert r.header(b"x-text") == "caf\xe9".encode("latin-1")
            assert r.header(b"x-count") == b"7" and r.header(b"x-b") == b"1"
            assert r.header(b"content-length") == b"5" and r.header(b"connection") is None
            await c.send(get("/dict"))
            r = await c.response()
            assert r.header(b"x-d") == b"1"
            assert [v for k, v in r.headers if k.lower() == b"date"] == [
                b"Tue, 01 Jan 2030 00:00:00 GMT"]
            await c.send(get("/block"))
            r = await c.response()
            assert r.body == b"blk" and r.header(b"x-e") == b"1" and r.header(b"date")
            h = await Client.connect(server)  # HEAD: the block's length is announced
            await h.send(f"HEAD /head-length HTTP/1.1\r\n{H}\r\n".encode())
            async with asyncio.timeout(3):
                while b"\r\n\r\n" not in h.raw and not h.eof:
                    await h._read()
            assert b"\r\ncontent-length: 42\r\n" in h.raw and b"\r\nx-e: 2\r\n" in h.raw
            h.close()
            await c.send(get("/smuggle"))
            r = await c.response()
            assert r.status == 500 and r.json()["reason"] == "invalid-response"
            assert r.header(b"set-cookie") is None

    logging.getLogger("shoal.gateway").disabled = True
    try:
        run(scenario)
    finally:
        logging.getLogger("shoal.gateway").disabled = False
