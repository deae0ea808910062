"""shoal.gateway.reload in one process: routes follow a Store key; a swap keeps unchanged
routes' upstreams, lets a request routed before it finish on the old table, refuses bad
values (the old table stays), and retires the upstreams of removed routes."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import pytest

from shoal.gateway import HttpServer, Request, Response
from shoal.gateway.config import parse_routes
from shoal.gateway.proxy import Gateway
from shoal.gateway.reload import RouteWatcher
from shoal.mesh.http1 import ConnectionPool
from shoal.mesh.registry import EndpointCache, Instance, Registry
from shoal.store import connect_store
from shoal.store.base import Store
from tests.helpers import eventually

KEY = "shoal/gateway/routes"
ROUTES_AB = b"""
- {name: a, match: {path: {prefix: /a}}, service: svc-a}
- {name: b, match: {path: {prefix: /b}}, service: svc-b}
"""


class Backend:
    """An HttpServer answering with its name; ``/slow`` waits for ``release``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.release = asyncio.Event()
        self.server = HttpServer(self.handle)

    async def handle(self, req: Request) -> Response:
        if req.path.endswith("/slow"):
            await self.release.wait()
        return Response(self.name.encode())


@pytest.fixture
async def world() -> AsyncIterator[tuple[Store, Gateway, ConnectionPool, dict[str, Backend]]]:
    store = await connect_store(f"memory://{uuid.uuid4().hex}")
    registry = Registry(store)
    backends = {n: Backend(n) for n in ("svc-a", "svc-b", "svc-c")}
    for name, backend in backends.items():
        await backend.server.start("127.0.0.1", 0)
        await registry.register(Instance(id=f"{name}-1", service=name,
                                         address=f"127.0.0.1:{backend.server.port}"))
    cache = await EndpointCache(store).start()
    for name in backends:
        await cache.wait_for(name)
    gateway = Gateway(parse_routes(b"[]", "base").table, cache)
    server = HttpServer(gateway.handle)
    await server.start("127.0.0.1", 0)
    pool = ConnectionPool(("127.0.0.1", server.port), max_connections=1)
    try:
        yield store, gateway, pool, backends
    finally:
        for backend in backends.values():
            backend.release.set()
        await pool.aclose()
        await server.shutdown(1.0)
        await gateway.aclose()
        await cache.close()
        await registry.close()
        for backend in backends.values():
            await backend.server.shutdown(1.0)
        await store.close()


async def get(pool: ConnectionPool, path: str) -> tuple[int, bytes]:
    resp = await pool.request("GET", path, [("host", "gw.test")])
    return resp.status, await resp.aread()


async def test_routes_follow_the_store(world: tuple[Store, Gateway, ConnectionPool,
                                                    dict[str, Backend]],
                                       caplog: pytest.LogCaptureFixture) -> None:
    store, gateway, pool, _ = world
    base = parse_routes(b"- {name: c, service: svc-c}\n", "file")
    await store.put(KEY, ROUTES_AB)
    watcher = await RouteWatcher(gateway, store, KEY, base, retire_after=0.05).start()
    try:
        assert watcher.reloads == 1 and len(gateway.routes) == 2
        assert await get(pool, "/a/1") == (200, b"svc-a")
        route_a = gateway.routes.routes[0]
        upstream_a = next(u for k, u in gateway._upstreams.items() if k[0] is route_a)

        # a new table: route a unchanged (its upstream carries over), b replaced by c
        await store.put(KEY, b"- {name: a, match: {path: {prefix: /a}}, service: svc-a}\n"
                             b"- {name: c, match: {path: {prefix: /b}}, service: svc-c}\n")
        await eventually(lambda: watcher.reloads == 2, 5, "the second table")
        assert await get(pool, "/b/1") == (200, b"svc-c")
        assert await get(pool, "/a/2") == (200, b"svc-a")
        new_a = gateway.routes.routes[0]
        assert new_a is not route_a
        assert next(u for k, u in gateway._upstreams.items() if k[0] is new_a) is upstream_a
        assert upstream_a.stats.requests == 2

        # a bad value is refused, logged with where it is wrong; the table stays
        with caplog.at_level(logging.ERROR, "shoal.gateway"):
            await store.put(KEY, b"- {name: a, service: svc-a}\n- {name: a, service: svc-b,"
                                 b" match: {path: {exact: /x}}}\n")
            await eventually(lambda: watcher.refused == 1, 5, "the refusal")
        assert "refused new routes" in caplog.text and "line 2" in caplog.text
        assert "name already used" in (watcher.last_error or "")
        assert await get(pool, "/b/2") == (200, b"svc-c")
        for hostile in (b"\xff\xfe", b"a: &a [1]\n" + b"x" * 10, b"[" * 100 + b"]" * 100,
                        b"- !!python/object/apply:os.system [true]\n", b"{}"):
            await store.put(KEY, hostile)
        await eventually(lambda: watcher.refused == 6, 5, "every refusal")
        assert await get(pool, "/a/3") == (200, b"svc-a")

        # deleting the key goes back to the file's routes
        await store.delete(KEY)
        await eventually(lambda: watcher.reloads == 3, 5, "back to base")
        assert await get(pool, "/zzz") == (200, b"svc-c")
        await eventually(lambda: all(k[0] in set(gateway.routes) for k in gateway._upstreams),
                         5, "the upstreams of removed routes retired")
        await eventually(lambda: upstream_a._pools == {}, 5, "route a's upstream closed")
    finally:
        await watcher.close()


async def test_request_routed_before_a_swap_finishes_on_the_old_table(
        world: tuple[Store, Gateway, ConnectionPool, dict[str, Backend]]) -> None:
    store, gateway, pool, backends = world
    await store.put(KEY, ROUTES_AB)
    watcher = await RouteWatcher(gateway, store, KEY, parse_routes(b"[]", "f")).start()
    other = ConnectionPool(pool.address)
    try:
        slow = asyncio.create_task(get(pool, "/a/slow"))
        await eventually(lambda: gateway._upstreams != {}, 5, "the slow request routed")
        await store.put(KEY, b"- {name: b, match: {path: {prefix: /a}}, service: svc-b}\n")
        await eventually(lambda: watcher.reloads == 2, 5, "the swap")
        assert await get(other, "/a/x") == (200, b"svc-b")  # new requests: new table
        backends["svc-a"].release.set()
        assert await slow == (200, b"svc-a")  # routed before the swap: old table
    finally:
        await other.aclose()
        await watcher.close()
