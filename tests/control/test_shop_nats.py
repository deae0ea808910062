"""The shop on NATS JetStream, unchanged: ``shoal up`` with ``broker:`` and ``store:``
pointing at a real ``nats-server -js`` (the only two lines that differ from
``examples/shop/shoal.yaml``); orders placed through the gateway end settled or failed in
the read model. Then an instance started elsewhere (its own working directory, no files
shared with ``shoal up``, only the NATS URL) joins the mesh: the gateway sends it
requests and it takes a share of its consumer groups' partitions."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shoal.control.cleanup import member_prefix
from shoal.events.group import group_prefix
from shoal.store import connect_store
from tests.mesh_identity import get_over_mtls, mesh_identity

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "shop"
SHOP_TOPICS = ("orders", "stock", "payments")  # what orders-view subscribes to

pytestmark = pytest.mark.slow


def nats_manifest(url: str) -> str:
    """``examples/shop/shoal.yaml`` with its ``broker:`` and ``store:`` lines set to ``url``."""
    text = (SHOP / "shoal.yaml").read_text()
    text, brokers = re.subn(r"(?m)^broker: .*$", f"broker: {url}", text)
    text, stores = re.subn(r"(?m)^store: .*$", f"store: {url}", text)
    assert brokers == stores == 1, "examples/shop/shoal.yaml: one broker: and one store: line"
    return text


def _readline(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            return proc.stdout.readline()
        if proc.poll() is not None:
            return ""
    raise AssertionError("no output line in time")


def _stop(proc: subprocess.Popen[str], what: str) -> int:
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(f"{what} did not stop within 30 s of SIGTERM") from None
        return proc.returncode
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


class ShopOnNats:
    """``shoal up`` running the shop on NATS: its URLs and its state directory."""

    def __init__(self, url: str, directory: Path, gateway: str, admin: str) -> None:
        self.url, self.directory, self.gateway, self.admin = url, directory, gateway, admin


@pytest.fixture(scope="module")
def shop(nats_server, tmp_path_factory: pytest.TempPathFactory  # type: ignore[no-untyped-def]
         ) -> Iterator[ShopOnNats]:
    directory = tmp_path_factory.mktemp("shop-nats")
    url = f"{nats_server.url}/shop{uuid.uuid4().hex[:8]}"
    manifest = directory / "shoal.yaml"
    manifest.write_text(nats_manifest(url))
    log = (directory / "up.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": f"{SHOP}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "up", str(manifest),
         "--gateway-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        cwd=directory, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            line = _readline(proc, deadline)
            if not line:
                raise AssertionError("shoal up exited before it was ready: "
                                     + (directory / "up.log").read_text()[-3000:])
            m = re.search(r"ready in [0-9.]+s: gateway (\S+), admin (\S+)", line)
            if m:
                break
        yield ShopOnNats(url, directory, m.group(1).rstrip(","), m.group(2))
    finally:
        status = _stop(proc, "shoal up")
        log.close()
    assert status == 0, (directory / "up.log").read_text()[-3000:]


def place_orders(client: httpx.Client, gateway: str, amounts: list[int]) -> dict[str, str]:
    """Place one order per amount through the gateway: ``{order id: expected status}``."""
    expected = {}
    for amount in amounts:
        order_id = f"n{uuid.uuid4().hex[:10]}"
        order = {"order_id": order_id, "customer": f"c{amount}", "sku": "lamp",
                 "quantity": 1, "amount": amount}
        r = client.post(f"{gateway}/orders", json=order)
        assert r.status_code == 202, r.text
        expected[order_id] = "failed" if amount > 500 else "settled"  # SHOP_PAYMENT_LIMIT
    return expected


def wait_settled(client: httpx.Client, gateway: str, expected: dict[str, str]) -> None:
    """Every order of ``expected`` reaches its final status in the read model (orders-view)."""
    deadline = time.monotonic() + 20
    while True:
        views = {v["order_id"]: v for v in client.get(f"{gateway}/orders").json()["orders"]}
        statuses = {k: views.get(k, {}).get("status") for k in expected}
        if statuses == expected:
            for order_id in expected:
                assert len(views[order_id]["events"]) == 3, views[order_id]  # each once
            return
        assert time.monotonic() < deadline, f"not settled in 20 s: {statuses}"
        time.sleep(0.1)


def test_manifest_differs_from_the_shop_only_in_broker_and_store() -> None:
    original = (SHOP / "shoal.yaml").read_text().splitlines()
    changed = nats_manifest("nats://127.0.0.1:4222/shop").splitlines()
    assert len(original) == len(changed)
    differ = [(a, b) for a, b in zip(original, changed, strict=True) if a != b]
    assert [b for _, b in differ] == ["broker: nats://127.0.0.1:4222/shop",
                                      "store: nats://127.0.0.1:4222/shop"]


def test_shoal_up_runs_the_shop_on_nats(shop: ShopOnNats) -> None:
    with httpx.Client(timeout=10) as client:
        expected = place_orders(client, shop.gateway, [30, 120, 4000, 6])
        wait_settled(client, shop.gateway, expected)
        topics = {t["name"]: t for t in client.get(f"{shop.admin}/api/topics").json()}
        for name in SHOP_TOPICS:
            assert topics[name]["dead_letters"] == 0, topics[name]
        assert not list(shop.directory.glob("**/*.db")), "no SQLite file: all state on NATS"


async def _owners(url: str, topic: str, group: str) -> list[str]:
    store = await connect_store(url)
    try:
        prefix = f"{group_prefix(topic, group)}owners/"
        return [e.value.decode() for e in await store.list(prefix)]
    finally:
        await store.close()


def _requests_answered(metrics: str, service: str) -> float:
    pattern = rf'^shoal_requests_total\{{[^}}]*service="{service}"[^}}]*\}} ([0-9.e+]+)$'
    return sum(float(v) for v in re.findall(pattern, metrics, re.M))


def test_an_instance_started_elsewhere_joins_through_nats(shop: ShopOnNats,
                                                          tmp_path: Path) -> None:
    host2 = tmp_path / "host2"  # another working directory: nothing shared but the URL
    host2.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": f"{SHOP}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.instance", "--app", "shop.view:svc",
         "--listen", "127.0.0.1:0", "--broker", shop.url, "--store", shop.url,
         "--mtls", "strict"],  # as the shop: its certificate from the plane, through NATS
        cwd=host2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = _readline(proc, time.monotonic() + 30)
        assert '"event": "ready"' in line, line + (proc.stdout.read() if proc.poll() else "")
        ready = json.loads(line)
        assert ready["service"] == "orders-view"
        member = member_prefix(ready["pid"])
        with httpx.Client(timeout=10) as client:
            # gateway traffic for orders-view reaches the new instance (its own /metrics)
            deadline = time.monotonic() + 20
            tls = asyncio.run(mesh_identity(shop.url))  # strict mTLS: reading takes one
            while True:
                assert client.get(f"{shop.gateway}/orders").status_code == 200
                metrics = asyncio.run(get_over_mtls(tls, ready["listen"], "orders-view",
                                                    "/metrics"))[1].decode()
                if _requests_answered(metrics, "orders-view") > 0:
                    break
                assert time.monotonic() < deadline, "the gateway never sent it a request"
                time.sleep(0.05)
            # it shares the partitions of each of its groups with orders-view-1
            deadline = time.monotonic() + 20
            while True:
                owners = {t: asyncio.run(_owners(shop.url, t, "orders-view"))
                          for t in SHOP_TOPICS}
                shares = {t: sum(o.startswith(member) for o in v) for t, v in owners.items()}
                if all(0 < n < 8 for n in shares.values()) and all(
                        len(v) == 8 for v in owners.values()):
                    break
                assert time.monotonic() < deadline, f"no share of the partitions: {owners}"
                time.sleep(0.1)
            # the admin API (shoal ps) lists it, as run by someone else
            listed = {i["id"]: i for i in client.get(f"{shop.admin}/api/instances").json()}
            assert listed[ready["instance"]]["process"] == "external", listed
            assert listed[ready["instance"]]["state"] == "serving", listed
            assert listed[ready["instance"]]["address"] == ready["listen"]
            assert listed["orders-view-1"]["process"] == "running"
            # orders placed now are projected by both instances into the one read model
            expected = place_orders(client, shop.gateway, [10, 700, 20, 30, 40])
            wait_settled(client, shop.gateway, expected)
    finally:
        status = _stop(proc, "the second instance")
    assert status == 0
    assert list(host2.iterdir()) == [], "the instance kept no state of its own"
    # it left its groups on SIGTERM: every partition is orders-view-1's again
    for topic in SHOP_TOPICS:
        owners = asyncio.run(_owners(shop.url, topic, "orders-view"))
        assert not any(o.startswith(member) for o in owners), owners
