"""The shop end to end with real processes: ``shoal up`` in a subprocess, 500 orders
through the gateway while one instance of each service is killed with -9; the autoscaler
scales billing up under the burst and back down after, seen in ``shoal ps`` and as events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from shoal.events.bus import EventBus
from tests.shop_manifest import SHOP_HEAD

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "shop"
ORDERS = 500
LIMIT = 500  # SHOP_PAYMENT_LIMIT: larger amounts are declined

pytestmark = pytest.mark.slow

MANIFEST = SHOP_HEAD + """\
services:
  orders:
    app: shop.orders:svc
    replicas: 2
    policy: {{retries: {{attempts: 3, retry_non_idempotent: true}}}}
  inventory: {{app: shop.inventory:svc, replicas: 2}}
  payments: {{app: shop.payments:svc, replicas: 2, env: {{SHOP_PAYMENT_LIMIT: "{limit}"}}}}
  billing:
    app: shop.billing:svc
    # one order at a time, 50 ms each (20/s): the burst surely makes a lag the autoscaler
    # acts on, however fast the rest of the shop is
    env: {{SHOP_BILLING_DELAY: "0.05", SHOP_BILLING_CONCURRENCY: "1"}}
    autoscale: {{min: 1, max: 3, target_lag: 20, cooldown: 2s}}
  orders-view: {{app: shop.view:svc, replicas: 1}}
"""


async def _read_ready(process: asyncio.subprocess.Process) -> tuple[str, str]:
    assert process.stdout is not None
    async with asyncio.timeout(60):
        while True:
            line = (await process.stdout.readline()).decode()
            if not line:
                raise AssertionError("shoal up exited before it was ready")
            m = re.search(r"ready in [0-9.]+s: gateway (\S+), admin (\S+)", line)
            if m:
                return m.group(1).rstrip(","), m.group(2)


def _ps(admin: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "shoal.cli", "ps", "--admin", admin, "--json"],
                         capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


async def _place(client: httpx.AsyncClient, gateway: str, n: int) -> None:
    order = {"order_id": f"o{n}", "customer": f"c{n % 37}", "sku": f"sku{n % 5}",
             "quantity": 1, "amount": (n * 37) % 1000}
    for attempt in range(40):  # the client retries with the same order id: idempotent
        try:
            r = await client.post(f"{gateway}/orders", json=order)
            if r.status_code == 202:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.05 * (attempt + 1))
    raise AssertionError(f"order o{n} was never accepted")


async def _wait_all_final(client: httpx.AsyncClient, gateway: str, admin: str,
                          workers: asyncio.Future) -> tuple[dict, bool]:
    """The read model once every order is settled or failed, and whether ``shoal ps``
    showed billing scaled up meanwhile."""
    scaled_up_in_ps = False
    async with asyncio.timeout(240):
        while True:
            await asyncio.sleep(0.5)
            if not scaled_up_in_ps:
                ps = await asyncio.to_thread(_ps, admin)
                billing = next(s for s in ps["services"] if s["name"] == "billing")
                scaled_up_in_ps = billing["replicas"] > 1
            if not workers.done():
                continue
            await workers  # raises if an order was never accepted
            response = await client.get(f"{gateway}/orders")
            if response.status_code != 200:  # orders-view restarting after its kill -9
                continue
            view = response.json()
            if sum(view["counts"].get(s, 0) for s in ("settled", "failed")) == ORDERS:
                return view, scaled_up_in_ps


async def _kill_one_of_each(client: httpx.AsyncClient, admin: str, rng: random.Random,
                            killed: list[str]) -> None:
    services = ["orders", "inventory", "payments", "billing", "orders-view"]
    rng.shuffle(services)
    for service in services:
        await asyncio.sleep(rng.uniform(0.2, 1.5))
        instances = (await client.get(f"{admin}/api/instances")).json()
        victim = next(i for i in instances if i["service"] == service and i["pid"])
        os.kill(victim["pid"], signal.SIGKILL)
        killed.append(victim["id"])


@pytest.mark.timeout(400)
async def test_500_orders_with_kill_9_and_billing_autoscaling(tmp_path):
    manifest = tmp_path / "shoal.yaml"
    manifest.write_text(MANIFEST.format(dir=tmp_path, limit=LIMIT))
    env = {**os.environ, "PYTHONPATH": f"{SHOP}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = (tmp_path / "up.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", "up", str(manifest), stdout=subprocess.PIPE,
        stderr=log, env=env, cwd=tmp_path)
    rng = random.Random(5)
    try:
        gateway, admin = await _read_ready(process)
        killed: list[str] = []
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(timeout=10, limits=limits) as client:
            killer = asyncio.ensure_future(_kill_one_of_each(client, admin, rng, killed))
            queue = list(range(ORDERS))

            async def worker() -> None:
                while queue:
                    await _place(client, gateway, queue.pop())

            started = time.monotonic()
            workers = asyncio.gather(*(worker() for _ in range(16)))
            # every order ends settled or failed in the read model (about 40 s on a quiet
            # machine; the bound leaves room for a machine shared with other test runs)
            try:
                view, scaled_up_in_ps = await _wait_all_final(client, gateway, admin, workers)
                await killer
            finally:
                workers.cancel()
                killer.cancel()
                await asyncio.gather(workers, killer, return_exceptions=True)
            elapsed = time.monotonic() - started
            orders = {v["order_id"]: v for v in view["orders"]}
            assert len(orders) == ORDERS
            for n in range(ORDERS):
                v = orders[f"o{n}"]
                expected = "failed" if (n * 37) % 1000 > LIMIT else "settled"
                assert v["status"] == expected, v
                assert len(v["events"]) == len(set(v["events"])) == 3, v  # each applied once
                finals = [e for e in v["events"] if e.startswith("payment-")]
                assert finals == [f"payment-{expected}-o{n}"], v

            # the supervisor restarted what died
            assert len(killed) == 5
            async with asyncio.timeout(30):
                while True:
                    instances = {i["id"]: i for i in
                                 (await client.get(f"{admin}/api/instances")).json()}
                    if all(instances[k]["restarts"] >= 1 and instances[k]["state"] == "serving"
                           for k in killed if k in instances):
                        break
                    await asyncio.sleep(0.2)

            # nothing lost, nothing left: every group caught up, no dead letters
            topics = {t["name"]: t for t in (await client.get(f"{admin}/api/topics")).json()}
            assert topics["orders"]["events"] == ORDERS
            for name in ("orders", "stock", "payments"):
                assert topics[name]["dead_letters"] == 0
                assert set(topics[name]["lag"].values()) == {0}, topics[name]

            # billing went up under the burst and back down after (cooldown 2s)
            assert scaled_up_in_ps
            async with asyncio.timeout(30):
                while True:
                    ps = await asyncio.to_thread(_ps, admin)
                    billing = next(s for s in ps["services"] if s["name"] == "billing")
                    if billing["replicas"] == 1:
                        break
                    await asyncio.sleep(0.5)
        print(f"{ORDERS} orders settled or failed in {elapsed:.1f}s with 5 kill -9")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()
    assert process.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]
    async with EventBus.connect(f"sqlite:///{tmp_path}/events.db",
                                store=f"sqlite:///{tmp_path}/store.db") as bus:
        decisions = []
        async with bus.consume("shoal.autoscaler", "test", start="earliest") as stream:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    async for event in stream:
                        decisions.append(event.data)
        billing = [(d["from"], d["to"]) for d in decisions if d["service"] == "billing"]
        # up under the burst, then back down to one; shutdown may scale up again afterwards
        assert billing and billing[0][1] > 1, decisions
        assert any(to == 1 for _, to in billing[1:]), decisions
        assert all("lag" in d["reason"] for d in decisions)
