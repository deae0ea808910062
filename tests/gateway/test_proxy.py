"""shoal.gateway.proxy with real parts: an HttpServer running the Gateway on loopback,
aiohttp backends registered in a memory:// store, a memory:// bus, and requests sent with
the mesh's own HTTP/1.1 client."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from shoal.events import codec
from shoal.events.bus import EventBus
from shoal.events.event import Event
from shoal.gateway import HttpServer
from shoal.gateway.proxy import Gateway
from shoal.gateway.routes import RouteTable
from shoal.mesh.http1 import ConnectionPool, Response
from shoal.mesh.registry import EndpointCache, Instance, Registry
from shoal.store import connect_store

MiB = 1024 * 1024
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class Backends:
    """aiohttp backends registered in the store; ``seen`` records what each one received."""

    registry: Registry
    runners: list[web.AppRunner] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def add(self, service: str, name: str, *, labels: dict[str, str] | None = None,
                  delay: float = 0.0) -> None:
        async def echo(request: web.Request) -> web.StreamResponse:
            if delay:
                await asyncio.sleep(delay)
            if request.path.startswith("/download/"):
                size = int(request.path.rsplit("/", 1)[1])
                resp = web.StreamResponse(headers={"content-type": "application/octet-stream"})
                await resp.prepare(request)
                for chunk in _pattern(size):
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
            digest, size = hashlib.sha256(), 0
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
            record = {"backend": name, "method": request.method, "path": request.path_qs,
                      "headers": list(request.headers.items()), "size": size,
                      "sha256": digest.hexdigest()}
            self.seen.append(record)
            if "x-plain" in request.headers:  # no Connection header naming another
                return web.json_response(record, headers={
                    "server": "backend", "x-up": name, "date": "Tue, 01 Jan 2030 00:00:00 GMT"})
            return web.json_response(record, headers={"server": "backend", "x-up": name,
                                                      "connection": "keep-alive, x-up"})

        app = web.Application(client_max_size=64 * MiB)
        app.router.add_route("*", "/{tail:.*}", echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.runners.append(runner)
        await self.registry.register(Instance(id=name, service=service,
                                              address=f"127.0.0.1:{port}",
                                              labels=labels or {}))


def _pattern(size: int, piece: int = 64 * 1024) -> list[bytes]:
    block = bytes(range(256)) * (piece // 256)
    return [block[: min(piece, size - at)] for at in range(0, size, piece)]


@dataclass
class Env:
    """One running gateway and what it talks to."""

    backends: Backends
    cache: EndpointCache
    bus: EventBus | None
    server: HttpServer | None = None
    gateway: Gateway | None = None
    pool: ConnectionPool | None = None

    async def start(self, routes: list[dict[str, Any]], *, wait: dict[str, int] | None = None,
                    bus: bool = True) -> None:
        for service, n in (wait or {}).items():
            await self.cache.wait_for(service, lambda eps, n=n: len(eps) >= n, timeout=5)
        self.gateway = Gateway(RouteTable.from_config(routes), self.cache,
                               self.bus if bus else None)
        self.server = HttpServer(self.gateway.handle)
        await self.server.start("127.0.0.1", 0)
        self.pool = ConnectionPool(("127.0.0.1", self.server.port))

    async def request(self, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                      body: Any = None, host: str = "shop.test") -> Response:
        assert self.pool is not None
        return await self.pool.request(method, target, [("host", host), *(headers or [])], body)

    async def json(self, method: str, target: str, **kw: Any) -> tuple[Response, Any]:
        resp = await self.request(method, target, **kw)
        return resp, json.loads(await resp.aread())


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    store = await connect_store(f"memory://{uuid.uuid4().hex}")
    registry = Registry(store)
    cache = await EndpointCache(store).start()
    bus = await EventBus.connect(f"memory://{uuid.uuid4().hex}")
    e = Env(Backends(registry), cache, bus)
    try:
        async with asyncio.timeout(60):
            yield e
    finally:
        if e.pool is not None:
            await e.pool.aclose()
        if e.server is not None:
            await e.server.shutdown(1)
        if e.gateway is not None:
            await e.gateway.aclose()
        await cache.close()
        await registry.close()
        for runner in e.backends.runners:
            await runner.cleanup()
        await bus.close()
        await store.close()


def _header(record: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in record["headers"] if k.lower() == name]


# -- routing ---------------------------------------------------------------------------------
async def test_route_rewrite_and_header_edits_reach_the_backend(env: Env) -> None:
    await env.backends.add("orders", "o1")
    await env.start([{
        "name": "orders", "match": {"path": {"prefix": "/api/orders"}},
        "rewrite": {"prefix": "/orders", "host": "orders.internal"},
        "headers": {"request": {"set": {"x-route": "orders"}, "remove": ["x-debug"]},
                    "response": {"remove": ["server"], "add": {"x-via": "shoal"}}},
        "service": "orders",
    }], wait={"orders": 1})
    resp, seen = await env.json("GET", "/api/orders/42?full=1", headers=[
        ("x-debug", "1"), ("traceparent", TRACEPARENT),
        ("x-forwarded-for", "10.0.0.9"), ("connection", "keep-alive, x-secret"),
        ("x-secret", "hop"), ("te", "trailers")])
    assert resp.status == 200
    assert seen["path"] == "/orders/42?full=1"
    assert _header(seen, "host") == ["orders.internal"]
    assert _header(seen, "x-route") == ["orders"] and not _header(seen, "x-debug")
    assert _header(seen, "traceparent") == [TRACEPARENT]
    assert _header(seen, "x-forwarded-for") == ["10.0.0.9, 127.0.0.1"]
    assert _header(seen, "x-forwarded-proto") == ["http"]
    (request_id,) = _header(seen, "x-request-id")
    assert len(request_id) == 32
    assert not _header(seen, "x-secret") and not _header(seen, "te")
    names = {n.lower() for n, _ in resp.headers}
    assert b"server" not in names and resp.header("x-via") == b"shoal"
    assert resp.header("x-up") is None  # listed in the upstream's Connection header

    _, seen = await env.json("GET", "/api/orders", headers=[("x-request-id", "abc")])
    assert _header(seen, "x-request-id") == ["abc"]
    assert _header(seen, "x-forwarded-for") == ["127.0.0.1"]


async def test_a_route_without_edits_forwards_and_relays_headers_alike(env: Env) -> None:
    # Without edits the header lines are encoded in the pass that picks them (both ways).
    await env.backends.add("orders", "o1")
    await env.start([{"match": {"path": {"prefix": "/api"}}, "service": "orders"}],
                    wait={"orders": 1})
    resp, seen = await env.json("GET", "/api/x?q=1", headers=[
        ("traceparent", TRACEPARENT), ("x-forwarded-for", "10.0.0.9"),
        ("x-forwarded-for", "10.0.0.10"), ("connection", "keep-alive"), ("te", "trailers"),
        ("keep-alive", "timeout=5"), ("x-forwarded-proto", "https"), ("x-plain", "1")])
    assert resp.status == 200 and seen["path"] == "/api/x?q=1"
    assert _header(seen, "host") == ["shop.test"]
    assert _header(seen, "traceparent") == [TRACEPARENT]
    assert _header(seen, "x-forwarded-for") == ["10.0.0.9, 10.0.0.10, 127.0.0.1"]
    assert _header(seen, "x-forwarded-proto") == ["http"]
    assert len(_header(seen, "x-request-id")[0]) == 32
    for hop in ("te", "keep-alive", "connection"):
        assert not _header(seen, hop), hop
    assert resp.header("server") == b"backend" and resp.header("x-up") == b"o1"
    assert [v for n, v in resp.headers if n.lower() == b"date"] == [
        b"Tue, 01 Jan 2030 00:00:00 GMT"]  # the upstream's, not a second one
    assert [n for n, _ in resp.headers if n.lower() == b"content-length"] == [b"content-length"]

    _, seen = await env.json("GET", "/api/y", headers=[
        ("connection", "x-secret"), ("x-secret", "hop"), ("x-request-id", "abc"),
        ("x-plain", "1")])
    assert not _header(seen, "x-secret") and _header(seen, "x-request-id") == ["abc"]

    resp = await env.request("HEAD", "/api/z", headers=[("x-plain", "1")])
    assert resp.status == 200 and await resp.aread() == b""
    assert int(resp.header("content-length") or 0) > 0  # the upstream's, announced


async def test_no_route_and_invalid_path_name_the_router(env: Env) -> None:
    await env.start([{"match": {"path": {"prefix": "/api"}}, "service": "x"}])
    resp, body = await env.json("GET", "/nope")
    assert resp.status == 404 and resp.header("shoal-error") == b"router; no-route"
    assert body["layer"] == "router"
    resp, body = await env.json("GET", "/api/../../etc")
    assert resp.status == 400 and body["layer"] == "router"


async def test_weighted_split_is_roughly_honoured(env: Env) -> None:
    await env.backends.add("stable", "s1")
    await env.backends.add("canary", "c1")
    await env.start([{"match": {"path": {"prefix": "/"}}, "destinations": [
        {"service": "stable", "weight": 90}, {"service": "canary", "weight": 10}]}],
        wait={"stable": 1, "canary": 1})
    for _ in range(200):
        resp = await env.request("GET", "/x")
        assert resp.status == 200
        await resp.aread()
    counts = {b: sum(1 for r in env.backends.seen if r["backend"] == b) for b in ("s1", "c1")}
    assert counts["s1"] + counts["c1"] == 200
    assert 160 <= counts["s1"] <= 195, counts  # 180 expected; ~4.2 standard deviations off


async def test_subset_routing_by_version_label(env: Env) -> None:
    await env.backends.add("shop", "v1a", labels={"version": "v1"})
    await env.backends.add("shop", "v1b", labels={"version": "v1"})
    await env.backends.add("shop", "v2a", labels={"version": "v2"})
    await env.start([
        {"match": {"path": {"prefix": "/"}, "headers": {"x-canary": "1"}},
         "destinations": [{"service": "shop", "subset": {"version": "v2"}}]},
        {"match": {"path": {"prefix": "/"}},
         "destinations": [{"service": "shop", "subset": {"version": "v1"}}]},
    ], wait={"shop": 3})
    for _ in range(10):
        _, seen = await env.json("GET", "/", headers=[("x-canary", "1")])
        assert seen["backend"] == "v2a"
    stable = set()
    for _ in range(20):
        _, seen = await env.json("GET", "/")
        stable.add(seen["backend"])
    assert stable == {"v1a", "v1b"}


async def test_an_empty_subset_is_a_balancer_error(env: Env) -> None:
    await env.backends.add("shop", "v1", labels={"version": "v1"})
    await env.start([{"match": {"path": {"prefix": "/"}},
                      "destinations": [{"service": "shop", "subset": {"version": "v9"}}]}],
                    wait={"shop": 1})
    resp, body = await env.json("GET", "/")
    assert resp.status == 503 and resp.header("shoal-error").startswith(b"balancer; ")
    assert body["layer"] == "balancer"


async def test_fault_abort_and_delay(env: Env) -> None:
    await env.backends.add("svc", "a")
    await env.start([
        {"match": {"path": {"prefix": "/abort"}}, "service": "svc",
         "fault": {"abort": {"percent": 100, "status": 418}}},
        {"match": {"path": {"prefix": "/delay"}}, "service": "svc",
         "fault": {"delay": {"percent": 100, "fixed": "200ms"}}},
    ], wait={"svc": 1})
    resp, body = await env.json("GET", "/abort")
    assert resp.status == 418 and resp.header("shoal-error") == b"fault; fault-injected"
    assert body["layer"] == "fault" and not env.backends.seen
    began = time.monotonic()
    resp, seen = await env.json("GET", "/delay")
    assert resp.status == 200 and seen["backend"] == "a"
    assert time.monotonic() - began >= 0.19


async def test_dead_and_slow_services_name_the_layer(env: Env) -> None:
    await env.backends.add("slow", "s", delay=2.0)
    await env.start([
        {"match": {"path": {"prefix": "/dead"}}, "service": "ghost"},
        {"match": {"path": {"prefix": "/slow"}}, "service": "slow", "timeout": "200ms"},
    ], wait={"slow": 1})
    resp, body = await env.json("GET", "/dead")
    assert resp.status == 503 and resp.header("shoal-error").startswith(b"balancer; ")
    assert body["layer"] == "balancer" and "ghost" in body["error"]
    began = time.monotonic()
    resp, body = await env.json("GET", "/slow")
    assert resp.status == 504 and resp.header("shoal-error").startswith(b"timeout; ")
    assert body["layer"] == "timeout"
    assert time.monotonic() - began < 1.5


async def test_a_refused_connection_is_an_upstream_error(env: Env) -> None:
    await env.backends.registry.register(Instance(id="d", service="down",
                                                  address="127.0.0.1:1"))
    await env.start([{"match": {"path": {"prefix": "/"}}, "service": "down"}],
                    wait={"down": 1})
    resp, body = await env.json("GET", "/")
    assert resp.status == 502 and body["layer"] == "upstream"
    assert resp.header("shoal-error").startswith(b"upstream; ")


async def test_mirror_sends_a_copy_and_discards_its_answer(env: Env) -> None:
    await env.backends.add("main", "m")
    await env.backends.add("shadow", "sh")
    await env.start([{"match": {"path": {"prefix": "/"}}, "service": "main",
                      "mirror": {"service": "shadow", "percent": 100}}],
                    wait={"main": 1, "shadow": 1})
    resp, seen = await env.json("POST", "/m", body=b"payload")
    assert resp.status == 200 and seen["backend"] == "m"
    for _ in range(100):
        if any(r["backend"] == "sh" for r in env.backends.seen):
            break
        await asyncio.sleep(0.02)
    copy = next(r for r in env.backends.seen if r["backend"] == "sh")
    assert copy["path"] == "/m" and copy["size"] == 7


# -- streaming -------------------------------------------------------------------------------
async def test_streaming_upload_and_download_through_the_proxy(env: Env) -> None:
    await env.backends.add("files", "f")
    await env.start([{"match": {"path": {"prefix": "/"}}, "service": "files"}],
                    wait={"files": 1})
    assert env.server is not None and env.gateway is not None
    handled: list[tuple[Any, Any]] = []
    handle = env.gateway.handle

    async def recording(request: Any) -> Any:
        resp = await handle(request)
        handled.append((request, resp))
        return resp

    env.server.handler = recording
    size = 6 * MiB + 123
    pieces = [os.urandom(256 * 1024) for _ in range(size // (256 * 1024))]
    pieces.append(os.urandom(size - sum(map(len, pieces))))

    async def chunked() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    expected = hashlib.sha256(b"".join(pieces)).hexdigest()
    resp, seen = await env.json("PUT", "/upload", body=chunked())
    assert resp.status == 200 and seen["size"] == size and seen["sha256"] == expected
    assert not _header(seen, "transfer-encoding") or _header(seen, "transfer-encoding") == [
        "chunked"]

    async def fixed() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    resp, seen = await env.json("PUT", "/upload", body=fixed(),
                                headers=[("content-length", str(size))])
    assert resp.status == 200 and seen["size"] == size and seen["sha256"] == expected
    assert len(handled) == 2  # both uploads streamed, not held whole
    assert all(req.peak_buffered <= 2 * MiB for req, _ in handled)

    resp = await env.request("GET", f"/download/{size}")
    assert resp.status == 200
    digest, got = hashlib.sha256(), 0
    async for chunk in resp.aiter_bytes():
        digest.update(chunk)
        got += len(chunk)
    want = hashlib.sha256(b"".join(_pattern(size))).hexdigest()
    assert got == size and digest.hexdigest() == want
    upstream_response = handled[-1][1]
    assert upstream_response.peak_buffered <= 2 * MiB


# -- events over HTTP ------------------------------------------------------------------------
async def _read_events(bus: EventBus, topic: str, n: int) -> list[Event]:
    out: list[Event] = []
    async with bus.consume(topic, f"g-{uuid.uuid4().hex[:8]}") as events:
        async for event in events:
            out.append(event)
            if len(out) == n:
                break
    return out


async def test_post_events_binary_and_structured(env: Env) -> None:
    await env.start([])
    resp, ack = await env.json("POST", "/events/orders", headers=[
        ("ce-specversion", "1.0"), ("ce-id", "e-1"), ("ce-source", "/shop"),
        ("ce-type", "order.created"), ("content-type", "application/json")],
        body=b'{"order": 1}')
    assert resp.status == 202, ack
    assert ack["topic"] == "orders" and ack["id"] == "e-1" and ack["duplicate"] is False
    assert isinstance(ack["partition"], int) and isinstance(ack["offset"], int)

    structured = codec.to_structured(Event(id="e-2", source="/shop", type="order.paid",
                                           data={"order": 2}))
    resp, ack = await env.json("POST", "/events/orders", body=structured, headers=[
        ("content-type", "application/cloudevents+json")])
    assert resp.status == 202 and ack["id"] == "e-2"

    assert env.bus is not None
    events = await _read_events(env.bus, "orders", 2)
    assert {(e.id, e.type) for e in events} == {("e-1", "order.created"), ("e-2", "order.paid")}
    assert {json.dumps(e.data, sort_keys=True) for e in events} == {
        '{"order": 1}', '{"order": 2}'}


async def test_malformed_events_and_bad_topics_are_400(env: Env) -> None:
    await env.start([])
    resp, body = await env.json("POST", "/events/orders", headers=[
        ("ce-specversion", "1.0"), ("ce-source", "/shop"), ("ce-type", "t")], body=b"{}")
    assert resp.status == 400 and body["attribute"] == "id" and "id" in body["error"]
    assert resp.header("shoal-error") == b"events; invalid-event"
    resp, body = await env.json("POST", "/events/orders", body=b"{not json",
                                headers=[("content-type", "application/cloudevents+json")])
    assert resp.status == 400 and body["attribute"] == "event"
    resp, body = await env.json("POST", "/events/bad%20topic!", headers=[
        ("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-source", "s"), ("ce-type", "t")])
    assert resp.status == 400 and body["reason"] == "invalid-topic"


async def test_events_without_a_bus_are_503(env: Env) -> None:
    await env.start([], bus=False)
    resp, body = await env.json("POST", "/events/orders", headers=[
        ("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-source", "s"), ("ce-type", "t")])
    assert resp.status == 503 and body["layer"] == "events"
    assert resp.header("shoal-error") == b"events; no-bus"
