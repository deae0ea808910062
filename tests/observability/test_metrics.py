"""Every /metrics output parsed by prometheus-client's own parser, with the figures a
miniature shop on real sockets must produce; the pure pieces tested on their own."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from shoal.events.bus import EventBus
from shoal.events.event import Event
from shoal.events.retry import Drop, RetryPolicy
from shoal.mesh.registry import Instance
from shoal.observability import metrics
from shoal.observability.http import ObservedASGI, metrics_asgi, metrics_text
from shoal.observability.metrics import LatencyHistogram, Metrics
from shoal.observability.sampling import Sampler, sample_instances, sample_lag
from tests.helpers import eventually
from tests.observability.shop import running_shop

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str | bytes) -> Samples:
    """Every sample of a text exposition, as parsed by prometheus-client."""
    if isinstance(text, bytes):
        text = text.decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_the_shop_metrics_parse_and_add_up(fresh_metrics: Metrics) -> None:
    async with running_shop() as shop:
        for _ in range(3):
            assert (await shop.order()).status == 201
        status, _ = await shop.get("/nowhere")
        assert status == 404
        await eventually(lambda: len(shop.handled["billing"]) == 3, what="3 billed")
        status, text = await shop.get("/metrics")
        assert status == 200
    s = parse(text)
    assert value(s, "shoal_requests_total", service="orders", route="orders", code="201") == 3
    assert value(s, "shoal_requests_total", service="gateway", route="unmatched",
                 code="404") == 1
    assert value(s, "shoal_request_duration_seconds_count", service="orders",
                 route="orders") == 3
    assert value(s, "shoal_request_duration_seconds_bucket", service="orders",
                 route="orders", le="+Inf") == 3
    assert value(s, "shoal_requests_in_flight", service="orders", route="orders") == 0
    assert value(s, "shoal_requests_total", service="payments", route="/charge",
                 code="200") == 3  # the service side of billing's calls
    assert value(s, "shoal_events_published_total", topic="orders") == 3
    for group in ("inventory", "billing"):
        assert value(s, "shoal_events_delivered_total", topic="orders", group=group,
                     outcome="success") == 3
        assert value(s, "shoal_events_delivered_total", topic="orders", group=group,
                     outcome="dead_letter") == 0
        assert value(s, "shoal_event_latency_seconds_count", topic="orders", group=group) == 3
    assert value(s, "shoal_balancer_picks_total", service="payments", instance="payments-1") == 3
    assert value(s, "shoal_balancer_picks_total", service="orders", instance="orders-1") == 3
    assert value(s, "shoal_upstream_requests_total", service="payments") == 3
    assert value(s, "shoal_circuit_state", service="payments", state="closed") == 1
    assert value(s, "shoal_circuit_state", service="payments", state="open") == 0


async def test_outcomes_retry_dead_letter_and_drop_are_counted(fresh_metrics: Metrics) -> None:
    async with EventBus.connect(f"memory://{uuid.uuid4().hex}") as bus:
        async def handler(event: Event) -> None:
            if event.data == "drop":
                raise Drop("not ours")
            if event.data == "bad":
                raise ValueError("broken")

        await bus.subscribe("t", "g", handler, retry=RetryPolicy(attempts=3, initial=0.001))
        for data in ("ok", "drop", "bad", "ok"):
            await bus.publish("t", data, key="k")
        series = fresh_metrics.consumer("t", "g")
        await eventually(lambda: series.success == 2 and series.dead_letter == 1,
                         what="all handled")
        lag = await sample_lag(bus, fresh_metrics)
    s = parse(metrics_text(fresh_metrics))
    outcomes = {o: value(s, "shoal_events_delivered_total", topic="t", group="g", outcome=o)
                for o in metrics.OUTCOMES}
    assert outcomes == {"success": 2, "retry": 2, "dead_letter": 1, "drop": 1}
    assert value(s, "shoal_event_latency_seconds_count", topic="t", group="g") == 2
    assert value(s, "shoal_events_published_total", topic="t.dlq") == 1
    assert value(s, "shoal_events_published_total", topic="t") == 4
    assert set(lag) >= {("t", "g")}
    partition = next(p for p, n in lag[("t", "g")].items() if n >= 0)
    assert (("shoal_consumer_lag", (("group", "g"), ("partition", str(partition)),
                                    ("topic", "t")))) in s


async def test_lag_sampler_sees_a_backlog(fresh_metrics: Metrics) -> None:
    async with EventBus.connect(f"memory://{uuid.uuid4().hex}") as bus:
        await bus.create_topic("t", partitions=1)
        await bus.seek("t", "slow", "earliest")  # a group with state and nobody reading
        for i in range(5):
            await bus.publish("t", i)
        sampler = Sampler(fresh_metrics, bus=bus, interval=0.01,
                          instances=lambda: [Instance(id="a-1", service="a", address="h:1")])
        sampler.start()
        try:
            await eventually(lambda: fresh_metrics.consumer_lag.labels("t", "slow", "0")
                             ._value.get() == 5, what="lag 5")
        finally:
            await sampler.aclose()
    s = parse(metrics_text(fresh_metrics))
    assert value(s, "shoal_consumer_lag", topic="t", group="slow", partition="0") == 5
    assert value(s, "shoal_instances", service="a", state="serving") == 1
    with pytest.raises(ValueError, match="interval"):
        Sampler(fresh_metrics, interval=0)


def test_hostile_label_values_survive_the_round_trip() -> None:
    m = Metrics()
    nasty = 'a"b\\c\nd}{é\x00'
    m.route(nasty, "r").finished(200, 0.01)
    m.consumer("t", nasty).success += 1
    sample_instances([Instance(id="x-1", service="x", address="h:1")], m)
    m.autoscaler_decision(nasty, "up", 3)
    s = parse(metrics_text(m))
    assert value(s, "shoal_requests_total", service=nasty, route="r", code="200") == 1
    assert value(s, "shoal_events_delivered_total", topic="t", group=nasty,
                 outcome="success") == 1
    assert value(s, "shoal_autoscaler_decisions_total", service=nasty, direction="up") == 1
    assert value(s, "shoal_autoscaler_replicas", service=nasty) == 3


def test_label_sets_beyond_the_bound_fold_into_other(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_SERIES", 3)
    m = Metrics()
    for i in range(10):
        m.route("svc", f"/raw/{i}").finished(200, 0.001)
    assert len(m.routes) == 4 and m.folded == 7
    s = parse(metrics_text(m))
    assert value(s, "shoal_requests_total", service="other", route="other", code="200") == 7


def test_histogram_buckets_and_quantiles() -> None:
    h = LatencyHistogram((0.1, 0.2, 0.5))
    assert h.quantile(0.5) is None
    for v in (0.05, 0.1, 0.15, 0.3, 9.0):  # 0.1 is in the le=0.1 bucket; 9.0 beyond the last
        h.observe(v)
    assert h.cumulative() == [("0.1", 2), ("0.2", 3), ("0.5", 4), ("+Inf", 5)]
    assert h.count == 5 and h.sum == pytest.approx(9.6)
    assert h.quantile(0.2) == pytest.approx(0.05)
    assert h.quantile(0.5) == pytest.approx(0.15)
    assert h.quantile(0.99) == 0.5  # the +Inf bucket reports the highest bound, as PromQL


def test_metrics_off_answers_a_parseable_comment() -> None:
    metrics.disable_metrics()
    assert parse(metrics_text()) == {}


async def test_asgi_metrics_and_route_templates(fresh_metrics: Metrics) -> None:
    async def order(request: Any) -> JSONResponse:
        return JSONResponse({"id": request.path_params["id"]})

    inner = Starlette(routes=[Route("/orders/{id}", order),
                              Route("/metrics", metrics_asgi())])
    app = ObservedASGI(inner, "orders")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://orders") as client:
        for i in range(3):
            assert (await client.get(f"/orders/{i}")).status_code == 200
        assert (await client.get("/nope")).status_code == 404
        resp = await client.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    s = parse(resp.text)
    assert value(s, "shoal_requests_total", service="orders", route="/orders/{id}",
                 code="200") == 3  # the template, not /orders/0, /orders/1, ...
    assert value(s, "shoal_requests_total", service="orders", route="unmatched",
                 code="404") == 1
