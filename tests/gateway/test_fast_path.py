# ruff: noqa: F811  (the env fixture is imported from test_proxy and requested by name)
"""The gateway's fast path (``Gateway.fast_handle`` + ``Upstream.start``): it is taken for
plain requests on a warm pool, with no task per request, and whatever it cannot finish
falls back to the coroutine path with the same behaviour. Real sockets throughout: aiohttp
backends from ``test_proxy``, and raw asyncio backends that misbehave on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from shoal.mesh.fast_try import FastTry
from shoal.mesh.registry import Instance
from tests.gateway.test_proxy import Env, env  # noqa: F401  (the fixture)

pytestmark = pytest.mark.asyncio


@contextlib.contextmanager
def counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts of fast tries ended and of server tasks made (one per request not fast)."""
    counts = {"fast": 0, "failed_fast": 0, "run_tasks": 0}
    for name in ("on_complete", "on_partial"):
        real = getattr(FastTry, name)

        def spy(self: FastTry, resp: Any, _real: Any = real) -> None:
            counts["fast"] += 1
            _real(self, resp)

        monkeypatch.setattr(FastTry, name, spy)
    real_failed = FastTry.on_failed

    def failed(self: FastTry, exc: BaseException, resp: Any) -> None:
        counts["failed_fast"] += 1
        real_failed(self, exc, resp)

    monkeypatch.setattr(FastTry, "on_failed", failed)
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        if "_ServerConnection." in getattr(coro, "__qualname__", ""):
            counts["run_tasks"] += 1
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    try:
        yield counts
    finally:
        loop.set_task_factory(previous)


async def _raw_backend(env: Env, service: str, name: str,
                       serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter, int],
                                       Awaitable[None]]) -> asyncio.Server:
    """A backend speaking raw bytes: ``serve(reader, writer, n)`` per connection (n: the
    connection's number), registered under ``service``."""
    count = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count[0] += 1
        try:
            await serve(reader, writer, count[0])
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    await env.backends.registry.register(Instance(id=name, service=service,
                                                  address=f"127.0.0.1:{port}"))
    return server


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


async def test_plain_requests_take_the_fast_path_with_no_task(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    await env.backends.add("orders", "o1")
    await env.start([{"match": {"path": {"prefix": "/"}}, "service": "orders",
                      "headers": {"response": {"add": {"x-via": "shoal"}}}}],
                    wait={"orders": 1})
    resp, _ = await env.json("GET", "/warm")  # opens the pooled connection (coroutine path)
    assert resp.status == 200
    with counting(monkeypatch) as counts:
        for i in range(20):
            resp, seen = await env.json("POST", f"/o/{i}", body=b"x" * i,
                                        headers=[("x-request-id", f"id-{i}")])
            assert resp.status == 200 and seen["path"] == f"/o/{i}" and seen["size"] == i
            assert resp.header("x-via") == b"shoal" and resp.header("x-up") is None
            names = {k.lower(): v for k, v in seen["headers"]}
            assert names["x-request-id"] == f"id-{i}"
            assert names["x-forwarded-for"] == "127.0.0.1"
            assert names["x-forwarded-proto"] == "http"
    assert counts == {"fast": 20, "failed_fast": 0, "run_tasks": 0}
    upstream = next(iter(env.gateway._upstreams.values()))  # type: ignore[union-attr]
    assert upstream.stats.requests == 21 and upstream.stats.tries == 21
    assert upstream.breaker.active == 0


async def test_what_the_fast_path_cannot_do_falls_back(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    await env.backends.add("orders", "o1")
    await env.start([
        {"match": {"path": {"prefix": "/fault"}}, "service": "orders",
         "fault": {"abort": {"status": 418, "percent": 100}}},
        {"match": {"path": {"prefix": "/"}}, "service": "orders"}], wait={"orders": 1})
    with counting(monkeypatch) as counts:
        resp, _ = await env.json("GET", "/cold")  # no idle connection yet
        assert resp.status == 200
        assert counts["fast"] == 0 and counts["run_tasks"] == 1
        resp = await env.request("GET", "/fault")
        assert resp.status == 418 and resp.header("shoal-error") == b"fault; fault-injected"
        await resp.aread()
        assert counts["run_tasks"] == 2
        resp, seen = await env.json("PUT", "/big", body=b"b" * (70 * 1024))  # > BUFFER_MAX
        assert resp.status == 200 and seen["size"] == 70 * 1024
        assert counts["fast"] == 0 and counts["run_tasks"] == 3
        resp = await env.request("GET", "/nope", host="other.test")
        assert resp.status == 200  # a prefix "/" route matches any host
        await resp.aread()
        assert counts["fast"] == 1 and counts["run_tasks"] == 3


async def test_pipelined_requests_are_answered_in_order(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    await env.backends.add("orders", "o1")
    await env.start([{"match": {"path": {"prefix": "/"}}, "service": "orders"}],
                    wait={"orders": 1})
    resp, _ = await env.json("GET", "/warm")
    assert resp.status == 200 and env.server is not None
    with counting(monkeypatch) as counts:
        reader, writer = await asyncio.open_connection("127.0.0.1", env.server.port)
        try:
            writer.write(b"".join(b"GET /p/%d HTTP/1.1\r\nhost: a\r\n\r\n" % i
                                  for i in range(8)))
            paths = []
            for _ in range(8):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                paths.append(json.loads(await reader.readexactly(length))["path"])
        finally:
            writer.close()
            await writer.wait_closed()
    assert paths == [f"/p/{i}" for i in range(8)]
    assert counts["fast"] >= 7  # the first may open a second pooled connection


async def test_upstream_reset_on_a_pooled_connection_is_retried_elsewhere(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    async def resets_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            n: int) -> None:
        await _read_head(reader)
        writer.write(_ok(b'{"backend":"bad"}'))
        await _read_head(reader)  # the next request on the pooled connection: reset
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    bad = await _raw_backend(env, "orders", "bad", resets_second)
    try:
        await env.backends.add("orders", "good")
        await env.start([{"match": {"path": {"prefix": "/"}}, "service": "orders",
                          "retries": {"attempts": 2, "retry_on": ["reset", "connect-failure"]},
                          "load_balancer": {"policy": "round_robin"}}],
                        wait={"orders": 2})
        backends = set()
        for _ in range(2):  # warm: one pooled connection to each
            resp, seen = await env.json("GET", "/warm")
            backends.add(seen["backend"])
        assert backends == {"bad", "good"}
        with counting(monkeypatch) as counts:
            answers = []
            for _ in range(2):
                resp, seen = await env.json("GET", "/after")
                assert resp.status == 200
                answers.append(seen["backend"])
        # one of them met the reset on its fast try, and was retried on "good" in a task
        # (the retry's pick moves the round robin on, so which one depends on the order)
        assert "good" in answers
        assert counts["failed_fast"] == 1 and counts["run_tasks"] >= 1
        upstream = next(iter(env.gateway._upstreams.values()))  # type: ignore[union-attr]
        assert upstream.stats.retries == 1 and upstream.stats.failures == 0
        assert upstream.breaker.active == 0
    finally:
        bad.close()


async def test_upstream_reset_without_retries_is_a_named_error(env: Env) -> None:
    async def resets_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            n: int) -> None:
        await _read_head(reader)
        writer.write(_ok(b"{}"))
        await _read_head(reader)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    bad = await _raw_backend(env, "orders", "bad", resets_second)
    try:
        await env.start([{"match": {"path": {"prefix": "/"}}, "service": "orders",
                          "retries": {"attempts": 0}}], wait={"orders": 1})
        resp = await env.request("GET", "/warm")
        assert resp.status == 200
        await resp.aread()
        resp, body = await env.json("GET", "/again")
        assert resp.status == 502 and body["layer"] == "upstream"
        assert resp.header("shoal-error", b"").startswith(b"upstream; ")  # type: ignore[union-attr]
    finally:
        bad.close()


async def test_backend_closing_mid_response_cuts_the_client_off(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    async def cuts_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          n: int) -> None:
        await _read_head(reader)
        writer.write(_ok(b"{}"))
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        await writer.drain()
        await asyncio.sleep(0.05)  # a separate read: the head arrives without all the body

    bad = await _raw_backend(env, "orders", "cut", cuts_second)
    try:
        await env.start([{"match": {"path": {"prefix": "/"}}, "service": "orders"}],
                        wait={"orders": 1})
        assert env.server is not None
        resp = await env.request("GET", "/warm")
        await resp.aread()
        with counting(monkeypatch) as counts:
            reader, writer = await asyncio.open_connection("127.0.0.1", env.server.port)
            try:
                writer.write(b"GET /cut HTTP/1.1\r\nhost: a\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200") and b"content-length: 100" in head
                rest = await asyncio.wait_for(reader.read(), 5)  # ends: the client sees EOF
                assert rest == b"0123456789"
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
        assert counts["fast"] == 1  # the head came fast; the body streamed in a task
        assert counts["run_tasks"] == 1
        # the gateway goes on serving (a new upstream connection)
        resp = await env.request("GET", "/warm")
        assert resp.status == 200
        await resp.aread()
    finally:
        bad.close()


async def test_per_try_timeout_on_the_fast_path(env: Env) -> None:
    async def stalls_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            n: int) -> None:
        await _read_head(reader)
        writer.write(_ok(b"{}"))
        await _read_head(reader)
        await asyncio.sleep(5)

    slow = await _raw_backend(env, "orders", "slow", stalls_second)
    try:
        await env.start([{"match": {"path": {"prefix": "/"}}, "service": "orders",
                          "timeouts": {"request": "200ms"}}], wait={"orders": 1})
        resp = await env.request("GET", "/warm")
        await resp.aread()
        resp, body = await env.json("GET", "/stall")
        assert resp.status == 504 and body["layer"] == "timeout"
        upstream = next(iter(env.gateway._upstreams.values()))  # type: ignore[union-attr]
        assert upstream.breaker.active == 0
    finally:
        slow.close()


async def test_client_leaving_mid_fast_try_frees_the_slot(env: Env) -> None:
    arrived = asyncio.Event()

    async def stalls_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            n: int) -> None:
        await _read_head(reader)
        writer.write(_ok(b"{}"))
        await _read_head(reader)
        arrived.set()
        await reader.read()  # until the gateway aborts the exchange

    slow = await _raw_backend(env, "orders", "slow", stalls_second)
    try:
        await env.start([{"match": {"path": {"prefix": "/"}}, "service": "orders"}],
                        wait={"orders": 1})
        assert env.server is not None
        resp = await env.request("GET", "/warm")
        await resp.aread()
        _reader, writer = await asyncio.open_connection("127.0.0.1", env.server.port)
        writer.write(b"GET /stall HTTP/1.1\r\nhost: a\r\n\r\n")
        await asyncio.wait_for(arrived.wait(), 5)
        upstream = next(iter(env.gateway._upstreams.values()))  # type: ignore[union-attr]
        assert upstream.breaker.active == 1
        sock = writer.get_extra_info("socket")  # a reset, not a FIN (a half-close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        for _ in range(100):
            if upstream.breaker.active == 0:
                break
            await asyncio.sleep(0.01)
        assert upstream.breaker.active == 0 and upstream.stats.failures == 0
    finally:
        slow.close()


async def test_fast_requests_leave_nothing_for_the_garbage_collector(env: Env) -> None:
    await env.backends.add("orders", "o1")
    await env.start([{"match": {"path": {"prefix": "/"}}, "service": "orders",
                      "timeouts": {"request": "5s"}}], wait={"orders": 1})
    resp, _ = await env.json("GET", "/warm")
    assert resp.status == 200
    gc.collect()
    gc.disable()
    try:
        for i in range(30):
            resp, _ = await env.json("GET", f"/g/{i}")
            assert resp.status == 200
        # freed by reference counting alone: a reference cycle per request (a try and
        # its deadline naming each other) would leave them all here until a collection
        left = [o for o in gc.get_objects() if type(o) is FastTry]
    finally:
        gc.enable()
    assert len(left) <= 1, left


async def test_observed_gateway_keeps_the_fast_path_and_counts_each_request(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """``observe_gateway`` with metrics and tracing on (as ``shoal up`` runs it): unrecorded
    requests still take the fast path and are counted once under their route; a request
    whose trace is recorded takes the coroutine path and gets its span."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from shoal.observability import metrics, tracing
    from shoal.observability.http import observe_gateway

    await env.backends.add("orders", "o1")
    metrics.disable_metrics()
    m = metrics.enable_metrics()
    spans = InMemorySpanExporter()
    tracing.enable_tracing(spans, service_name="gw", sample_ratio=0.0)
    try:
        await env.start([{"name": "orders", "match": {"path": {"prefix": "/o"}},
                          "service": "orders"}], wait={"orders": 1})
        assert env.server is not None and env.gateway is not None
        env.server.handler = observe_gateway(env.gateway)
        resp, _ = await env.json("GET", "/o/warm")  # opens the pooled connection
        with counting(monkeypatch) as counts:
            for i in range(20):
                resp, seen = await env.json("GET", f"/o/{i}")
                assert resp.status == 200
                sent = {k.lower(): v for k, v in seen["headers"]}["traceparent"]
                assert sent.endswith("-00")  # unrecorded: carried on, no span
            resp = await env.request("GET", "/nowhere")
            assert resp.status == 404
            await resp.aread()
            parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
            resp, seen = await env.json("GET", "/o/traced", headers=[("traceparent", parent)])
            assert resp.status == 200
        assert counts == {"fast": 20, "failed_fast": 0, "run_tasks": 1}  # the traced one
        series = m.route("orders", "orders", "gateway")
        assert series.codes == {200: 22} and series.in_flight == 0
        assert m.route("gateway", "unmatched", "gateway").codes == {404: 1}
        tracing.provider.force_flush()  # type: ignore[union-attr]
        assert [s.name for s in spans.get_finished_spans()] == ["GET orders"]
    finally:
        tracing.disable_tracing()
        metrics.disable_metrics()
