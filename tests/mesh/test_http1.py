"""shoal.mesh.http1 against a real aiohttp server and a raw socket server, on asyncio and uvloop.

Every test runs on both event loops (the ``run`` fixture): transports differ in how they
report EOF, resets and flow control, and production runs on uvloop.

Stale keep-alive connections: we chose *transparent reuse of a new connection*. The tests
cover both ways a server-closed idle connection can look at checkout: the close already
processed by the loop (aiohttp's keep-alive timeout), and a FIN still unread in the kernel
(closed without the loop running, caught by the poll probe).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web

from shoal.errors import ConnectError, ConnectionLost, ProtocolError, ShoalError, TransportError
from shoal.mesh.http1 import (
    MAX_HEAD_BYTES,
    READ_HIGH_WATER,
    ConnectionPool,
    EncodedHeaders,
    Http1Connection,
    Response,
    format_address,
    parse_address,
)

MiB = 1024 * 1024


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    """Run a scenario coroutine function on a fresh loop of the parametrized kind."""
    runner = asyncio.run if request.param == "asyncio" else uvloop.run

    def _run(scenario: Callable[[], Awaitable[Any]]) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(60):
                return await scenario()

        return runner(bounded())

    return _run


# -- servers ------------------------------------------------------------------------------
class AioServer:
    """A real aiohttp server on a free loopback port (or a unix socket) that counts peers."""

    def __init__(self, routes: list[web.RouteDef], *, unix: Path | None = None,
                 keepalive_timeout: float = 75.0) -> None:
        self.app = web.Application(client_max_size=1024 * MiB)
        self.app.add_routes(routes)
        self.unix = unix
        self.keepalive_timeout = keepalive_timeout
        self.peers: set[Any] = set()
        self.address = ""

    async def __aenter__(self) -> AioServer:
        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            assert request.transport is not None
            self.peers.add(request.transport.get_extra_info("peername") or id(request.transport))
            return await handler(request)

        self.app.middlewares.append(count)
        self.runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True,
                                    shutdown_timeout=0.5,
                                    keepalive_timeout=self.keepalive_timeout)
        await self.runner.setup()
        if self.unix is not None:
            site: web.BaseSite = web.UnixSite(self.runner, str(self.unix))
            await site.start()
            self.address = f"unix:{self.unix}"
        else:
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.address = f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


class RawConn:
    """The server side of one raw connection: plain non-blocking socket, loop.sock_* I/O."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buf = b""

    async def recv_request(self) -> tuple[bytes, bytes]:
        """Read one request: (head, body); Content-Length and chunked bodies supported."""
        while b"\r\n\r\n" not in self.buf:
            data = await self.loop.sock_recv(self.sock, 65536)
            if not data:
                raise EOFError("client closed")
            self.buf += data
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lower = head.lower()
        body = b""
        if b"content-length:" in lower:
            n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            body = await self._recv_exact(n)
        elif b"transfer-encoding: chunked" in lower:
            while True:
                size_line = await self._recv_line()
                size = int(size_line, 16)
                chunk = await self._recv_exact(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        return head, body

    async def _recv_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self.buf += await self.loop.sock_recv(self.sock, 65536)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    async def _recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.loop.sock_recv(self.sock, 65536)
            if not data:
                raise EOFError("client closed mid-body")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


RawHandler = Callable[[RawConn], Awaitable[None]]


class RawServer:
    """A hand-written HTTP peer for edge cases; ``handler`` serves each connection."""

    def __init__(self, handler: RawHandler) -> None:
        self.handler = handler
        self.conns: list[RawConn] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.errors: list[BaseException] = []

    async def __aenter__(self) -> RawServer:
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.lsock.setblocking(False)
        self.address = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        self.accepter = asyncio.create_task(self._accept())
        return self

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.lsock)
            sock.setblocking(False)
            conn = RawConn(sock)
            self.conns.append(conn)
            task = asyncio.create_task(self._serve(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: RawConn) -> None:
        try:
            await self.handler(conn)
        except (EOFError, OSError, asyncio.CancelledError):
            pass
        except Exception as exc:  # surfaced by the test through .errors
            self.errors.append(exc)
        finally:
            if conn.sock.fileno() != -1:
                conn.sock.close()

    async def __aexit__(self, *exc: object) -> None:
        self.accepter.cancel()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(self.accepter, *self.tasks, return_exceptions=True)
        for conn in self.conns:
            if conn.sock.fileno() != -1:
                conn.sock.close()
        self.lsock.close()
        assert not self.errors, self.errors


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def keep_alive_ok(conn: RawConn) -> None:
    """Answer every request on the connection with 200 ok."""
    while True:
        await conn.recv_request()
        await conn.send(ok())


# -- routes ---------------------------------------------------------------------------------
async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(body=body, headers={
        "X-Method": request.method,
        "X-Chunked": str(request.headers.get("Transfer-Encoding", "") == "chunked"),
        "X-Sha256": hashlib.sha256(body).hexdigest(),
        "X-Host": request.headers.get("Host", ""),
    })


async def chunked(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for i in range(10):
        await resp.write(b"part-%d;" % i)
    await resp.write_eof()
    return resp


BLOCK = bytes(range(256)) * 1024  # 256 KiB


async def big(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("mib", "50")) * MiB
    resp = web.StreamResponse()
    resp.content_length = size
    await resp.prepare(request)
    for _ in range(size // len(BLOCK)):
        await resp.write(BLOCK)
    await resp.write_eof()
    return resp


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(30)
    return web.Response(text="late")


async def drip(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    await resp.prepare(request)
    for _ in range(100):
        await resp.write(b"drop")
        await asyncio.sleep(0.05)
    return resp


async def close(request: web.Request) -> web.Response:
    resp = web.Response(text="bye")
    resp.force_close()
    return resp


ROUTES = [
    web.route("*", "/echo", echo),
    web.get("/chunked", chunked),
    web.get("/big", big),
    web.get("/slow", slow),
    web.get("/drip", drip),
    web.get("/close", close),
]


# -- addresses --------------------------------------------------------------------------------
def test_address_forms() -> None:
    assert parse_address("127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_address("http://svc.local:8080/ignored") == ("svc.local", 8080)
    assert parse_address(("::1", 9)) == ("::1", 9)
    assert parse_address("[::1]:9") == ("::1", 9)
    assert parse_address("unix:/tmp/s.sock") == "/tmp/s.sock"
    assert parse_address("/tmp/s.sock") == "/tmp/s.sock"
    assert format_address(("::1", 9)) == "[::1]:9"
    assert format_address("/tmp/s") == "unix:/tmp/s"
    with pytest.raises(ValueError, match="host:port"):
        parse_address("no-port")


def test_errors_are_typed() -> None:
    for cls in (ConnectError, ConnectionLost, ProtocolError):
        assert issubclass(cls, TransportError) and issubclass(cls, ShoalError)


# -- basic exchanges (aiohttp) --------------------------------------------------------
def test_get_and_post_fixed_bodies(run: Any) -> None:
    async def scenario() -> None:
        async with AioServer(ROUTES) as srv, ConnectionPool(srv.address) as pool:
            r = await pool.request("GET", "/echo", [("X-Trace", "1")])
            assert r.status == 200 and r.http_version == "1.1" and r.reason == b"OK"
            assert await r.aread() == b""
            assert r.header("x-method") == b"GET" and r.header(b"X-METHOD") == b"GET"
            assert r.header("x-host") == srv.address.encode()  # default Host: the address
            assert r.header("missing") is None
            assert any(k == b"Content-Length" for k, _ in r.headers)

            payload = b"\x00hello\xff" * 1000
            r = await pool.request(b"POST", b"/echo", [(b"Host", b"svc.example")], payload)
            assert await r.aread() == payload
            assert await r.aread() == payload  # kept
            assert r.header("x-host") == b"svc.example"
            assert r.header("x-chunked") == b"False"

            big_payload = bytes(3 * MiB)  # written apart from the head
            r = await pool.request("PUT", "/echo", [], memoryview(big_payload))
            assert r.header("x-sha256") == hashlib.sha256(big_payload).hexdigest().encode()
            assert len(await r.aread()) == len(big_payload)

            r = await pool.request("POST", "/echo")  # no body: Content-Length: 0
            assert r.status == 200 and await r.aread() == b""
            assert pool.opened == 1 and pool.active == 0

    run(scenario)


def test_chunked_upload_from_async_generator(run: Any) -> None:
    async def scenario() -> None:
        parts = [bytes([i]) * (1000 * i + 1) for i in range(50)] + [b""] + [bytes(200_000)]
        expected = b"".join(parts)

        async def body() -> AsyncIterator[bytes]:
            for p in parts:
                await asyncio.sleep(0)
                yield p

        async with AioServer(ROUTES) as srv, ConnectionPool(srv.address) as pool:
            r = await pool.request("POST", "/echo", [("content-type", "application/x")], body())
            assert r.header("x-chunked") == b"True"
            assert r.header("x-sha256") == hashlib.sha256(expected).hexdigest().encode()
            assert await r.aread() == expected

            # with a Content-Length given, the stream is sent as is (not chunked)
            r = await pool.request("POST", "/echo", [("Content-Length", str(len(expected)))],
                                   body())
            assert r.header("x-chunked") == b"False" and await r.aread() == expected

            # a stream that does not match its Content-Length is refused, connection dropped
            with pytest.raises(ValueError, match="Content-Length"):
                await pool.request("POST", "/echo", [("Content-Length", "3")], body())
            assert pool.active == 0 and pool.size == pool.idle

    run(scenario)


def test_chunked_and_content_length_responses(run: Any) -> None:
    async def scenario() -> None:
        async with AioServer(ROUTES) as srv, ConnectionPool(srv.address) as pool:
            r = await pool.request("GET", "/chunked")
            assert r.header("transfer-encoding") == b"chunked"
            got = [c async for c in r.aiter_bytes()]
            assert b"".join(got) == b"".join(b"part-%d;" % i for i in range(10))
            r = await pool.request("GET", "/echo")
            assert r.header("content-length") == b"0"
            assert [c async for c in r.aiter_bytes()] == []
            assert pool.opened == 1  # both framings leave the connection reusable

    run(scenario)


def test_head_and_informational_responses(run: Any) -> None:
    async def handler(conn: RawConn) -> None:
        head, _ = await conn.recv_request()
        assert head.startswith(b"HEAD ")
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")  # no body: HEAD
        head, _ = await conn.recv_request()
        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>"
                        b"\r\n\r\n" + ok(b"after-1xx"))
        await conn.recv_request()
        await conn.send(b"HTTP/1.1 204 No Content\r\n\r\n")
        await conn.recv_request()
        await conn.send(ok(b"same-connection"))

    async def scenario() -> None:
        async with RawServer(handler) as srv, ConnectionPool(srv.address) as pool:
            r = await pool.request("HEAD", "/")
            assert r.status == 200 and r.header("content-length") == b"1000"
            assert await r.aread() == b""
            r = await pool.request("GET", "/")
            assert r.status == 200 and await r.aread() == b"after-1xx"
            assert r.header("link") is None  # the 103's headers are not the response's
            r = await pool.request("GET", "/")
            assert r.status == 204 and await r.aread() == b""
            r = await pool.request("GET", "/")
            assert await r.aread() == b"same-connection"
            assert pool.opened == 1 and len(srv.conns) == 1

    run(scenario)


# -- streaming with bounded memory ------------------------------------------------------
def test_streams_50_mib_with_bounded_memory(run: Any) -> None:
    async def scenario() -> None:
        async with AioServer(ROUTES) as srv, ConnectionPool(srv.address) as pool:
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                r = await pool.request("GET", "/big?mib=50")
                assert r.header("content-length") == str(50 * MiB).encode()
                it = r.aiter_bytes()
                first = await it.__anext__()
                # a consumer that stops reading: the transport must stop too
                await asyncio.sleep(0.2)
                conn = r._conn
                assert conn is not None and conn._reading_paused
                assert r._buffered <= READ_HIGH_WATER + 256 * 1024
                total, digest = len(first), hashlib.sha256(first)
                async for chunk in it:
                    total += len(chunk)
                    digest.update(chunk)
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
            assert total == 50 * MiB
            expected = hashlib.sha256()
            for _ in range(50 * MiB // len(BLOCK)):
                expected.update(BLOCK)
            assert digest.digest() == expected.digest()
            assert r.peak_buffered < MiB, r.peak_buffered
            assert peak < 8 * MiB, f"process peak grew by {peak} bytes for a 50 MiB body"
            assert pool.active == 0 and pool.idle == 1  # and the connection is reused
            r = await pool.request("GET", "/echo")
            await r.aread()
            assert pool.opened == 1

    run(scenario)


def test_large_bodies_bypass_the_parser_at_any_boundary(run: Any) -> None:
    sizes = [64 * 1024, 100_003, 300_000, 1_000_001]

    async def handler(conn: RawConn) -> None:
        for i, size in enumerate(sizes):
            await conn.recv_request()
            body = bytes([i]) * size
            whole = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body
            step = [7, 4096, 65537, 1 << 20][i]  # head and body split at odd places
            for k in range(0, len(whole), step):
                await conn.send(whole[k:k + step])
                await asyncio.sleep(0)
        await conn.recv_request()
        await conn.send(ok(bytes(70_000)) + b"HTTP/1.1 200 OK\r\n")  # bytes beyond it

    async def scenario() -> None:
        async with RawServer(handler) as srv, ConnectionPool(srv.address) as pool:
            for i, size in enumerate(sizes):
                r = await pool.request("GET", "/")
                assert await r.aread() == bytes([i]) * size
            assert pool.opened == 1 and pool.idle == 1  # reused across every split
            r = await pool.request("GET", "/")
            assert await r.aread() == bytes(70_000)
            assert pool.size == 0  # the trailing bytes made it unusable

    run(scenario)


def test_early_response_stops_the_upload(run: Any) -> None:
    async def handler(conn: RawConn) -> None:
        while b"\r\n\r\n" not in conn.buf:
            conn.buf += await conn.loop.sock_recv(conn.sock, 65536)
        await conn.send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
        with contextlib.suppress(OSError):
            while await conn.loop.sock_recv(conn.sock, 65536):
                pass

    async def scenario() -> None:
        sent = 0

        async def endless() -> AsyncIterator[bytes]:
            nonlocal sent
            while True:
                sent += 65536
                yield bytes(65536)
                await asyncio.sleep(0.001)

        async with RawServer(handler) as srv, ConnectionPool(srv.address) as pool:
            r = await pool.request("POST", "/upload", [], endless())
            assert r.status == 413 and await r.aread() == b"too big!"
            assert 0 < sent < 64 * MiB
            assert pool.size == 0 and pool.active == 0  # half-sent request: never reused

    run(scenario)


def test_connection_closed_locally_mid_response(run: Any) -> None:
    async def scenario() -> None:
        async with AioServer(ROUTES) as srv:
            conn = await Http1Connection.open(srv.address)
            r = await conn.request("GET", "/drip")
            assert await r.aiter_bytes().__anext__() == b"drop"
            conn.close()
            with pytest.raises(ConnectionLost, match="closed locally"):
                await r.aread()
            assert conn.closed and not conn.busy

    run(scenario)


# -- keep-alive -----------------------------------------------------------------------------
def test_keep_alive_reuses_one_connection(run: Any) -> None:
    async def scenario() -> None:
        async with AioServer(ROUTES) as srv, ConnectionPool(srv.address) as pool:
            for i in range(100):
                r = await pool.request("POST", "/echo", [], b"%d" % i)
                assert await r.aread() == b"%d" % i
            assert len(srv.peers) == 1 and pool.opened == 1
            assert pool.size == 1 and pool.idle == 1 and pool.active == 0

    run(scenario)


def test_unread_small_response_does_not_pin_the_connection(run: Any) -> None:
    async def scenario() -> None:
        async with AioServer(ROUTES) as srv, ConnectionPool(srv.address) as pool:
            for _ in range(10):
                r = await pool.request("POST", "/echo", [], b"x" * 100)
                await asyncio.sleep(0.01)  # body fully received, never read
                assert pool.active == 0
            assert await r.aread() == b"x" * 100
            assert pool.opened == 1

    run(scenario)


def test_connection_close_is_honoured(run: Any) -> None:
    async def scenario() -> None:
        async with AioServer(ROUTES) as srv, ConnectionPool(srv.address) as pool:
            r = await pool.request("GET", "/close")
            assert r.header("connection") == b"close" and await r.aread() == b"bye"
            assert pool.size == 0 and pool.idle == 0 and pool.active == 0
            r = await pool.request("GET", "/echo")
            await r.aread()
            assert pool.opened == 2 and len(srv.peers) == 2

    run(scenario)


def test_http10_and_unframed_body_read_to_eof(run: Any) -> None:
    async def handler(conn: RawConn) -> None:
        await conn.recv_request()
        await conn.send(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")

    async def scenario() -> None:
        async with RawServer(handler) as srv, ConnectionPool(srv.address) as pool:
            r = await pool.request("GET", "/")
            assert r.http_version == "1.0" and await r.aread() == b"until the end"
            assert pool.size == 0 and pool.active == 0

    run(scenario)


def test_stale_keep_alive_closed_by_server_uses_a_new_connection(run: Any) -> None:
    async def scenario() -> None:
        # aiohttp closes idle keep-alive connections after 50 ms
        async with AioServer(ROUTES, keepalive_timeout=0.05) as srv, \
                ConnectionPool(srv.address) as pool:
            r = await pool.request("GET", "/echo")
            await r.aread()
            await asyncio.sleep(0.3)
            r = await pool.request("POST", "/echo", [], b"not retried, not lost")
            assert await r.aread() == b"not retried, not lost"
            assert pool.opened == 2 and len(srv.peers) == 2

    run(scenario)


def test_stale_connection_detected_before_the_loop_sees_the_fin(run: Any) -> None:
    async def scenario() -> None:
        async with RawServer(keep_alive_ok) as srv, ConnectionPool(srv.address) as pool:
            r = await pool.request("GET", "/")
            await r.aread()
            await asyncio.sleep(0.05)
            # the server closes its socket; we do not yield to the loop, so the client
            # protocol has not seen the EOF - only the kernel has
            srv.conns[0].sock.shutdown(socket.SHUT_RDWR)
            idle_conn = pool._idle[-1]
            deadline = time.monotonic() + 5
            while idle_conn.is_reusable() and time.monotonic() < deadline:
                pass
            assert not idle_conn.closed  # the loop has not processed the FIN...
            r = await pool.request("POST", "/", [], b"body")  # ...yet checkout discards it
            assert await r.aread() == b"ok"
            assert pool.opened == 2 and len(srv.conns) == 2

    run(scenario)


def test_request_on_dead_connection_says_request_not_sent(run: Any) -> None:
    async def scenario() -> None:
        async with RawServer(keep_alive_ok) as srv:
            conn = await Http1Connection.open(srv.address)
            r = await conn.request("GET", "/")
            assert await r.aread() == b"ok" and conn.is_reusable()
            srv.conns[0].sock.shutdown(socket.SHUT_RDWR)
            while not conn.closed:
                await asyncio.sleep(0.01)
            with pytest.raises(ConnectionLost) as info:
                await conn.request("POST", "/", [], b"payload")
            assert info.value.request_sent is False
            assert srv.address in str(info.value) and info.value.address == srv.address

    run(scenario)


def test_pool_retries_once_when_nothing_was_sent(run: Any, monkeypatch: Any) -> None:
    # Defeat the stale checks (the idle list forgets nothing, checkout trusts everything) so
    # a dead idle connection is handed out: the pre-write check then raises
    # ConnectionLost(request_sent=False) and the pool retries by itself on a new one.
    monkeypatch.setattr(Http1Connection, "is_reusable", lambda self: not self._in_exchange)
    monkeypatch.setattr(ConnectionPool, "_discard", lambda self, conn: None)

    async def scenario() -> None:
        async with RawServer(keep_alive_ok) as srv, ConnectionPool(srv.address) as pool:
            r = await pool.request("GET", "/")
            await r.aread()
            srv.conns[0].sock.shutdown(socket.SHUT_RDWR)
            dead = pool._idle[-1]
            while not dead.closed:
                await asyncio.sleep(0.01)
            r = await pool.request("POST", "/", [], b"x")
            assert await r.aread() == b"ok"
            assert pool.opened == 2 and pool.active == 0 and pool.size == 1

    run(scenario)


# -- failures ---------------------------------------------------------------------------------
def test_connection_refused_is_connect_error(run: Any) -> None:
    async def scenario() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, never listening: refused
            async with ConnectionPool(f"127.0.0.1:{port}") as pool:
                with pytest.raises(ConnectError, match=f"127.0.0.1:{port}") as info:
                    await pool.request("GET", "/")
                assert info.value.address == f"127.0.0.1:{port}"
                assert pool.size == 0 and pool.active == 0

    run(scenario)


def test_connect_timeout_is_connect_error(run: Any) -> None:
    async def scenario() -> None:
        # a listener with a full backlog never completes the handshake
        with socket.socket() as lsock:
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(0)
            addr = lsock.getsockname()
            fillers = []
            try:
                for _ in range(8):
                    s = socket.socket()
                    s.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        s.connect(addr)
                    fillers.append(s)
                with pytest.raises(ConnectError, match="timed out"):
                    await Http1Connection.open(addr, connect_timeout=0.2)
            finally:
                for s in fillers:
                    s.close()

    run(scenario)


def test_reset_mid_response_is_connection_lost_after_send(run: Any) -> None:
    async def rst(conn: RawConn) -> None:
        await conn.recv_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
        await asyncio.sleep(0.05)
        conn.reset()

    async def fin(conn: RawConn) -> None:
        await conn.recv_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)

    async def before_head(conn: RawConn) -> None:
        await conn.recv_request()

    async def scenario() -> None:
        for handler in (rst, fin):
            async with RawServer(handler) as srv, ConnectionPool(srv.address) as pool:
                r = await pool.request("GET", "/")
                assert r.status == 200
                with pytest.raises(ConnectionLost) as info:
                    await r.aread()
                assert info.value.request_sent is True and srv.address in str(info.value)
                assert pool.size == 0 and pool.active == 0
        async with RawServer(before_head) as srv, ConnectionPool(srv.address) as pool:
            with pytest.raises(ConnectionLost, match="before the response head") as info:
                await pool.request("POST", "/", [], b"side effects?")
            assert info.value.request_sent is True
            assert pool.size == 0 and pool.active == 0

    run(scenario)


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
], ids=["status", "garbage", "content-length", "header", "chunk-size", "chunk-crlf",
        "upgrade"])
def test_malformed_response_is_protocol_error(run: Any, response: bytes) -> None:
    async def handler(conn: RawConn) -> None:
        await conn.recv_request()
        await conn.send(response)
        await asyncio.sleep(1)

    async def scenario() -> None:
        async with RawServer(handler) as srv, ConnectionPool(srv.address) as pool:
            with pytest.raises(ProtocolError, match="malformed HTTP response from 127"):
                r = await pool.request("GET", "/")
                await r.aread()
            assert pool.size == 0 and pool.active == 0

    run(scenario)


def test_a_head_under_the_cap_read_with_a_large_body_is_accepted(run: Any) -> None:
    # The head is measured exactly only when the reads could hold more than the cap: one
    # read of a 55 KB head and a 100 KB body is more, and the head is still accepted.
    head = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(500))
    body = bytes(range(256)) * 400

    async def handler(conn: RawConn) -> None:
        await conn.recv_request()
        await conn.send(b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: %d\r\n\r\n"
                        % len(body) + body)
        await asyncio.sleep(1)

    async def scenario() -> None:
        async with RawServer(handler) as srv, ConnectionPool(srv.address) as pool:
            r = await pool.request("GET", "/")
            assert r.status == 200 and len(r.headers) == 501
            assert await r.aread() == body

    run(scenario)


@pytest.mark.parametrize("shape", ["many", "one-huge", "endless"])
def test_huge_response_head_is_capped(run: Any, shape: str) -> None:
    async def handler(conn: RawConn) -> None:
        await conn.recv_request()
        await conn.send(b"HTTP/1.1 200 OK\r\n")
        if shape == "many":
            await conn.send(b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100)
                                     for i in range(1000)) + b"\r\n")
        elif shape == "one-huge":
            await conn.send(b"X-Big: " + b"v" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n")
        else:  # a header that never ends: the cap must trigger without the end of head
            for _ in range(1000):
                await conn.send(b"v" * 4096)
        await asyncio.sleep(1)

    async def scenario() -> None:
        async with RawServer(handler) as srv, ConnectionPool(srv.address) as pool:
            with pytest.raises(ProtocolError, match="exceeds"):
                await pool.request("GET", "/")
            assert pool.size == 0 and pool.active == 0

    run(scenario)


def test_data_after_response_is_not_reused(run: Any) -> None:
    async def handler(conn: RawConn) -> None:
        await conn.recv_request()
        await conn.send(ok(b"one") + ok(b"unsolicited"))
        await asyncio.sleep(1)

    async def scenario() -> None:
        async with RawServer(handler) as srv, ConnectionPool(srv.address) as pool:
            r = await pool.request("GET", "/")
            assert await r.aread() == b"one"
            assert pool.size == 0 and pool.idle == 0

    run(scenario)


def test_header_injection_is_refused(run: Any) -> None:
    async def scenario() -> None:
        async with AioServer(ROUTES) as srv, ConnectionPool(srv.address) as pool:
            for headers, target in (([("X-A", "1\r\nX-Evil: 1")], "/echo"),
                                    ([("X-A\n", "1")], "/echo"),
                                    ([], "/echo HTTP/1.1\r\nX-Evil: 1\r\n\r\nGET /")):
                with pytest.raises(ValueError, match="CR or LF"):
                    await pool.request("GET", target, headers)
            assert pool.active == 0
            r = await pool.request("GET", "/echo")
            await r.aread()
            assert pool.opened == 1  # the refused requests did not cost the connection

    run(scenario)


# -- cancellation and early close -----------------------------------------------------
def test_cancellation_mid_request_leaves_the_pool_clean(run: Any) -> None:
    async def scenario() -> None:
        async with AioServer(ROUTES) as srv, ConnectionPool(srv.address) as pool:
            r = await pool.request("GET", "/echo")
            await r.aread()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await pool.request("GET", "/slow")
            assert pool.active == 0 and pool.size == 0 and pool.idle == 0

            async def endless() -> AsyncIterator[bytes]:
                while True:
                    yield b"x" * 65536
                    await asyncio.sleep(0.001)

            with pytest.raises(TimeoutError):  # cancelled mid-upload
                async with asyncio.timeout(0.1):
                    await pool.request("POST", "/echo", [], endless())
            assert pool.active == 0 and pool.size == 0

            r = await pool.request("GET", "/drip")
            with pytest.raises(TimeoutError):  # cancelled while waiting for body bytes
                async with asyncio.timeout(0.2):
                    await r.aread()
            assert pool.active == 0 and pool.size == 0  # aborted by the cancellation itself
            with pytest.raises(RuntimeError, match="closed"):
                await r.aread()

            with pytest.raises(TimeoutError):  # cancelled in the consumer's own code
                async with asyncio.timeout(0.05), await pool.request("GET", "/big?mib=20") as r:
                    async for _ in r.aiter_bytes():
                        await asyncio.sleep(0.01)
            assert pool.active == 0 and pool.size == 0

            r = await pool.request("POST", "/echo", [], b"still fine")
            assert await r.aread() == b"still fine"
            assert pool.active == 0 and pool.idle == 1

    run(scenario)


def test_response_closed_early_closes_the_connection(run: Any) -> None:
    async def scenario() -> None:
        async with AioServer(ROUTES) as srv, ConnectionPool(srv.address) as pool:
            async with await pool.request("GET", "/big?mib=10") as r:
                await r.aiter_bytes().__anext__()
            assert pool.active == 0 and pool.size == 0
            r = await pool.request("GET", "/big?mib=10")
            del r  # dropped without reading: the connection must not stay "active"
            await asyncio.sleep(0)  # the loop's handle that woke us held the head future
            assert pool.active == 0 and pool.size == 0  # no cycle: freed without gc

    run(scenario)


# -- pool behaviour --------------------------------------------------------------------
def test_pool_bounds_connections_under_concurrency(run: Any) -> None:
    async def scenario() -> None:
        async with AioServer(ROUTES) as srv, \
                ConnectionPool(srv.address, max_connections=4) as pool:
            peak = 0

            async def one(i: int) -> bytes:
                nonlocal peak
                r = await pool.request("POST", "/echo", [], b"%d" % i)
                peak = max(peak, pool.active)
                return await r.aread()

            results = await asyncio.gather(*(one(i) for i in range(200)))
            assert results == [b"%d" % i for i in range(200)]
            assert pool.opened <= 4 and len(srv.peers) <= 4 and peak <= 4
            assert pool.active == 0 and pool.size == pool.idle <= 4

            # a cancelled waiter does not lose its wake-up
            gate = [asyncio.create_task(pool.request("GET", "/slow")) for _ in range(4)]
            await asyncio.sleep(0.1)
            waiter = asyncio.create_task(pool.request("GET", "/echo"))
            await asyncio.sleep(0.05)
            waiter.cancel()
            for t in gate:
                t.cancel()
            await asyncio.gather(waiter, *gate, return_exceptions=True)
            assert pool.active == 0
            r = await pool.request("GET", "/echo")
            await r.aread()

    run(scenario)


def test_pool_is_lifo_and_prunes_idle_connections(run: Any) -> None:
    async def scenario() -> None:
        async with AioServer(ROUTES) as srv, \
                ConnectionPool(srv.address, max_idle=2, idle_timeout=0.2) as pool:
            rs = await asyncio.gather(*(pool.request("GET", "/echo") for _ in range(3)))
            for r in rs:
                await r.aread()
            assert pool.opened == 3 and pool.idle == 2 and pool.size == 2  # max_idle
            last = pool._idle[-1]
            r = await pool.request("GET", "/echo")
            assert pool._idle[-1] is last  # LIFO: the most recently used went out and back
            await r.aread()
            await asyncio.sleep(0.6)
            assert pool.idle == 0 and pool.size == 0

    run(scenario)


def test_unix_socket_address(run: Any, tmp_path: Path) -> None:
    async def scenario() -> None:
        path = tmp_path / "svc.sock"
        async with AioServer(ROUTES, unix=path) as srv:
            for address in (srv.address, str(path)):
                async with ConnectionPool(address) as pool:
                    for i in range(5):
                        r = await pool.request("POST", "/echo", [], b"u%d" % i)
                        assert await r.aread() == b"u%d" % i
                        assert r.header("x-host") == b"localhost"
                    assert pool.opened == 1

    run(scenario)


def test_closed_pool_refuses_requests(run: Any) -> None:
    async def scenario() -> None:
        async with AioServer(ROUTES) as srv:
            pool = ConnectionPool(srv.address)
            r = await pool.request("GET", "/echo")
            await r.aread()
            await pool.aclose()
            assert pool.size == 0
            with pytest.raises(ConnectError, match="closed"):
                await pool.request("GET", "/echo")

    run(scenario)


def test_response_repr_and_types(run: Any) -> None:
    async def scenario() -> None:
        async with AioServer(ROUTES) as srv, ConnectionPool(srv.address) as pool:
            r = await pool.request("GET", "/echo")
            assert isinstance(r, Response) and "200" in repr(r) and srv.address in repr(r)
            assert all(type(k) is bytes and type(v) is bytes for k, v in r.headers)
            await r.aread()
            assert "ConnectionPool" in repr(pool)
            r = await pool.request("POST", "/echo", [], b'{"a": [1, 2]}')
            assert await r.json() == {"a": [1, 2]}

    run(scenario)


def test_encoded_header_lines_are_sent_as_pairs_would_be(run: Any) -> None:
    heads: list[bytes] = []

    async def record(conn: RawConn) -> None:
        while True:
            head, body = await conn.recv_request()
            heads.append(head + b"|" + body)
            await conn.send(ok())

    async def scenario() -> None:
        pairs = [(b"x-a", b"1"), (b"content-length", b"4")]
        block = EncodedHeaders(b"x-a: 1\r\ncontent-length: 4\r\n", 2, content_length=4)
        assert list(block) == pairs
        async with RawServer(record) as srv, ConnectionPool(srv.address) as pool:
            for headers in (pairs, block):
                r = await pool.request("POST", "/p", headers, b"data")
                assert await r.aread() == b"ok"
            host = EncodedHeaders(b"host: svc.internal\r\n", 1, host=True)
            assert await (await pool.request("GET", "/h", host)).aread() == b"ok"
            for bad in (EncodedHeaders(b"x-a: 1\r\nx-b: 2\r\n", 1),  # a line not counted
                        EncodedHeaders(b"x-a: 1\nx-b: 2\r\n", 1)):
                with pytest.raises(ValueError, match="CR or LF"):
                    await pool.request("GET", "/", bad)
            with pytest.raises(ValueError, match="Content-Length 4 but the body has 2"):
                await pool.request("POST", "/", block, b"xx")
        assert heads[0] == heads[1]
        assert heads[0].startswith(b"POST /p HTTP/1.1\r\nx-a: 1\r\ncontent-length: 4\r\nHost: ")
        assert heads[2].startswith(b"GET /h HTTP/1.1\r\nhost: svc.internal|")
        assert len(heads) == 3  # nothing was sent for a refused head

    run(scenario)
