"""The control plane with real processes (stand-in instances), the gateway and the admin API."""

import asyncio
import dataclasses
import sys
import time
from pathlib import Path

import httpx
import msgspec
import pytest

from shoal.control.autoscaler import ScalePolicy
from shoal.control.forkserver import ForkServer, instance_environment, startup_modules
from shoal.control.load import LoadReport, load_key
from shoal.control.plane import ControlPlane, Plan, ServicePlan, preload_for
from shoal.control.restart import RestartPolicy
from shoal.errors import ConfigError
from shoal.gateway.config import parse_gateway_config

FAKE = str(Path(__file__).with_name("fake_service.py"))


def make_plan(tmp_path: Path, **kw) -> Plan:
    services = kw.pop("services", {"echo": ServicePlan("echo", "unused:app", replicas=2)})
    return Plan(broker=f"sqlite:///{tmp_path}/events.db", store=f"sqlite:///{tmp_path}/store.db",
                services=services, base_dir=tmp_path, admin_listen="127.0.0.1:0",
                gateway=parse_gateway_config(
                    "gateway: {listen: 127.0.0.1:0, routes_key: null, routes: [{name: echo, "
                    "match: {path: {prefix: /echo}}, service: echo}]}", "plan"),
                restart=RestartPolicy(initial_backoff="50ms", jitter=0.0),
                autoscale_interval=0.2, grace=5.0, **kw)


def plane_for(plan: Plan, lines: list[str]) -> ControlPlane:
    def launch(service: str, instance_id: str, port: int) -> list[str]:
        return [sys.executable, FAKE, service, instance_id, str(port), plan.store]
    return ControlPlane(plan, output=lines.append, launch=launch)


async def test_up_routes_through_the_gateway_and_the_admin_api_scales(tmp_path):
    lines: list[str] = []
    plane = plane_for(make_plan(tmp_path), lines)
    await plane.start(ready_timeout=20)
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            seen = set()
            for _ in range(40):  # least request picks among ties at random: 6 was 3% flaky
                r = await client.get(f"{plane.gateway_url}/echo/x")
                assert r.status_code == 200
                seen.add(r.json()["instance"])
                if len(seen) == 2:
                    break
            assert seen == {"echo-1", "echo-2"}
            admin = plane.admin_url
            services = (await client.get(f"{admin}/api/services")).json()
            assert services[0]["name"] == "echo" and services[0]["replicas"] == 2
            instances = (await client.get(f"{admin}/api/instances")).json()
            assert {(i["id"], i["state"], i["process"]) for i in instances} == {
                ("echo-1", "serving", "running"), ("echo-2", "serving", "running")}
            routes = (await client.get(f"{admin}/api/routes")).json()
            assert routes[0]["name"] == "echo"
            r = await client.post(f"{admin}/api/services/echo/scale", json={"replicas": 3})
            assert r.json() == {"service": "echo", "from": 2, "replicas": 3}
            await plane.supervisor.wait_ready(10)
            await plane.monitor.cache.wait_for("echo", lambda e: len(e) == 3, timeout=10)
            r = await client.post(f"{admin}/api/services/echo/scale", json={"replicas": 1})
            assert r.status_code == 200
            assert [i.id for i in plane.supervisor.of("echo")] == ["echo-1"]
            # hostile and malformed requests: clear errors naming what is wrong
            bad = [(b"{", 400, "not JSON"), (b"[]", 400, "expected a JSON object"),
                   (b'{"replicas": "3"}', 400, "replicas: expected an integer"),
                   (b'{"replicas": 1000}', 400, "replicas: expected an integer 0..64"),
                   (b'{"replicas": true}', 400, "replicas"),
                   (b'{"replicas": 1, "x": 2}', 400, "unknown key(s) 'x'"),
                   (b"\xff\xfe", 400, "not JSON"),
                   (b" " * 70000, 413, "at most 65536 bytes")]
            for body, status, message in bad:
                r = await client.post(f"{admin}/api/services/echo/scale", content=body)
                assert r.status_code == status, body[:20]
                assert message in r.json()["error"]
            r = await client.post(f"{admin}/api/services/nope/scale", json={"replicas": 1})
            assert r.status_code == 404 and "'nope': not in the manifest" in r.json()["error"]
            topics = (await client.get(f"{admin}/api/topics")).json()
            assert any(t["name"] == "shoal.instances" for t in topics)
    finally:
        await plane.close()
    assert plane.supervisor.instances == {}


async def test_autoscaler_scales_on_lag_and_publishes_its_decisions(tmp_path):
    policy = ScalePolicy(min=1, max=3, target_lag=10, cooldown="500ms")
    plan = make_plan(tmp_path, services={
        "worker": ServicePlan("worker", "unused:app", replicas=1, autoscale=policy)})
    lines: list[str] = []
    plane = plane_for(plan, lines)
    await plane.start(ready_timeout=20)
    try:
        bus = plane.bus
        await bus.publish_many("jobs", [{"n": i} for i in range(25)])
        async with bus.consume("jobs", "worker") as stream:  # the group exists, lag 25
            async for _ in stream:
                break  # one handled and acknowledged: lag 24
        for _ in range(100):
            if plane.supervisor.replicas("worker") == 3:
                break
            await asyncio.sleep(0.05)
        assert plane.supervisor.replicas("worker") == 3
        await bus.seek("jobs", "worker", "latest")  # the backlog is handled
        for _ in range(100):
            if plane.supervisor.replicas("worker") == 1:
                break
            await asyncio.sleep(0.05)
        assert plane.supervisor.replicas("worker") == 1
        events = []
        async with bus.consume("shoal.autoscaler", "test", start="earliest") as stream:
            async for event in stream:
                events.append(event.data)
                if len(events) == 2:
                    break
        assert [(e["from"], e["to"], e["direction"]) for e in events] == [
            (1, 3, "up"), (3, 1, "down")]
        assert "lag 24 / target 10 per instance -> 3" in events[0]["reason"]
    finally:
        await plane.close()


async def test_the_gateway_of_up_is_the_manifest_sections_limits_and_routes_key(tmp_path):
    gateway = parse_gateway_config(
        "gateway:\n  listen: 127.0.0.1:0\n  routes_key: t/routes\n  drain: 1s\n"
        "  limits: {max_body_bytes: 1KiB}\n"
        "  routes: [{name: echo, match: {path: {prefix: /echo}}, service: echo}]\n", "plan")
    plan = make_plan(tmp_path, services={"echo": ServicePlan("echo", "unused:app")})
    plane = plane_for(dataclasses.replace(plan, gateway=gateway), [])
    await plane.start(ready_timeout=20)
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.post(f"{plane.gateway_url}/echo/x", content=b"x" * 2048)
            assert r.status_code == 413  # gateway.limits
            assert (await client.get(f"{plane.gateway_url}/other/x")).status_code == 404
            await plane.bus.store.put("t/routes", b"- {name: other, match: {path: "
                                                  b"{prefix: /other}}, service: echo}\n")
            for _ in range(200):  # the routes key is followed (shoal.gateway.reload)
                if (await client.get(f"{plane.gateway_url}/other/x")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert (await client.get(f"{plane.gateway_url}/other/x")).status_code == 200
            routes = (await client.get(f"{plane.admin_url}/api/routes")).json()
            assert routes == [{"index": 0, "name": "other", "service": "echo",
                               "match": {"path": {"prefix": "/other"}}}]
    finally:
        await plane.close()


@pytest.mark.parametrize("listen, match", [
    ("nohost", "expected 'host:port'"), ("127.0.0.1:99999", "expected 'host:port'"),
    (":80", "expected 'host:port'"), ("256.1.1.1:0", "cannot listen there"),
    ("in_use", "cannot listen there"),
])
async def test_bad_or_busy_listen_addresses_are_config_errors(tmp_path, listen, match):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    if listen == "in_use":
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
    plan = make_plan(tmp_path)
    plan = Plan(broker=plan.broker, store=plan.store, services=plan.services,
                admin_listen=listen, gateway=None)
    try:
        with pytest.raises(ConfigError, match=f"admin.listen .*{match}"):
            await plane_for(plan, []).start()
    finally:
        busy.close()


async def test_autoscaler_scales_on_reported_inflight_requests(tmp_path):
    policy = ScalePolicy(min=1, max=4, target_inflight=5, cooldown="300ms")
    plan = make_plan(tmp_path, services={
        "api": ServicePlan("api", "unused:app", replicas=1, autoscale=policy)})
    plane = plane_for(plan, [])
    await plane.start(ready_timeout=20)
    try:
        key = load_key("api", "api-1")

        def load(peak: int) -> bytes:
            return msgspec.json.encode(LoadReport(service="api", instance="api-1",
                                                  inflight=peak, at=time.time()))

        await plane.bus.store.put(key, load(17))  # as the instance's LoadReporter writes
        for _ in range(100):
            if plane.supervisor.replicas("api") == 4:
                break
            await asyncio.sleep(0.05)
        assert plane.supervisor.replicas("api") == 4  # ceil(17 / 5)
        assert "in-flight 17 / target 5 per instance -> 4" in plane.autoscaler.decisions[0].reason
        await plane.bus.store.put(load_key("api", "api-2"), b"{not json")
        await plane.bus.store.put(key, load(0))
        for _ in range(100):
            if plane.supervisor.replicas("api") == 1:
                break
            await asyncio.sleep(0.05)
        assert plane.supervisor.replicas("api") == 1
    finally:
        await plane.close()


def test_the_fork_server_preloads_the_instances_start_and_the_apps_not_affected_by_env(
        tmp_path, monkeypatch):
    monkeypatch.delenv("SHOAL_PRELOAD_APPS", raising=False)
    services = {"a": ServicePlan("a", "shop.orders:svc"),
                "b": ServicePlan("b", "shop.view:svc", env={"X": "1"}),
                "c": ServicePlan("c", "shop.billing:svc"),
                "d": ServicePlan("d", "shop.billing:other", env={"Y": "2"})}
    plan = make_plan(tmp_path, services=services, mtls="strict")
    spec = preload_for(plan)
    assert spec.apps == ("shop.orders",)  # b and d's modules must see their env: at import
    assert spec.modules == tuple(startup_modules(plan.broker, plan.store, "strict"))
    guarded = {**services, "a": dataclasses.replace(services["a"], guarded=True)}
    assert "shoal.config" in preload_for(make_plan(tmp_path, services=guarded)).modules
    monkeypatch.setenv("SHOAL_PRELOAD_APPS", "0")
    assert preload_for(plan).apps == ()


async def test_the_plane_adopts_a_fork_server_launched_for_its_directory_else_closes_it(
        tmp_path, monkeypatch):
    monkeypatch.delenv("SHOAL_FORKSERVER", raising=False)
    plan = make_plan(tmp_path)
    early = ForkServer(instance_environment(tmp_path), str(tmp_path), preload_later=True)
    plane = ControlPlane(plan, output=None, forkserver=early)
    assert plane.supervisor.forkserver is early and plane._spare_forkserver is None
    assert early._preload == preload_for(plan) and early._preload_given.is_set()
    other = ForkServer(instance_environment(tmp_path / "elsewhere"), str(tmp_path / "x"),
                       preload_later=True)
    plane = ControlPlane(plan, output=None, forkserver=other)
    assert plane.supervisor.forkserver not in (None, other)
    assert plane._spare_forkserver is other  # closed by start()
    monkeypatch.setenv("SHOAL_FORKSERVER", "0")
    plane = ControlPlane(plan, output=None, forkserver=early)
    assert plane.supervisor.forkserver is None and plane._spare_forkserver is early
