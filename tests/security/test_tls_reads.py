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
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from shoal.control.ca import CertificateAuthority
from shoal.gateway.server import HttpServer, Request, Response
from shoal.mesh.http1 import ConnectionPool, Http1Connection, TlsHttp1Connection
from shoal.mesh.security import MeshTLS
from shoal.mesh.tls_reads import READ_BUFFER_SIZE
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


@LOOPS
def test_keep_alive_mtls_requests_allocate_no_read_buffer_per_read(
        ca: CertificateAuthority, run: Callable[[Any], None]) -> None:
    async def scenario(pool: ConnectionPool, server: HttpServer) -> None:
        for _ in range(3):  # handshake, first reads, the thread's buffer: not measured
            assert await (await pool.request("GET", "/")).aread() == b"ok"
        started = not tracemalloc.is_tracing()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            for _ in range(30):
                assert await (await pool.request("GET", "/")).aread() == b"ok"
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            if started:
                tracemalloc.stop()
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
