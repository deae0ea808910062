"""Tracing decides before the SDK: what is left out makes no span but carries its trace on."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shoal.context import match_traceparent, new_traceparent
from shoal.errors import ConfigError
from shoal.gateway.server import HttpServer, Response
from shoal.mesh.http1 import ConnectionPool
from shoal.observability import metrics, tracing
from shoal.observability.http import observe_gateway, observe_handler

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
UNSAMPLED = f"00-{TRACE}-00f067aa0ba902b7-00"
SAMPLED = f"00-{TRACE}-00f067aa0ba902b7-01"


@pytest.mark.parametrize(("env", "ratio"), [
    ({}, tracing.DEFAULT_SAMPLE_RATIO),
    ({"OTEL_TRACES_SAMPLER": "always_on"}, 1.0),
    ({"OTEL_TRACES_SAMPLER": " ParentBased_Always_On "}, 1.0),
    ({"OTEL_TRACES_SAMPLER": "always_off"}, 0.0),
    ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, 0.0),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}, 0.25),
    ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}, 0.0),
    ({"OTEL_TRACES_SAMPLER": "traceidratio"}, 1.0),  # OpenTelemetry's default argument
])
def test_the_sampler_comes_from_opentelemetry_variables(env: dict[str, str],
                                                         ratio: float) -> None:
    assert tracing.sample_ratio_from_env(env) == ratio


@pytest.mark.parametrize(("env", "named"), [
    ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
    ({"OTEL_TRACES_SAMPLER": "x" * 10_000}, "OTEL_TRACES_SAMPLER"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
     "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
     "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "-0.1"},
     "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "nan"},
     "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0." + "1" * 5000},
     "OTEL_TRACES_SAMPLER_ARG"),
])
def test_a_bad_sampler_is_refused_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named) as err:
        tracing.sample_ratio_from_env(env)
    assert len(str(err.value)) < 400  # hostile values are cut short


def test_new_traces_have_valid_distinct_ids_and_a_forked_child_its_own() -> None:
    ids = {new_traceparent(sampled=False) for _ in range(2000)}
    assert len(ids) == 2000 and all(match_traceparent(t) for t in ids)
    assert all(t.endswith("-00") for t in ids) and new_traceparent().endswith("-01")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, "".join(new_traceparent() for _ in range(64)).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 1 << 16).decode()
    os.close(read)
    os.close(write)
    mine = "".join(new_traceparent() for _ in range(64))
    assert {child[i:i + 55] for i in range(0, len(child), 55)}.isdisjoint(
        {mine[i:i + 55] for i in range(0, len(mine), 55)})


@pytest.fixture
def left_out() -> Iterator[InMemorySpanExporter]:
    """Tracing on, recording no new trace (a sampled parent is still followed)."""
    exporter = InMemorySpanExporter()
    tracing.enable_tracing(exporter, sample_ratio=0.0)
    try:
        yield exporter
    finally:
        tracing.disable_tracing()


class _EchoGateway:
    """A stand-in gateway: answers with the headers it would forward."""

    on_route: Any = None

    async def handle(self, request: Any) -> Response:
        seen = request.headers.get(b"traceparent")
        return Response.json({"traceparent": None if seen is None else seen.decode(),
                              "current": tracing.current_traceparent()})


@pytest.fixture
async def echo() -> AsyncIterator[ConnectionPool]:
    """A real server: ``/gw`` through ``observe_gateway``, ``/svc`` through
    ``observe_handler``; each answers what traceparent it saw."""
    gateway = observe_gateway(_EchoGateway())
    service = observe_handler(_EchoGateway().handle, "svc")

    async def route(request: Any) -> Any:
        return await (gateway if request.path == "/gw" else service)(request)

    server = HttpServer(route)
    await server.start("127.0.0.1", 0)
    pool = ConnectionPool(("127.0.0.1", server.port))
    try:
        yield pool
    finally:
        await pool.aclose()
        await server.shutdown()


async def _ask(pool: ConnectionPool, path: str, traceparent: str | None) -> dict[str, Any]:
    headers = [("host", "x")] + ([] if traceparent is None else [("traceparent", traceparent)])
    resp = await pool.request("GET", path, headers)
    return json.loads(await resp.aread())


@pytest.mark.parametrize("path", ["/gw", "/svc"])
async def test_unsampled_requests_pass_their_trace_on_without_a_span(
        left_out: InMemorySpanExporter, echo: ConnectionPool, path: str) -> None:
    kept = await _ask(echo, path, UNSAMPLED)
    assert kept["traceparent"] == UNSAMPLED  # unchanged: W3C lets an unrecorded hop
    new = await _ask(echo, path, None)
    assert match_traceparent(new["traceparent"]) and new["traceparent"].endswith("-00")
    for hostile in ("garbage", "00-" + "0" * 32 + "-" + "1" * 16 + "-00",
                    UNSAMPLED + "x" * 600, "ff" + UNSAMPLED[2:]):
        fresh = await _ask(echo, path, hostile)
        assert match_traceparent(fresh["traceparent"]) and TRACE not in fresh["traceparent"]
    if path == "/svc":  # a service's handler runs under it (its calls send it on)
        assert kept["current"] == UNSAMPLED and new["current"] == new["traceparent"]
    else:  # the gateway forwards the header; it sets no context
        assert kept["current"] is None
    assert left_out.get_finished_spans() == ()


async def test_a_sampled_parent_is_recorded_even_when_new_traces_are_not(
        left_out: InMemorySpanExporter, echo: ConnectionPool) -> None:
    got = await _ask(echo, "/gw", SAMPLED)
    (span,) = left_out.get_finished_spans()
    assert span.kind is SpanKind.SERVER and f"{span.context.trace_id:032x}" == TRACE
    assert got["traceparent"] == tracing.traceparent_of_context(span.context)


@pytest.fixture
def half_from_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Tracing on with no ratio given: the OpenTelemetry variables say 50%."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.5")
    exporter = InMemorySpanExporter()
    tracing.enable_tracing(exporter)
    try:
        yield exporter
    finally:
        tracing.disable_tracing()


async def test_new_traces_are_recorded_at_the_configured_share(
        half_from_env: InMemorySpanExporter, echo: ConnectionPool) -> None:
    flags = [(await _ask(echo, "/gw", None))["traceparent"][-2:] for _ in range(200)]
    recorded = len(half_from_env.get_finished_spans())
    sampled = sum(int(f, 16) & 1 for f in flags)  # the SDK may add the random flag (02)
    assert sampled == recorded and 50 <= recorded <= 150  # 100 expected


def test_batch_successes_count_with_their_latency() -> None:
    class R:
        def __init__(self, ts: int) -> None:
            self.timestamp_ms = ts

    series = metrics.ConsumerSeries("t", "g")
    records = [R(1000), R(1000), R(1000), R(1500), R(1500), R(2000)]
    series.handled(records, 5, [1], now=2.0)  # the sixth was not handled, the second failed
    assert series.success == 4
    assert series.latency.count == 4
    assert series.latency.sum == pytest.approx(1.0 + 1.0 + 0.5 + 0.5)


def test_a_batch_of_ids_with_a_zero_run_is_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """W3C forbids all-zero ids: a batch holding 16 zero digits in a row is not used."""
    from shoal import context

    draws = [bytes(24 * context._ID_BATCH), bytes(range(1, 25)) * context._ID_BATCH]
    monkeypatch.setattr(context._random, "randbytes", lambda n: draws.pop(0)[:n])
    monkeypatch.setattr(context, "_ids", [])
    ids = [context.new_traceparent(sampled=False) for _ in range(context._ID_BATCH)]
    assert draws == [] and all(match_traceparent(t) for t in ids)
    assert ids[0] == "00-0102030405060708090a0b0c0d0e0f10-1112131415161718-00"


def test_outside_any_trace_no_span_is_looked_up_but_a_current_one_is_followed(
        left_out: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch) -> None:
    """A publish or call outside any trace reads two context variables, not the SDK's
    current span; under a span (ours, or another library's) it joins that trace."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    real = trace.get_current_span
    looked = []
    monkeypatch.setattr(trace, "get_current_span", lambda *a: looked.append(1) or real(*a))
    new = tracing.unsampled_here()
    assert new is not None and match_traceparent(new) and new.endswith("-00")
    assert looked == []
    foreign = TracerProvider().get_tracer("another library")
    with foreign.start_as_current_span("theirs") as span:  # recorded: the hop records too
        before = len(looked)
        assert tracing.unsampled_here() is None
        assert len(looked) == before + 1
    ctx = span.get_span_context()
    with trace.use_span(trace.NonRecordingSpan(trace.SpanContext(
            ctx.trace_id, ctx.span_id, False, trace.TraceFlags(0)))):
        assert tracing.unsampled_here() == tracing.traceparent_of_context(ctx)[:-2] + "00"
    before = len(looked)
    assert tracing.unsampled_here() != new  # outside again: a new trace each time
    assert len(looked) == before


def test_the_attached_context_is_read_from_the_sdks_variable_else_through_its_api() -> None:
    """The fast read needs OpenTelemetry's default runtime context (a context variable);
    another runtime (``OTEL_PYTHON_CONTEXT``) is asked through the public ``get_current``."""
    from types import SimpleNamespace

    from opentelemetry import context as otel_context

    reader = tracing._context_reader(otel_context)
    assert not reader()  # nothing attached: an empty context
    token = otel_context.attach(otel_context.set_value("k", 1))
    try:
        assert reader()
    finally:
        otel_context.detach(token)

    def get_current() -> dict[str, int]:
        return {"k": 1}

    other = SimpleNamespace(_RUNTIME_CONTEXT=object(), get_current=get_current)
    assert tracing._context_reader(other) is get_current
