"""Fuzzing the whole request path: hostile HTTP/1.1 byte streams against a real
``HttpServer`` running the ``Gateway``, whose upstream is a recording backend parsing with
an independent HTTP implementation (h11).

tests/gateway/test_server.py fuzzes the server core with a handler; what it cannot see is
what a *proxied* request becomes on the upstream side. Here, for every example:

* every request the backend completed was answered to the client with that backend's
  answer, and nothing else reached it: a refused request never reaches the backend, and
  one client request never turns into two upstream requests (smuggling, desync);
* every answer not from the backend is an error the gateway made (status >= 400, a
  ``shoal-error`` header naming the layer);
* the backend never sees unparseable HTTP, a request with both Content-Length and
  Transfer-Encoding, a hop-by-hop header, or a path with dot segments or a NUL;
* the gateway never logs an error or an unhandled exception, and keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import h11
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.gateway import HttpServer, ServerLimits
from shoal.gateway.proxy import Gateway
from shoal.gateway.routes import RouteTable
from shoal.mesh.registry import EndpointCache, Instance, Registry
from shoal.store import connect_store
from tests.gateway.test_server import VALID, Wire, hostile_requests, parse_responses

ROUTES = [
    {"name": "rewritten", "match": {"path": {"prefix": "/r"}}, "rewrite": {"prefix": "/x"},
     "headers": {"request": {"set": {"x-route": "r"}, "remove": ["x-secret"]}},
     "service": "backend"},
    {"name": "posts", "match": {"path": {"prefix": "/p"}, "methods": ["POST", "PUT"]},
     "timeout": "2s", "retries": {"attempts": 0}, "service": "backend"},
    {"name": "rest", "service": "backend"},
]
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade",
              b"trailer"}


class RecordingBackend(asyncio.Protocol):
    """One upstream connection, parsed with h11; complete requests are recorded and
    answered with ``x-call: N``."""

    def __init__(self, fuzz: ProxyFuzz) -> None:
        self.fuzz = fuzz
        self.conn = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None
        self.request: h11.Request | None = None
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._events(eof=False)

    def eof_received(self) -> None:
        self.conn.receive_data(b"")
        self._events(eof=True)

    def _events(self, *, eof: bool) -> None:
        assert self.transport is not None
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                if not eof:  # the gateway sent something a strict parser refuses
                    self.fuzz.errors.append(f"backend could not parse the upstream request: "
                                            f"{exc}")
                self.transport.close()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(
                    event, h11.ConnectionClosed):
                if event is h11.PAUSED and self.conn.our_state is h11.DONE:
                    self.conn.start_next_cycle()
                    continue
                return
            if isinstance(event, h11.Request):
                self.request, self.body = event, bytearray()
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert self.request is not None
                call = next(self.fuzz.ids)
                self.fuzz.calls.append((call, self.request, bytes(self.body)))
                self.transport.write(self.conn.send(h11.Response(
                    status_code=200, headers=[(b"x-call", b"%d" % call),
                                              (b"content-length", b"2")])))
                self.transport.write(self.conn.send(h11.Data(data=b"ok")))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
                if self.conn.our_state is h11.MUST_CLOSE:
                    self.transport.close()
                    return
                self.conn.start_next_cycle()


class ProxyFuzz:
    """The gateway and the backend, on uvloop in a thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, h11.Request, bytes]] = []
        self.errors: list[str] = []
        self.ids = itertools.count(1)
        self.port = 0
        self.server: HttpServer | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=uvloop.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, ctx: self.errors.append(str(ctx)))
        errors = self.errors

        class Capture(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                errors.append(record.getMessage())

        capture = Capture(logging.ERROR)
        logging.getLogger("shoal").addHandler(capture)
        backend = await loop.create_server(lambda: RecordingBackend(self), "127.0.0.1", 0)
        backend_port = backend.sockets[0].getsockname()[1]
        store = await connect_store(f"memory://{uuid.uuid4().hex}")
        registry = Registry(store)
        await registry.register(Instance(id="b1", service="backend",
                                         address=f"127.0.0.1:{backend_port}"))
        cache = await EndpointCache(store).start()
        await cache.wait_for("backend")
        gateway = Gateway(RouteTable.from_config(ROUTES), cache)
        self.server = HttpServer(gateway.handle, limits=ServerLimits(
            max_header_bytes=2048, max_headers=20, max_body_bytes=4096, header_timeout=2.0,
            body_timeout=2.0, max_pipelined=4))
        await self.server.start("127.0.0.1", 0)
        self.port = self.server.port
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.server.shutdown(1.0)
            await gateway.aclose()
            await cache.close()
            await registry.close()
            backend.close()
            await store.close()
            logging.getLogger("shoal").removeHandler(capture)

    def __enter__(self) -> ProxyFuzz:
        self._thread.start()
        assert self._ready.wait(20), "the fuzz gateway did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def send(self, data: bytes, cuts: tuple[int, ...] = ()) -> list[Wire]:
        """One client connection: ``data`` in pieces, half-close, read until closed; then
        wait until the gateway has let the connection go (so every upstream call of this
        example is over)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(OSError):
                start = 0
                for cut in (*sorted(cuts), len(data)):
                    s.sendall(data[start:cut])
                    start = cut
                    if cut < len(data):
                        time.sleep(0.0005)
                s.shutdown(socket.SHUT_WR)
            raw = bytearray()
            with contextlib.suppress(OSError):
                while got := s.recv(65536):
                    raw += got
        deadline = time.monotonic() + 5
        while self.server is not None and self.server.connections and \
                time.monotonic() < deadline:
            time.sleep(0.001)
        return parse_responses(bytes(raw))


@pytest.fixture(scope="module")
def proxy_fuzz() -> Iterator[ProxyFuzz]:
    with ProxyFuzz() as fuzz:
        yield fuzz


PROXY_VALID = [
    b"GET /r/a?q=1 HTTP/1.1\r\nHost: a\r\nX-Secret: s\r\nConnection: x-hop\r\nX-Hop: 1\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
    b"\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET /r/../x HTTP/1.1\r\nHost: a\r\n\r\nGET /%2e%2e/etc HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://other/r/x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    # classic smuggling shapes: the body hides a second request
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 32\r\n\r\n"
    b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\nGET /b",
    b"PUT /p/a%00b HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx",
]
PROXY_LINES = [b"Transfer-Encoding: chunked", b"Content-Length: 3", b"Connection: x-hop",
               b"X-Hop: 1", b"Upgrade: websocket", b"Proxy-Connection: keep-alive",
               b"Host: a", b"Transfer-Encoding: \x0bchunked", b"Content-Length: +3",
               b"X-Forwarded-For: \r\n", b"Expect: 100-continue", b"TE: chunked"]


@st.composite
def proxy_requests(draw: st.DrawFn) -> bytes:
    """The server fuzz's hostile requests, and proxy-shaped ones mutated the same way."""
    if draw(st.booleans()):
        return draw(hostile_requests())
    data = draw(st.sampled_from(PROXY_VALID))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data)))
        if op == 0:
            data = data[:pos] + draw(st.sampled_from([b"\r", b"\n", b"\r\n", b"\x00", b" ",
                                                      b":", b"0", b"\r\n\r\n"])) + data[pos:]
        elif op == 1:
            line = draw(st.sampled_from(PROXY_LINES))
            first = data.find(b"\r\n") + 2
            data = data[:first] + line + b"\r\n" + data[first:]
        elif op == 2:
            data = data[:pos] + data[pos + draw(st.integers(1, 6)):]
        else:
            data = data + draw(st.sampled_from(PROXY_VALID + VALID))
    return data


def check_upstream_request(request: h11.Request) -> None:
    names = [name.lower() for name, _ in request.headers]
    assert not (b"content-length" in names and b"transfer-encoding" in names), names
    assert not HOP_BY_HOP & set(names), names
    path = request.target.split(b"?", 1)[0]
    assert path.startswith(b"/"), request.target
    segments = path.split(b"/")
    assert b".." not in segments and b"." not in segments, request.target
    assert b"\x00" not in path and b"%00" not in path, request.target
    assert b"x-secret" not in names or not path.startswith(b"/x"), names


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=proxy_requests(), cuts=st.lists(st.integers(0, 300), max_size=2))
def test_fuzz_proxy_path(proxy_fuzz: ProxyFuzz, data: bytes, cuts: list[int]) -> None:
    """See the module docstring: nothing refused reaches the backend, nothing reaches it
    unanswered, every other answer is a named error, and the gateway stays up."""
    before = len(proxy_fuzz.calls)
    resps = proxy_fuzz.send(data, tuple(c for c in cuts if c < len(data)))
    reached = proxy_fuzz.calls[before:]
    answered = [int(r.header(b"x-call") or 0) for r in resps if r.header(b"x-call")]
    assert sorted(answered) == [call for call, _, _ in reached], (data, resps, reached)
    for _, request, _ in reached:
        check_upstream_request(request)
    for r in resps:
        if r.header(b"x-call") is None and r.status != 100:
            assert r.status >= 400, (r, data)
            error: Any = r.header(b"shoal-error")
            assert error and r.json()["layer"] in error.decode(), (r, data)
    assert proxy_fuzz.errors == [], (proxy_fuzz.errors, data)


def test_smuggled_request_never_reaches_the_backend(proxy_fuzz: ProxyFuzz) -> None:
    """The two classic shapes, without mutation: the hidden ``GET /admin`` is never seen."""
    before = len(proxy_fuzz.calls)
    resps = proxy_fuzz.send(PROXY_VALID[5])  # CL + TE: refused outright
    assert [r.status for r in resps] == [400] and proxy_fuzz.calls[before:] == []
    resps = proxy_fuzz.send(PROXY_VALID[6])  # CL covers the inner request: it is a body
    calls = proxy_fuzz.calls[before:]
    assert [r.status for r in resps] == [200, 400] and len(calls) == 1
    assert calls[0][1].target == b"/p" and calls[0][2].startswith(b"GET /admin")
    assert all(c[1].target != b"/admin" for c in proxy_fuzz.calls[before:])


def test_route_edits_and_hop_by_hop_headers_on_the_upstream_side(proxy_fuzz: ProxyFuzz) -> None:
    before = len(proxy_fuzz.calls)
    resps = proxy_fuzz.send(PROXY_VALID[0])
    assert [r.status for r in resps] == [200]
    [(_, request, _)] = proxy_fuzz.calls[before:]
    headers = dict(request.headers)
    assert request.target == b"/x/a?q=1" and headers[b"x-route"] == b"r"
    assert b"x-hop" not in headers and b"x-secret" not in headers  # listed in Connection
    assert headers[b"x-forwarded-for"] == b"127.0.0.1"
