"""One trace across gateway -> service -> publish -> consumers -> mesh call, on real sockets."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shoal.errors import ConfigError
from shoal.events.bus import EventBus
from shoal.events.event import Event
from shoal.observability import tracing
from tests.helpers import eventually
from tests.observability.shop import running_shop

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"


async def test_one_order_is_one_trace(spans: InMemorySpanExporter) -> None:
    async with running_shop() as shop:
        resp = await shop.order([("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01")])
        assert resp.status == 201
        await eventually(lambda: shop.handled["billing"] and shop.handled["inventory"],
                         what="both consumers handled the order")
        await eventually(lambda: len(spans.get_finished_spans()) >= 7, what="7 spans")
    found = spans.get_finished_spans()
    assert {f"{s.trace_id:032x}" for s in (x.context for x in found)} == {CLIENT_TRACE}
    by_id = {s.context.span_id: s for s in found}

    def one(name: str, kind: SpanKind) -> object:
        matches = [s for s in found if s.name == name and s.kind is kind]
        assert len(matches) == 1, (name, [(s.name, s.kind) for s in found])
        return matches[0]

    def parent(s: object) -> object:
        return by_id[s.parent.span_id]  # type: ignore[attr-defined]

    gateway = one("POST orders", SpanKind.SERVER)  # renamed to the route once matched
    assert f"{gateway.parent.span_id:016x}" == CLIENT_PARENT  # type: ignore[attr-defined]
    orders = one("POST /orders", SpanKind.SERVER)
    assert parent(orders) is gateway
    publish = one("orders publish", SpanKind.PRODUCER)
    assert parent(publish) is orders
    consumers = [s for s in found if s.kind is SpanKind.CONSUMER]
    assert {s.attributes["messaging.consumer.group.name"] for s in consumers} == {
        "inventory", "billing"}
    assert all(parent(s) is publish for s in consumers)
    billing = next(s for s in consumers if s.attributes["messaging.consumer.group.name"]
                   == "billing")
    call = one("POST payments", SpanKind.CLIENT)
    assert parent(call) is billing
    assert parent(one("POST /charge", SpanKind.SERVER)) is call
    assert gateway.attributes["http.response.status_code"] == 201


async def test_a_handler_failure_marks_its_consumer_span(spans: InMemorySpanExporter) -> None:
    from shoal.events.retry import RetryPolicy

    async with EventBus.connect("memory://trace-fail") as bus:
        async def boom(event: Event) -> None:
            raise ValueError("no stock")

        await bus.subscribe("t", "g", boom, retry=RetryPolicy(attempts=2, initial=0.001))
        await bus.publish("t", 1)
        await eventually(lambda: len([s for s in spans.get_finished_spans()
                                      if s.kind is SpanKind.CONSUMER]) >= 2, what="2 tries")
    tries = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER]
    assert all(not s.status.is_ok for s in tries)
    assert any(e.name == "exception" for s in tries for e in s.events)
    dead = [s for s in spans.get_finished_spans() if s.name == "t.dlq publish"]
    assert dead == []  # a dead letter keeps the original traceparent (publish_event relays)


async def test_sync_handlers_see_the_consumer_span(spans: InMemorySpanExporter) -> None:
    seen: list[str | None] = []
    async with EventBus.connect("memory://trace-sync") as bus:
        await bus.subscribe("t", "g", lambda e: seen.append(tracing.current_traceparent()))
        ack = await bus.publish("t", 1)
        await eventually(lambda: bool(seen), what="the handler ran")
    consumer = next(s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER)
    assert seen[0] is not None and f"{consumer.context.span_id:016x}" in seen[0]
    assert ack.id


@pytest.mark.parametrize("value", [
    None, "", "garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01",  # all-zero ids are invalid
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" + "x" * 600,  # oversized
    "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", b"\xff\xfe",
    f"00-{'g' * 32}-{'1' * 16}-01",
])
def test_hostile_traceparents_start_a_new_trace(value: str | bytes | None) -> None:
    assert tracing.extract(value) is None


def test_valid_traceparent_is_extracted_bytes_or_text() -> None:
    tp = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
    assert tracing.extract(tp) is not None and tracing.extract(tp.encode()) is not None


async def test_events_carry_the_producer_span_and_keep_a_callers_parent(
        spans: InMemorySpanExporter) -> None:
    async with EventBus.connect("memory://trace-ext") as bus:
        async with bus.consume("t", "g") as events:
            await bus.publish("t", 1, extensions={
                "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"})
            await bus.publish_many("t", [2, 3])
            got = [await anext(events) for _ in range(3)]
    producers = [s for s in spans.get_finished_spans() if s.kind is SpanKind.PRODUCER]
    assert len(producers) == 2
    first = producers[0]
    assert f"{first.context.trace_id:032x}" == CLIENT_TRACE
    assert got[0].traceparent == tracing.traceparent_of_context(first.context)
    assert got[1].traceparent == got[2].traceparent == tracing.traceparent_of_context(
        producers[1].context)


def test_otlp_needs_an_http_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
        tracing.enable_tracing()
    with pytest.raises(ConfigError, match="http"):
        tracing.enable_tracing(endpoint="grpc://collector:4317")
    assert tracing.enable_tracing_from_env() is None and tracing.tracer is None


async def test_otlp_export_reaches_a_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real HTTP listener receives the protobuf export at /v1/traces."""
    from aiohttp import web

    got: list[bytes] = []

    async def collect(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")  # the default records 1%
        assert tracing.enable_tracing_from_env("otlp-test") is not None
        async with EventBus.connect("memory://trace-otlp") as bus:
            await bus.publish("t", 1)
        provider = tracing.provider
        assert provider is not None
        await asyncio.to_thread(provider.force_flush)
        await eventually(lambda: bool(got), what="an OTLP export")
        assert b"t publish" in got[0] and b"otlp-test" in got[0]
    finally:
        tracing.disable_tracing()
        await runner.cleanup()


async def test_traces_left_out_are_carried_on_without_spans() -> None:
    """An unsampled parent (flags 00) and a root the ratio leaves out make no span, but the
    trace id still travels, so every hop agrees on one decision."""
    exporter = InMemorySpanExporter()
    tracing.enable_tracing(exporter, sample_ratio=0.0)
    seen: list[str | None] = []
    try:
        async with EventBus.connect("memory://trace-unsampled") as bus:
            async def handler(event: Event) -> None:
                seen.append(tracing.current_traceparent())
                await bus.publish("u", 2)

            await bus.subscribe("t", "g", handler)
            async with bus.consume("u", "g2") as downstream:
                unsampled = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-00"
                await bus.publish("t", 1, extensions={"traceparent": unsampled})
                second = await anext(downstream)
                ack = await bus.publish("t", 3)  # a new trace, left out by the ratio
                third = await anext(downstream)
        assert exporter.get_finished_spans() == ()
        assert seen[0] == unsampled and second.traceparent == unsampled
        assert third.traceparent is not None and third.traceparent.endswith("-00")
        assert CLIENT_TRACE not in third.traceparent and ack.id
    finally:
        tracing.disable_tracing()


def test_sample_ratio_is_checked() -> None:
    with pytest.raises(ConfigError, match="sample_ratio"):
        tracing.enable_tracing(InMemorySpanExporter(), sample_ratio=1.5)


async def test_tracing_off_adds_nothing() -> None:
    """Off: no traceparent is invented, a caller's own is kept as it is, handlers see none."""
    assert tracing.tracer is None
    seen: list[str | None] = []
    async with EventBus.connect("memory://trace-off") as bus:
        await bus.subscribe("t", "g", lambda e: seen.append(tracing.current_traceparent()))
        async with bus.consume("t", "g2") as events:
            await bus.publish("t", 1)
            mine = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
            await bus.publish("t", 2, extensions={"traceparent": mine})
            first, second = await anext(events), await anext(events)
        await eventually(lambda: len(seen) == 2, what="both handled")
    assert first.traceparent is None and second.traceparent == mine
    assert seen == [None, None]
