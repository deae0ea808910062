"""``shoal top`` as a real subprocess against a real admin socket."""

from __future__ import annotations

import asyncio
import json
import os

from aiohttp import web
from starlette.applications import Starlette

from shoal.commands.top import render
from shoal.control.dashboard import ControlSource
from shoal.observability.metrics import Metrics
from tests.conftest import PYTHON, ROOT
from tests.helpers import eventually
from tests.observability.admin import FakeControl, dashboard_app, serving
from tests.observability.shop import running_shop


async def shoal(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "shoal.cli", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "160",
                                              "PYTHONPATH": str(ROOT)})
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_top_shows_the_running_shop(fresh_metrics: Metrics) -> None:
    async with running_shop() as shop:
        source = ControlSource(FakeControl(["orders", "payments"]), bus=shop.bus,
                               metrics=fresh_metrics)
        async with serving(dashboard_app(source)) as base:
            stop = asyncio.Event()

            async def traffic() -> None:
                while not stop.is_set():
                    await shop.order()
                    await asyncio.sleep(0.02)

            load = asyncio.get_running_loop().create_task(traffic())
            try:
                await eventually(lambda: len(shop.handled["billing"]) > 2, what="orders")
                code, out, err = await shoal("top", "--once", "--admin", base,
                                             "--interval", "0.5")
                code_j, out_j, _ = await shoal("top", "--json", "--admin", base,
                                               "--interval", "0.5")
            finally:
                stop.set()
                await load
    assert code == 0, err
    for word in ("orders", "payments", "orders-1:serving", "billing:", "inventory:", "req/s"):
        assert word in out, (word, out)
    assert code_j == 0
    snap = json.loads(out_j)
    orders = next(s for s in snap["services"] if s["name"] == "orders")
    assert orders["rps"] > 0  # two readings half a second apart, with orders flowing


async def test_top_names_what_is_wrong_with_the_admin_api() -> None:
    code, _, err = await shoal("top", "--once", "--admin", "http://127.0.0.1:9")
    assert code == 2 and "cannot reach the admin API" in err and "127.0.0.1:9" in err
    code, _, err = await shoal("top", "--once", "--admin", "ftp://x")
    assert code == 2 and "http://" in err

    async def junk(request: web.Request) -> web.Response:
        if request.query.get("x"):
            return web.Response(text="nope")
        return web.Response(text='{"services": 1}' if "json" in request.path else "<html>")

    app = web.Application()
    app.router.add_get("/{tail:.*}", junk)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        code, _, err = await shoal("top", "--once", "--admin", f"http://127.0.0.1:{port}")
        assert code == 2 and "not a JSON snapshot" in err
        code, _, err = await shoal("top", "--once", "--admin",
                                   f"http://127.0.0.1:{port}/json")
        assert code == 2 and "not a dashboard snapshot" in err
    finally:
        await runner.cleanup()
    starlette = Starlette()  # an admin API without the dashboard: 404
    async with serving(starlette) as base:
        code, _, err = await shoal("top", "--once", "--admin", base)
        assert code == 2 and "HTTP 404" in err


def test_render_escapes_hostile_names() -> None:
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render({"time": 0, "services": [{"name": "evil\x1b[2J", "instances": [],
                                                   "rps": 1.0, "success_rate": 0.5}],
                          "topics": [{"name": "t", "groups": [], "dead_letters": 3}],
                          "events": [{"topic": "t", "type": "x\n", "id": "1"}],
                          "autoscaler": [{"time": 1, "service": "s", "direction": "up"}],
                          "errors": ["broken"]}))
    text = console.export_text()
    assert "\x1b" not in text and "evil\\x1b[2J" in text and "50.0%" in text
    assert "direction=up" in text and "problem: broken" in text
