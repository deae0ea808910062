# ruff: noqa: F811  (the env fixture is imported from test_proxy and requested by name)
"""``observe_gateway``'s fast path (one ``_FastExchange`` per request): every ending of a
fast try is counted exactly once (answered, retried in a task, abandoned by the client),
and nothing is left for the garbage collector. Real sockets: the gateway test harness of
``tests/gateway`` with raw asyncio backends that misbehave on purpose."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shoal.observability import metrics, tracing
from shoal.observability.http import _FastExchange, observe_gateway
from tests.gateway.test_fast_path import _ok, _raw_backend, _read_head
from tests.gateway.test_proxy import Env, env  # noqa: F401  (the fixture)

pytestmark = pytest.mark.asyncio


@pytest.fixture
def observed() -> Iterator[metrics.Metrics]:
    """Metrics on and tracing on recording no new trace (as ``shoal up`` at 0%)."""
    metrics.disable_metrics()
    m = metrics.enable_metrics()
    tracing.enable_tracing(InMemorySpanExporter(), sample_ratio=0.0)
    try:
        yield m
    finally:
        tracing.disable_tracing()
        metrics.disable_metrics()


async def _start(env: Env, route: dict[str, object], wait: int = 1) -> None:
    await env.start([{"name": "orders", "match": {"path": {"prefix": "/"}},
                      "service": "orders", **route}], wait={"orders": wait})
    assert env.server is not None and env.gateway is not None
    env.server.handler = observe_gateway(env.gateway)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (RST), not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_a_client_leaving_mid_fast_try_is_counted_once(
        env: Env, observed: metrics.Metrics) -> None:
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
        await _start(env, {})
        resp = await env.request("GET", "/warm")
        await resp.aread()
        _reader, writer = await asyncio.open_connection("127.0.0.1", env.server.port)  # type: ignore[union-attr]
        writer.write(b"GET /stall HTTP/1.1\r\nhost: a\r\n\r\n")
        await asyncio.wait_for(arrived.wait(), 5)
        series = observed.route("orders", "orders", "gateway")
        assert series.in_flight == 1
        _reset(writer)
        for _ in range(100):
            if series.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert series.in_flight == 0 and series.codes == {200: 1, 500: 1}
        upstream = next(iter(env.gateway._upstreams.values()))  # type: ignore[union-attr]
        assert upstream.breaker.active == 0
    finally:
        slow.close()


async def test_a_fast_try_retried_in_a_task_is_counted_when_it_ends(
        env: Env, observed: metrics.Metrics) -> None:
    async def resets_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            n: int) -> None:
        await _read_head(reader)
        writer.write(_ok(b'{"backend":"bad"}'))
        await _read_head(reader)  # the next request on the pooled connection: reset
        _reset(writer)

    bad = await _raw_backend(env, "orders", "bad", resets_second)
    try:
        await env.backends.add("orders", "good")
        await _start(env, {"retries": {"attempts": 2, "retry_on": ["reset"]},
                           "load_balancer": {"policy": "round_robin"}}, wait=2)
        for _ in range(2):  # warm: one pooled connection to each
            resp, _ = await env.json("GET", "/warm")
        for _ in range(2):  # one meets the reset on its fast try and is retried
            resp, _ = await env.json("GET", "/after")
            assert resp.status == 200
        upstream = next(iter(env.gateway._upstreams.values()))  # type: ignore[union-attr]
        assert upstream.stats.retries == 1
        series = observed.route("orders", "orders", "gateway")
        assert series.codes == {200: 4} and series.in_flight == 0
        assert series.duration.count == 4
    finally:
        bad.close()


async def test_observed_fast_requests_leave_nothing_for_the_garbage_collector(
        env: Env, observed: metrics.Metrics) -> None:
    await env.backends.add("orders", "o1")
    await _start(env, {"timeouts": {"request": "5s"}})
    resp, _ = await env.json("GET", "/warm")
    assert resp.status == 200
    gc.collect()
    gc.disable()
    try:
        for i in range(30):
            resp, _ = await env.json("GET", f"/g/{i}")
            assert resp.status == 200
        left = [o for o in gc.get_objects() if type(o) is _FastExchange]
    finally:
        gc.enable()
    assert len(left) <= 1, left  # freed by reference counting: no cycle per request
    assert observed.route("orders", "orders", "gateway").codes == {200: 31}
