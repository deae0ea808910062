"""The proxyless client against real HTTP backends registered in a real store."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from shoal.errors import ConfigError, NoEndpoint, UpstreamTimeout
from shoal.mesh.client import MeshClient, split_service_url
from shoal.mesh.registry import Instance, Registry
from shoal.mesh.resilience import load_traffic_policy
from shoal.store import connect_store
from tests.helpers import eventually


async def backend(name: str, hits: dict[str, int], *, status: int = 200, delay: float = 0.0,
                  ) -> tuple[web.AppRunner, str]:
    async def handle(request: web.Request) -> web.Response:
        hits[name] = hits.get(name, 0) + 1
        if delay:
            await asyncio.sleep(delay)
        body = await request.read()
        return web.json_response(
            {"backend": name, "path": request.path_qs, "body": body.decode(),
             "host": request.headers.get("host")},
            status=status,
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"127.0.0.1:{port}"


@pytest.fixture
async def store() -> AsyncIterator[object]:
    s = await connect_store(f"memory://{uuid.uuid4().hex}")
    yield s
    await s.close()


async def test_calls_a_service_by_name_and_balances(store) -> None:
    hits: dict[str, int] = {}
    runners = []
    registry = Registry(store)
    for i in range(3):
        runner, address = await backend(f"b{i}", hits)
        runners.append(runner)
        await registry.register(Instance(id=f"billing-{i}", service="billing", address=address))
    async with await MeshClient.connect(store) as mesh:
        await mesh.cache.wait_for("billing", lambda eps: len(eps) == 3, timeout=5)
        for i in range(30):
            resp = await mesh.request("POST", "http://billing/charge?x=1", json={"n": i})
            assert resp.status == 200
            data = await resp.json()
            assert data["path"] == "/charge?x=1" and data["body"] == f'{{"n":{i}}}'
            assert data["host"] == "billing"
        assert sorted(hits) == ["b0", "b1", "b2"] and sum(hits.values()) == 30
    await registry.close()
    for r in runners:
        await r.cleanup()


async def test_retries_on_another_instance_after_a_dead_one(store) -> None:
    hits: dict[str, int] = {}
    runner, address = await backend("live", hits)
    registry = Registry(store)
    await registry.register(Instance(id="dead", service="svc", address="127.0.0.1:1"))
    await registry.register(Instance(id="live", service="svc", address=address))
    policy = load_traffic_policy({"load_balancer": {"policy": "round_robin"}})
    async with await MeshClient.connect(store, default_policy=policy) as mesh:
        await mesh.cache.wait_for("svc", lambda eps: len(eps) == 2, timeout=5)
        for _ in range(10):
            # POST is retried only because a refused connection provably sent nothing
            assert (await mesh.request("POST", "http://svc/x", content=b"hi")).status == 200
        assert hits["live"] == 10
        assert mesh.upstream("svc").stats.retries >= 1
    await registry.close()
    await runner.cleanup()


async def test_a_5xx_is_retried_for_get_and_relayed_when_tries_run_out(store) -> None:
    hits: dict[str, int] = {}
    runner, address = await backend("sad", hits, status=503)
    registry = Registry(store)
    await registry.register(Instance(id="sad", service="svc", address=address))
    async with await MeshClient.connect(store) as mesh:
        await mesh.cache.wait_for("svc", lambda eps: len(eps) == 1, timeout=5)
        resp = await mesh.get("http://svc/")
        assert resp.status == 503
        assert hits["sad"] == 3  # one try and two retries (attempts: 2)
        hits.clear()
        assert (await mesh.post("http://svc/", content=b"x")).status == 503
        assert hits["sad"] == 1  # POST may have been seen: not retried
    await registry.close()
    await runner.cleanup()


async def test_errors_name_the_layer(store) -> None:
    hits: dict[str, int] = {}
    runner, address = await backend("slow", hits, delay=1.0)
    registry = Registry(store)
    await registry.register(Instance(id="slow", service="slow", address=address))
    policy = load_traffic_policy({"timeouts": {"request": "200ms"}})
    async with await MeshClient.connect(store, default_policy=policy) as mesh:
        with pytest.raises(NoEndpoint, match="balancer: no endpoint for service 'nobody'") as no:
            await mesh.get("http://nobody/")
        assert (no.value.layer, no.value.status) == ("balancer", 503)
        await mesh.cache.wait_for("slow", lambda eps: len(eps) == 1, timeout=5)
        with pytest.raises(UpstreamTimeout, match=r"timeout: request timeout of 0\.2s") as late:
            await mesh.get("http://slow/")
        assert (late.value.layer, late.value.status) == ("timeout", 504)
    await registry.close()
    await runner.cleanup()


@pytest.mark.parametrize(
    "url", ["billing/charge", "ftp://billing/x", "http://billing:80/x", "http:///x", 5, "x" * 9000]
)
def test_malformed_urls_are_refused(url) -> None:
    with pytest.raises(ConfigError):
        split_service_url(url)


async def test_ejected_instance_stops_getting_traffic(store) -> None:
    hits: dict[str, int] = {}
    good, good_address = await backend("good", hits)
    bad, bad_address = await backend("bad", hits, status=500)
    registry = Registry(store)
    await registry.register(Instance(id="good", service="svc", address=good_address))
    await registry.register(Instance(id="bad", service="svc", address=bad_address))
    policy = load_traffic_policy({
        "load_balancer": {"policy": "round_robin"},
        "retries": {"attempts": 0},
        "outlier_detection": {"consecutive_5xx": 3, "max_ejection_percent": 50},
    })
    async with await MeshClient.connect(store, default_policy=policy) as mesh:
        await mesh.cache.wait_for("svc", lambda eps: len(eps) == 2, timeout=5)
        for _ in range(40):
            await (await mesh.get("http://svc/")).aread()
        assert hits["bad"] == 3 and hits["good"] == 37
        assert mesh.upstream("svc").stats.ejections == 1
    await registry.close()
    await good.cleanup()
    await bad.cleanup()


async def test_success_rate_ejection_runs_every_interval(store) -> None:
    hits: dict[str, int] = {}
    runners, registry = [], Registry(store)
    for i in range(5):
        runner, address = await backend(f"ok{i}", hits)
        runners.append(runner)
        await registry.register(Instance(id=f"ok{i}", service="sr", address=address))
    flaky, flaky_address = await backend("flaky", hits, status=500)
    runners.append(flaky)
    await registry.register(Instance(id="flaky", service="sr", address=flaky_address))
    policy = load_traffic_policy({
        "load_balancer": {"policy": "round_robin"},
        "retries": {"attempts": 0},
        "outlier_detection": {
            "consecutive_5xx": 0, "success_rate": True, "interval": "1s",
            "success_rate_minimum_hosts": 3, "success_rate_request_volume": 5,
            "max_ejection_percent": 50,
        },
    })
    async with await MeshClient.connect(store, default_policy=policy) as mesh:
        await mesh.cache.wait_for("sr", lambda eps: len(eps) == 6, timeout=5)
        # Until the first evaluation with enough volume: the counts start afresh every
        # interval, so a fixed number of paced requests (as before) never reached the
        # volume on a loaded machine (30 requests per interval: 33 ms each at most now).
        async with asyncio.timeout(10):
            while not mesh.upstream("sr").stats.ejections:
                await (await mesh.get("http://sr/")).aread()
        assert mesh.upstream("sr").stats.ejections == 1
        before = hits["flaky"]
        for _ in range(30):
            await (await mesh.get("http://sr/")).aread()
        assert hits["flaky"] == before  # ejected for base_ejection_time (30 s)
    await registry.close()
    for r in runners:
        await r.cleanup()


async def test_endpoint_changes_reach_the_client(store) -> None:
    hits: dict[str, int] = {}
    runner, address = await backend("late", hits)
    async with await MeshClient.connect(store) as mesh:
        with pytest.raises(NoEndpoint):
            await mesh.get("http://late/")
        registry = Registry(store)
        await registry.register(Instance(id="late", service="late", address=address))
        await eventually(lambda: len(mesh.cache.endpoints("late")) == 1, 2)
        assert (await mesh.get("http://late/")).status == 200
        await registry.close()
    await runner.cleanup()


async def test_httpx_transport_speaks_to_services_by_name(store) -> None:
    import httpx

    from shoal.mesh.httpx_transport import HTTPXTransport

    hits: dict[str, int] = {}
    runner, address = await backend("hx", hits)
    registry = Registry(store)
    await registry.register(Instance(id="hx", service="orders", address=address))
    mesh = await MeshClient.connect(store)
    await mesh.cache.wait_for("orders", lambda eps: len(eps) == 1, timeout=5)
    async with httpx.AsyncClient(transport=HTTPXTransport(mesh)) as client:
        resp = await client.post("http://orders/new?a=b", json={"sku": "x"})
        assert resp.status_code == 200
        data = resp.json()
        assert data["path"] == "/new?a=b" and data["body"] == '{"sku":"x"}'

        async def chunks():
            yield b"str"
            yield b"eamed"

        resp = await client.post("http://orders/up", content=chunks())
        assert resp.json()["body"] == "streamed"
    await registry.close()
    await runner.cleanup()


async def test_tries_retried_elsewhere_do_not_open_the_services_circuit(store) -> None:
    """An instance dying fails every request in flight on it at once; those are retried on
    another instance and succeed, so the service's circuit stays closed (its count is per
    request); only requests that fail after every try count."""
    hits: dict[str, int] = {}
    good, good_address = await backend("good", hits)
    with socket.socket() as s:  # a port nobody listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        dead_address = f"127.0.0.1:{s.getsockname()[1]}"
    registry = Registry(store)
    await registry.register(Instance(id="dead", service="svc", address=dead_address))
    await registry.register(Instance(id="good", service="svc", address=good_address))
    policy = load_traffic_policy({
        "load_balancer": {"policy": "round_robin"},
        "retries": {"attempts": 2},
        "circuit_breaker": {"consecutive_failures": 2},
        "outlier_detection": {"consecutive_5xx": 1000, "consecutive_gateway_failure": 0},
    })
    async with await MeshClient.connect(store, default_policy=policy) as mesh:
        await mesh.cache.wait_for("svc", lambda eps: len(eps) == 2, timeout=5)
        responses = await asyncio.gather(*(mesh.get("http://svc/") for _ in range(20)))
        assert [r.status for r in responses] == [200] * 20
        upstream = mesh.upstream("svc")
        assert upstream.stats.retries >= 2  # tries on the dead instance did fail
        assert upstream.breaker.state.value == "closed"
    await registry.close()
    await good.cleanup()
