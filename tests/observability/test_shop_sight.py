"""The real shop under ``shoal up`` (every service its own process), seen from outside:

* one order through the gateway is one trace, exported over OTLP/HTTP by every process to
  a collector in this test: gateway span, orders' server span, the publish, the consumer
  spans of inventory and billing, billing's call to payments (and payments' server span);
* the admin's and an instance's ``/metrics`` parse with prometheus-client's parser;
* in headless Chromium (when Debian's chromium is there) the dashboard shows every service
  and topic and the orders rate rising while orders are placed; a screenshot is saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import eventually
from tests.mesh_identity import get_over_mtls, mesh_identity
from tests.shop_manifest import SHOP_HEAD

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "shop"
CHROMIUM = "/usr/bin/chromium"
HAVE_CHROMIUM = os.path.exists(CHROMIUM)  # else the dashboard part is skipped (see below)
SERVICES = ("orders", "inventory", "payments", "billing", "orders-view")

pytestmark = pytest.mark.slow

MANIFEST = SHOP_HEAD + """\
services:
  orders: {{app: shop.orders:svc}}
  inventory: {{app: shop.inventory:svc}}
  payments: {{app: shop.payments:svc}}
  billing: {{app: shop.billing:svc}}
  orders-view: {{app: shop.view:svc}}
"""


class Collector:
    """An OTLP/HTTP trace receiver: every span of every export, flattened."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []

    async def receive(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for rs in export.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes
                            if a.key == "service.name"), "?")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {a.key: a.value.string_value or a.value.int_value
                             for a in s.attributes}
                    self.spans.append({"service": service, "name": s.name, "kind": s.kind,
                                       "trace": s.trace_id.hex(), "id": s.span_id.hex(),
                                       "parent": s.parent_span_id.hex(), "attrs": attrs})
        return web.Response(status=200)


SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5  # OTLP span kinds


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name + str(sorted(s.labels.items()))] = s.value
    return out


@contextlib.asynccontextmanager
async def collector() -> Any:
    c = Collector()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", c.receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield c, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.timeout(240)
async def test_the_running_shop_is_seen(tmp_path: Path) -> None:
    manifest = tmp_path / "shoal.yaml"
    manifest.write_text(MANIFEST.format(dir=tmp_path))
    async with collector() as (spans, endpoint):
        env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
               "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_TRACES_SAMPLER": "always_on",
               "PYTHONPATH": f"{SHOP}{os.pathsep}{ROOT}"}
        log = (tmp_path / "up.log").open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shoal.cli", "up", str(manifest), stdout=subprocess.PIPE,
            stderr=log, env=env, cwd=tmp_path)
        try:
            assert process.stdout is not None
            async with asyncio.timeout(90):
                while True:
                    line = (await process.stdout.readline()).decode()
                    assert line, "shoal up exited: " + (tmp_path / "up.log").read_text()[-2000:]
                    m = re.search(r"ready in [0-9.]+s: gateway (\S+), admin (\S+)", line)
                    if m:
                        gateway, admin = m.group(1).rstrip(","), m.group(2)
                        break
            async with httpx.AsyncClient(timeout=10) as client:
                await check_one_trace(client, gateway, spans)
                await check_metrics(client, admin, f"sqlite:///{tmp_path}/store.db")
                if HAVE_CHROMIUM:
                    await check_dashboard(client, gateway, admin, tmp_path)
        finally:
            process.send_signal(2)
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
            log.close()


async def place(client: httpx.AsyncClient, gateway: str, n: int) -> None:
    order = {"order_id": f"o{n}", "customer": f"c{n % 7}", "sku": "sku1", "quantity": 1,
             "amount": 10}
    r = await client.post(f"{gateway}/orders", json=order)
    assert r.status_code == 202, r.text


async def check_one_trace(client: httpx.AsyncClient, gateway: str, c: Collector) -> None:
    await place(client, gateway, 1)

    def whole() -> bool:
        roots = [s for s in c.spans if s["kind"] == SERVER and s["service"] == "shoal-control"
                 and s["name"] == "POST place-order"]
        if not roots:
            return False
        trace = [s for s in c.spans if s["trace"] == roots[0]["trace"]]
        groups = {s["attrs"].get("messaging.consumer.group.name") for s in trace
                  if s["kind"] == CONSUMER}
        return any(s["kind"] == SERVER and s["service"] == "payments" for s in trace) and \
            {"inventory", "billing"} <= groups  # spans are exported as each one ends

    await eventually(whole, timeout=60, what="the order's whole trace at the collector")
    root = next(s for s in c.spans if s["name"] == "POST place-order")
    trace = [s for s in c.spans if s["trace"] == root["trace"]]
    by_id = {s["id"]: s for s in trace}

    def one(**want: Any) -> dict[str, Any]:
        found = [s for s in trace if all(s.get(k) == v for k, v in want.items())]
        assert found, (want, [(s["service"], s["name"], s["kind"]) for s in trace])
        return found[0]

    orders = one(service="orders", kind=SERVER)
    assert by_id[orders["parent"]] is root
    publish = one(service="orders", kind=PRODUCER, name="orders publish")
    assert by_id[publish["parent"]] is orders
    consumers = {s["attrs"].get("messaging.consumer.group.name"): s for s in trace
                 if s["kind"] == CONSUMER}
    assert {"inventory", "billing"} <= set(consumers), list(consumers)
    assert by_id[consumers["inventory"]["parent"]] is publish
    call = one(service="billing", kind=CLIENT, name="POST payments")
    assert by_id[call["parent"]] is consumers["billing"]
    assert by_id[one(service="payments", kind=SERVER)["parent"]] is call


async def check_metrics(client: httpx.AsyncClient, admin: str, store_url: str) -> None:
    tls = None
    text = (await client.get(f"{admin}/metrics")).text
    samples = parse_metrics(text)
    assert any(k.startswith("shoal_requests_total") and "place-order" in k for k in samples)
    assert any(k.startswith("shoal_balancer_picks_total") for k in samples)
    instances = (await client.get(f"{admin}/api/instances")).json()
    for service, family in (("payments", "shoal_requests_total"),
                            ("orders", "shoal_events_published_total"),
                            ("billing", "shoal_events_delivered_total")):
        address = next(i["address"] for i in instances if i["service"] == service)
        if tls is None:  # the shop runs under strict mTLS: a mesh identity is needed
            tls = await mesh_identity(store_url)
        status, body = await get_over_mtls(tls, address, service, "/metrics")
        assert status == 200, (service, status)
        samples = parse_metrics(body.decode())
        assert any(k.startswith(family) for k in samples), (service, family)


async def check_dashboard(client: httpx.AsyncClient, gateway: str, admin: str,
                          tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1000})
            await page.goto(f"{admin}/dashboard")
            await page.wait_for_selector("#status[data-state=live]", timeout=15_000)
            for name in SERVICES:
                await page.wait_for_selector(f"tr[data-service='{name}']", timeout=15_000)
            for topic in ("orders", "stock", "payments"):
                await page.wait_for_selector(f"tr[data-topic='{topic}']", timeout=15_000)
            stop = asyncio.Event()

            async def traffic() -> None:
                n = 100
                while not stop.is_set():
                    n += 1
                    await place(client, gateway, n)
                    await asyncio.sleep(0.05)

            load = asyncio.ensure_future(traffic())
            try:
                for name in ("orders", "payments"):  # payments: from its instance's /metrics
                    await page.wait_for_function(
                        "name => parseFloat(document.querySelector("
                        "`tr[data-service='${name}'] [data-rps]`).dataset.rps) > 1",
                        arg=name, timeout=30_000)
            finally:
                stop.set()
                await load
            await page.screenshot(path=str(tmp_path / "shop-dashboard.png"), full_page=True)
            assert (tmp_path / "shop-dashboard.png").stat().st_size > 10_000
        finally:
            await browser.close()
