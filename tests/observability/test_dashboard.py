"""The dashboard's endpoints over real sockets, its golden figures with an injected clock,
and (when Debian's chromium is there) the page itself in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

import httpx
import pytest

from shoal.control.dashboard import ControlSource
from shoal.control.dashboard.golden import GoldenWindow, Reading
from shoal.events.bus import EventBus
from shoal.events.event import Event
from shoal.events.retry import RetryPolicy
from shoal.observability.metrics import REQUEST_BUCKETS, Metrics
from tests.helpers import eventually
from tests.observability.admin import FakeControl, dashboard_app, serving
from tests.observability.shop import running_shop

CHROMIUM = "/usr/bin/chromium"


def test_golden_window_rates_and_quantiles() -> None:
    w = GoldenWindow()
    slow = len([b for b in REQUEST_BUCKETS if b < 0.05])  # the le=0.05 bucket
    first = w.update(10.0, {"orders": Reading(100, 1, [0] * (len(REQUEST_BUCKETS) + 1))})
    assert first["orders"].rps == 0 and first["orders"].success_rate is None
    buckets = [0] * (len(REQUEST_BUCKETS) + 1)
    buckets[slow] = 50
    second = w.update(12.0, {"orders": Reading(150, 6, buckets)})["orders"]
    assert second.rps == 25.0 and second.success_rate == pytest.approx(0.9)
    assert 0.025 < second.p50 <= 0.05 and second.p99 <= 0.05  # type: ignore[operator]
    reset = w.update(13.0, {"orders": Reading(3, 0, buckets)})["orders"]  # a restart
    assert reset.rps == 0 and reset.success_rate is None
    assert w.rate("t", 1.0, 10) == 0 and w.rate("t", 3.0, 30) == 10.0
    assert w.rate("t", 3.0, 40) == 0  # no time passed: no rate rather than a division by 0


async def test_snapshot_shows_services_topics_rates_tail_and_replays(
        fresh_metrics: Metrics) -> None:
    async with running_shop() as shop:
        now = [100.0]
        source = ControlSource(FakeControl(["orders", "payments"]), bus=shop.bus,
                               metrics=fresh_metrics, clock=lambda: now[0])
        await source.snapshot()
        for _ in range(4):
            await shop.order()
        await eventually(lambda: len(shop.handled["billing"]) == 4, what="4 billed")
        now[0] += 2.0
        snap = await source.snapshot()
        services = {s["name"]: s for s in snap["services"]}
        assert services["orders"]["rps"] == 2.0 and services["orders"]["success_rate"] == 1
        assert services["orders"]["instances"][0]["state"] == "serving"
        assert services["payments"]["rps"] == 2.0  # the service's own count of billing's calls
        (orders,) = [t for t in snap["topics"] if t["name"] == "orders"]
        assert orders["publish_rate"] == 2.0
        lags = {g["name"]: g["lag"] for g in orders["groups"]}
        assert set(lags) == {"inventory", "billing"}  # lag: 0..4, offsets commit in 100 ms
        assert all(0 <= n <= 4 for n in lags.values())
        assert {"from": "gateway", "to": "orders", "kind": "call", "rate": 2.0} in snap["edges"]
        assert [e for e in snap["events"] if e["topic"] == "orders"][:1]
        assert snap["errors"] == []
        json.dumps(snap)  # JSON-ready

        refusing = [True]

        async def refuse(event: Event) -> None:
            if refusing[0]:
                raise ValueError("out of stock")

        await shop.bus.subscribe("returns", "refunds", refuse,
                                 retry=RetryPolicy(attempts=1))
        await shop.bus.publish("returns", {"order": 1})
        dlq_has = [False]

        async def check() -> None:
            infos = {i.spec.name: i.events for i in await shop.bus.topics()}
            dlq_has[0] = infos.get("returns.dlq", 0) == 1

        for _ in range(300):
            await check()
            if dlq_has[0]:
                break
            await asyncio.sleep(0.01)
        assert dlq_has[0]
        app = dashboard_app(source)
        async with serving(app) as base, httpx.AsyncClient(base_url=base) as http:
            snap = (await http.get("/api/snapshot")).json()
            (returns,) = [t for t in snap["topics"] if t["name"] == "returns"]
            assert returns["dead_letters"] == 1
            refusing[0] = False  # the cause is fixed: replay
            resp = await http.post("/api/topics/returns/replay", json={})
            assert resp.status_code == 200 and resp.json()["replayed"] == 1
            resp = await http.post("/api/topics/returns/replay", json={})
            assert resp.json() == {"topic": "returns", "replayed": 0, "duplicates": 0,
                                   "skipped": 1}
            resp = await http.post("/api/topics/returns/replay", content=b"x=1",
                                   headers={"content-type": "application/x-www-form-urlencoded"})
            assert resp.status_code == 415  # a cross-site form cannot trigger a replay
            resp = await http.post("/api/topics/nosuch/replay", json={})
            assert resp.status_code == 404 and "does not exist" in resp.json()["error"]
            for hostile in ("bad%20name", "x" * 300, "%00", "a..b%3Cscript%3E"):
                resp = await http.post(f"/api/topics/{hostile}/replay", json={})
                assert resp.status_code == 400 and "topic" in resp.json()["error"], hostile
            resp = await http.post("/api/topics/a%2F..%2F..%2Fb/replay", json={})
            assert resp.status_code in (400, 404)


async def test_page_assets_and_event_stream(fresh_metrics: Metrics) -> None:
    async with EventBus.connect(f"memory://{uuid.uuid4().hex}") as bus:
        await bus.publish("orders", 1)
        app = dashboard_app(ControlSource(bus=bus, metrics=fresh_metrics), interval=0.05)
        async with serving(app) as base, httpx.AsyncClient(base_url=base) as http:
            page = await http.get("/dashboard")
            assert page.status_code == 200 and b"/dashboard/app.js" in page.content
            assert "default-src 'self'" in page.headers["content-security-policy"]
            assert (await http.get("/")).status_code in (200, 307)
            js = await http.get("/dashboard/app.js")
            assert js.headers["content-type"].startswith("text/javascript")
            for hostile in ("..%2F__init__.py", "index.html%00", "x" * 5000, "golden.py"):
                resp = await http.get(f"/dashboard/{hostile}")
                assert resp.status_code == 404, hostile
            frames = []
            async with http.stream("GET", "/api/stream") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        frames.append(json.loads(line[6:]))
                        if len(frames) == 2:
                            break
            assert [t["name"] for t in frames[0]["topics"]] == ["orders"]
            assert frames[1]["time"] >= frames[0]["time"]


@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI")
                    and not os.environ.get("SHOAL_REQUIRE_SERVERS"),
                    reason="Debian's chromium is not installed (apt-get install chromium)")
async def test_browser_sees_the_shop_and_a_rate_change(fresh_metrics: Metrics,
                                                       tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    async with running_shop() as shop:
        await shop.order()
        await eventually(lambda: len(shop.handled["billing"]) == 1, what="first order")
        source = ControlSource(FakeControl(["orders", "payments"]), bus=shop.bus,
                               metrics=fresh_metrics)
        async with serving(dashboard_app(source, interval=0.25)) as base, \
                async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM,
                args=["--headless", "--no-sandbox", "--disable-gpu",
                      "--disable-background-networking"])
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                outside: list[str] = []
                problems: list[str] = []
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.on("console", lambda m: problems.append(m.text)
                        if m.type == "error" else None)
                page.on("request", lambda r: outside.append(r.url)
                        if not r.url.startswith(base) else None)
                await page.goto(f"{base}/dashboard")
                await page.wait_for_selector("#status[data-state=live]", timeout=10_000)
                for name in ("orders", "payments"):
                    await page.wait_for_selector(f"tr[data-service={name}]", timeout=10_000)
                for topic in ("orders", "orders.dlq"):
                    if topic == "orders":
                        await page.wait_for_selector(f"tr[data-topic='{topic}']",
                                                     timeout=10_000)
                await page.wait_for_selector("tr[data-topic='orders'] [data-group=billing]")
                for node in ("gateway:", "service:orders", "topic:orders", "group:billing"):
                    await page.wait_for_selector(f"#topology [data-node='{node}']",
                                                 state="attached", timeout=5_000)
                rps = page.locator("tr[data-service=orders] [data-rps]")
                await page.wait_for_function(
                    "() => document.querySelector('tr[data-service=orders] [data-rps]')"
                    ".dataset.rps === '0.000'", timeout=10_000)
                before = float(await rps.get_attribute("data-rps") or "0")

                async def traffic() -> None:
                    while True:
                        await shop.order()
                        await asyncio.sleep(0.02)

                load = asyncio.get_running_loop().create_task(traffic())
                try:
                    await page.wait_for_function(
                        "() => parseFloat(document.querySelector("
                        "'tr[data-service=orders] [data-rps]').dataset.rps) > 1",
                        timeout=15_000)
                finally:
                    load.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await load
                after = float(await rps.get_attribute("data-rps") or "0")
                assert before == 0 and after > 1
                assert await page.locator("#events li").count() > 0
                await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
                assert (tmp_path / "dashboard.png").stat().st_size > 10_000
                assert outside == []  # nothing fetched from the network
                assert problems == []
            finally:
                await browser.close()


async def test_closing_the_hub_ends_live_streams(fresh_metrics: Metrics) -> None:
    from starlette.applications import Starlette

    from shoal.control.dashboard import mount_dashboard

    app = Starlette()
    hub = mount_dashboard(app, ControlSource(metrics=fresh_metrics), interval=0.05)
    async with serving(app) as base, httpx.AsyncClient(base_url=base) as http:
        frames = 0
        async with http.stream("GET", "/api/stream") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    frames += 1
                    if frames == 1:
                        await hub.close()
        # the stream ended by itself: the server can stop without waiting for the browser
        assert frames >= 1
        assert (await http.get("/api/stream")).status_code == 503


async def test_instances_metrics_are_scraped_and_summed() -> None:
    from shoal.control.dashboard.scrape import InstanceScraper, Scraped, add_exposition
    from shoal.gateway import HttpServer
    from shoal.gateway.server import Response
    from shoal.observability.http import metrics_text, with_metrics

    one, two = Metrics(), Metrics()
    for m, n in ((one, 3), (two, 5)):
        series = m.route("payments", "/payments")
        for _ in range(n):
            series.finished(200, 0.004)
        series.finished(503, 0.2)
        m.topic("payments").published += n
        m.consumer("payments", "view").success += n
    servers = []
    for m in (one, two):
        server = HttpServer(with_metrics(lambda r: Response(b"no"), metrics=m))
        await server.start("127.0.0.1", 0)
        servers.append(server)
    scraper = InstanceScraper()
    try:
        got = await scraper.scrape([f"127.0.0.1:{s.port}" for s in servers] + ["127.0.0.1:9"])
    finally:
        await scraper.aclose()
        for s in servers:
            await s.shutdown(1)
    assert got.failures == 1  # nothing listens on port 9: skipped, counted
    payments = got.services["payments"]
    assert payments.requests == 10 and payments.errors == 2
    assert sum(payments.buckets) == 10 and payments.buckets[-1] == 0
    assert got.published == {"payments": 8} and got.delivered == {("payments", "view"): 8}
    for hostile in ("garbage {{{", "shoal_requests_total{service=\"x\" 1", "\x00" * 10):
        with pytest.raises((ValueError, TypeError, KeyError)):
            add_exposition(hostile, Scraped())
    text = metrics_text(one).decode()
    add_exposition(text, Scraped())  # the real thing parses
