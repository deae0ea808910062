"""TLS reads on the mesh's hot path: decrypted into a reused buffer, on both event loops.

Each read of a TLS connection served by a plain ``asyncio.Protocol`` allocates a 256 KiB
``bytes`` (an mmap, a page fault and a munmap per read: strict mTLS cost several times
plaintext in ``bench/mesh_tls.py``); the mesh's client and server connections over TLS are
``BufferedProtocol``s instead. These tests run the real client and server over real
sockets under the standard loop and uvloop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from shoal.control.ca import CertificateAuthority
from shoal.gateway.server import HttpServer, Request, Response
from shoal.mesh.http1 import ConnectionPool, Http1Connection, TlsHttp1Connection
from shoal.mesh.security import MeshTLS
from shoal.mesh.tls_reads import READ_BUFFER_SIZE, BufferedReads, buffered_reads
from tests.security.conftest import issue

LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


async def _with_mtls(ca: CertificateAuthority, handler: Callable[[Request], Any],
                     scenario: Callable[[ConnectionPool, HttpServer], Awaitable[None]]) -> None:
    server_tls, client_tls = MeshTLS(issue(ca, "echo")), MeshTLS(issue(ca, "caller"))
    server = HttpServer(handler, ssl=server_tls.server_context)
    await server.start("127.0.0.1", 0)
    pool = ConnectionPool(("127.0.0.1", server.port), ssl=client_tls.client_context("echo"))
    try:
        await scenario(pool, server)
    finally:
        await pool.aclose()
        await server.shutdown(1)


async def _peak_allocated(pool: ConnectionPool, calls: int) -> int:
    """Bytes allocated at peak (both ends run in this process) during ``calls`` GETs."""
    started = not tracemalloc.is_tracing()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for _ in range(calls):
            assert await (await pool.request("GET", "/")).aread() == b"ok"
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()


@LOOPS
def test_keep_alive_mtls_requests_allocate_no_read_buffer_per_read(
        ca: CertificateAuthority, run: Callable[[Any], None]) -> None:
    async def scenario(pool: ConnectionPool, server: HttpServer) -> None:
        for _ in range(3):  # handshake, first reads, the thread's buffer: not measured
            assert await (await pool.request("GET", "/")).aread() == b"ok"
        peak = await _peak_allocated(pool, 30)
        # Before: at least one 256 KiB bytes per read, on each end of every exchange.
        assert peak < READ_BUFFER_SIZE // 4, f"{peak} bytes allocated at peak for 30 calls"
        assert pool.opened == 1 and server.connections == 1  # one connection, one handshake
        (conn,) = pool._idle
        assert isinstance(conn, TlsHttp1Connection) and isinstance(conn, Http1Connection)
        assert isinstance(conn, asyncio.BufferedProtocol)
        assert not isinstance(conn, asyncio.Protocol)  # loops ignore get_buffer on those
        (served,) = server._conns
        assert isinstance(served, asyncio.BufferedProtocol)

    run(_with_mtls(ca, lambda request: Response(b"ok"), scenario))


async def _echo(request: Request) -> Response:
    body = await request.body()
    return Response(hashlib.sha256(body).hexdigest().encode() + b" " + body[:16] + body[-16:])


@LOOPS
def test_large_bodies_cross_mtls_both_ways_through_the_buffer(
        ca: CertificateAuthority, run: Callable[[Any], None]) -> None:
    """More than one buffer's worth per read, the raw-body path (Content-Length) and
    chunked streaming: every byte arrives, in order, on both ends."""
    payload = os.urandom(3 * READ_BUFFER_SIZE + 12345)
    digest = hashlib.sha256(payload).hexdigest().encode()

    async def big(request: Request) -> Response:
        if request.path == "/download":
            return Response(payload)
        return await _echo(request)

    async def chunks() -> Any:
        view = memoryview(payload)
        for start in range(0, len(payload), 100_000):
            yield bytes(view[start:start + 100_000])

    async def scenario(pool: ConnectionPool, server: HttpServer) -> None:
        expected = digest + b" " + payload[:16] + payload[-16:]
        resp = await pool.request("POST", "/upload", body=payload)
        assert (resp.status, await resp.aread()) == (200, expected)
        resp = await pool.request("POST", "/upload", body=chunks())
        assert (resp.status, await resp.aread()) == (200, expected)
        resp = await pool.request("GET", "/download")
        assert hashlib.sha256(await resp.aread()).hexdigest().encode() == digest
        streamed = hashlib.sha256()
        async for chunk in (await pool.request("GET", "/download")).aiter_bytes():
            streamed.update(chunk)
        assert streamed.hexdigest().encode() == digest
        assert pool.opened == 1

    run(_with_mtls(ca, big, scenario))


async def _asgi_echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = hashlib.sha256(body).hexdigest().encode() if body else b"ok"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})


@LOOPS
def test_uvicorn_over_mtls_reads_through_buffered_reads(
        ca: CertificateAuthority, run: Callable[[Any], None]) -> None:
    """A ``Service``'s server is uvicorn, whose protocol we do not own: ``buffered_reads``
    wraps it, and a keep-alive mTLS exchange allocates no read buffer on either end."""
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    async def scenario() -> None:
        server_tls, client_tls = MeshTLS(issue(ca, "echo")), MeshTLS(issue(ca, "caller"))
        config = uvicorn.Config(
            _asgi_echo, http=buffered_reads(HttpToolsProtocol), lifespan="off",
            log_level="warning", access_log=False,
            ssl_context_factory=lambda _config, _default: server_tls.server_context)
        server = uvicorn.Server(config)
        sock = socket.create_server(("127.0.0.1", 0))
        serving = asyncio.ensure_future(server._serve(sockets=[sock]))  # no signal handlers
        while not server.started:
            assert not serving.done(), serving.exception()
            await asyncio.sleep(0.01)
        pool = ConnectionPool(sock.getsockname()[:2], ssl=client_tls.client_context("echo"))
        try:
            for _ in range(3):
                assert await (await pool.request("GET", "/")).aread() == b"ok"
            peak = await _peak_allocated(pool, 30)
            assert peak < READ_BUFFER_SIZE // 4, f"{peak} bytes allocated at peak for 30 calls"
            payload = os.urandom(2 * READ_BUFFER_SIZE + 99)
            resp = await pool.request("POST", "/", body=payload)
            assert await resp.aread() == hashlib.sha256(payload).hexdigest().encode()
            assert pool.opened == 1
            (connection,) = server.server_state.connections
            assert isinstance(connection, HttpToolsProtocol)  # uvicorn's own bookkeeping
        finally:
            await pool.aclose()
            server.should_exit = True
            await serving
            sock.close()

    run(scenario())


def test_each_thread_decrypts_into_its_own_buffer() -> None:
    """OpenSSL releases the GIL while it decrypts: loops in two threads must not share."""
    conn = BufferedReads(asyncio.Protocol())
    mine = conn.get_buffer(-1)
    theirs: list[memoryview] = []
    thread = threading.Thread(target=lambda: theirs.append(conn.get_buffer(-1)))
    thread.start()
    thread.join()
    assert mine is conn.get_buffer(0) and len(mine) == READ_BUFFER_SIZE
    assert theirs[0] is not mine and len(theirs[0]) == READ_BUFFER_SIZE
