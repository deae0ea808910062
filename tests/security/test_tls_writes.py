"""A Service's responses over mTLS: one TLS record per small response, nothing lost or reordered.

uvicorn writes a response's head and body with two ``transport.write`` calls, which a TLS
transport makes two records and two sends; ``buffered_reads`` (what a ``Service`` serves
mTLS with) hands it a ``CoalescedWrites`` transport instead. The record count is read off
the wire by a client that does its own TLS over a plain socket, record by record.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

from shoal.control.ca import CertificateAuthority
from shoal.mesh.security import MeshTLS
from shoal.mesh.tls_reads import buffered_reads
from shoal.mesh.tls_writes import JOIN_LIMIT, CoalescedWrites
from tests.security.conftest import issue

LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
BIG = bytes(range(256)) * 1024  # 256 KiB: streamed in chunks over several loop turns


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/small``: head and body in one turn; ``/stream``: ``BIG`` in chunks, a turn each;
    ``/close``: a small answer with ``connection: close``."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(BIG)).encode())]})
        for start in range(0, len(BIG), 50_000):
            await send({"type": "http.response.body", "body": BIG[start:start + 50_000],
                        "more_body": True})
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [(b"content-length", b"2")]
    if path == "/close":
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


class RecordCountingClient:
    """mTLS over a plain socket, by hand: counts the records that carried response bytes."""

    def __init__(self, context: ssl.SSLContext, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=False)
        self.reader, self.writer = reader, writer
        self.raw = b""

    async def _record(self) -> bytes:
        """The next whole TLS record off the wire (header included)."""
        while len(self.raw) < 5 or len(self.raw) < 5 + int.from_bytes(self.raw[3:5], "big"):
            chunk = await self.reader.read(65536)
            assert chunk, "the server closed the connection mid-record"
            self.raw += chunk
        size = 5 + int.from_bytes(self.raw[3:5], "big")
        record, self.raw = self.raw[:size], self.raw[size:]
        return record

    def _send_pending(self) -> None:
        if self.outgoing.pending:
            self.writer.write(self.outgoing.read())

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_pending()
                self.incoming.write(await self._record())
        self._send_pending()

    async def exchange(self, request: bytes, body_size: int) -> tuple[bytes, int]:
        """Send ``request``; the response (a body of ``body_size`` bytes) and how many
        records held it."""
        self.tls.write(request)
        self._send_pending()
        data, records = b"", 0
        while b"\r\n\r\n" not in data or len(data) < _head_end(data) + body_size:
            self.incoming.write(await self._record())
            got = b""
            while True:
                try:
                    chunk = self.tls.read(1 << 20)
                except ssl.SSLWantReadError:
                    break
                if not chunk:
                    break
                got += chunk
            records += bool(got)  # session tickets carry no application data
            data += got
        return data, records


    async def closed_by_peer(self) -> bool:
        """Read records until the peer's close_notify (True) or one with data (False)."""
        while True:
            self.incoming.write(await self._record())
            try:
                if self.tls.read(1 << 20):
                    return False
                return True  # b"": close_notify
            except ssl.SSLZeroReturnError:
                return True
            except ssl.SSLWantReadError:
                continue


async def _uvicorn_mtls(ca: CertificateAuthority, scenario: Callable[..., Any]) -> None:
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    server_tls, client_tls = MeshTLS(issue(ca, "echo")), MeshTLS(issue(ca, "caller"))
    config = uvicorn.Config(
        _app, http=buffered_reads(HttpToolsProtocol), lifespan="off", log_level="warning",
        access_log=False, ssl_context_factory=lambda _config, _default: server_tls.server_context)
    server = uvicorn.Server(config)
    sock = socket.create_server(("127.0.0.1", 0))
    serving = asyncio.ensure_future(server._serve(sockets=[sock]))  # no signal handlers
    writer = None
    try:
        while not server.started:
            assert not serving.done(), serving.exception()
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        client = RecordCountingClient(client_tls.context_for("echo"), reader, writer)
        await client.handshake()
        await scenario(client)
    finally:
        if writer is not None:
            writer.close()
        server.should_exit = True
        await serving
        sock.close()


def _head_end(data: bytes) -> int:
    return data.index(b"\r\n\r\n") + 4


@LOOPS
def test_a_small_response_is_one_tls_record(ca: CertificateAuthority,
                                            run: Callable[[Any], None]) -> None:
    """Before: head and body were two records (and two sends) on every call."""

    async def scenario(client: RecordCountingClient) -> None:
        for _ in range(3):  # keep-alive: every response, not only the first
            data, records = await client.exchange(
                b"GET /small HTTP/1.1\r\nHost: echo\r\n\r\n", 2)
            assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nok")
            assert records == 1, f"the response took {records} TLS records"

    run(_uvicorn_mtls(ca, scenario))


@LOOPS
def test_streamed_and_closing_responses_arrive_whole_and_in_order(
        ca: CertificateAuthority, run: Callable[[Any], None]) -> None:
    async def scenario(client: RecordCountingClient) -> None:
        data, _ = await client.exchange(b"GET /stream HTTP/1.1\r\nHost: echo\r\n\r\n",
                                        len(BIG))
        body = data[_head_end(data):]
        assert hashlib.sha256(body).digest() == hashlib.sha256(BIG).digest()
        # close() writes what is held first: the answer is whole, then the connection ends
        data, records = await client.exchange(b"GET /close HTTP/1.1\r\nHost: echo\r\n\r\n", 2)
        assert data.endswith(b"\r\n\r\nok") and b"connection: close" in data
        assert records == 1
        async with asyncio.timeout(5):  # then the server ends the session: close_notify
            assert await client.closed_by_peer()

    run(_uvicorn_mtls(ca, scenario))


class _Recorded(asyncio.Transport):
    """A transport that records what it is asked to do (the wrapper's contract, no I/O)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []

    def write(self, data: Any) -> None:
        self.calls.append(("write", bytes(data)))

    def close(self) -> None:
        self.calls.append(("close", None))

    def abort(self) -> None:
        self.calls.append(("abort", None))

    def get_write_buffer_size(self) -> int:
        return 7

    def write_eof(self) -> None:
        self.calls.append(("write_eof", None))


async def test_coalesced_writes_keep_order_and_close_after_what_is_held() -> None:
    inner = _Recorded()
    t = CoalescedWrites(inner)
    t.write(b"head ")
    t.write(bytearray(b"body"))
    t.write(b"")
    assert inner.calls == [] and t.get_write_buffer_size() == 9 + 7
    await asyncio.sleep(0)  # the end of the turn
    assert inner.calls == [("write", b"head body")]
    t.write(b"last")
    t.close()  # what is held goes first, at once
    assert inner.calls[1:] == [("write", b"last"), ("close", None)]
    await asyncio.sleep(0)
    assert len(inner.calls) == 3  # the scheduled flush found nothing left


async def test_coalesced_writes_abort_drops_and_large_writes_are_not_joined() -> None:
    inner = _Recorded()
    t = CoalescedWrites(inner)
    t.write(b"dropped")
    t.abort()
    await asyncio.sleep(0)
    assert inner.calls == [("abort", None)] and t.get_write_buffer_size() == 7
    inner.calls.clear()
    big = b"x" * JOIN_LIMIT
    t.write(b"head")
    t.write(big)
    t.write_eof()
    assert inner.calls == [("write", b"head"), ("write", big), ("write_eof", None)]
