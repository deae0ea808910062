"""A miniature shop on real sockets for the observability tests.

client -> gateway (HttpServer + Gateway) -> orders (HttpServer) -> publish ``orders``
-> consumers ``inventory`` and ``billing``; billing calls ``payments`` through the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from shoal.events.bus import EventBus
from shoal.events.event import Event
from shoal.gateway import HttpServer
from shoal.gateway.proxy import Gateway
from shoal.gateway.routes import RouteTable
from shoal.gateway.server import Request, Response
from shoal.mesh.client import MeshClient
from shoal.mesh.http1 import ConnectionPool
from shoal.mesh.http1 import Response as ClientResponse
from shoal.mesh.registry import EndpointCache, Instance, Registry
from shoal.observability.http import observe_gateway, observe_handler, with_metrics
from shoal.store import connect_store

ROUTES = [{"name": "orders", "match": {"path": {"prefix": "/orders"}}, "service": "orders"}]


@dataclass
class Shop:
    """The running shop; ``order()`` places one order through the gateway."""

    bus: EventBus
    mesh: MeshClient
    gateway_server: HttpServer
    servers: list[HttpServer]
    pool: ConnectionPool
    handled: dict[str, list[str]] = field(default_factory=lambda: {"inventory": [],
                                                                   "billing": []})

    async def order(self, headers: list[tuple[str, str]] | None = None) -> ClientResponse:
        resp = await self.pool.request("POST", "/orders", [("host", "shop.test"),
                                                           *(headers or [])], b'{"sku": 1}')
        await resp.aread()
        return resp

    async def get(self, target: str) -> tuple[int, bytes]:
        resp = await self.pool.request("GET", target, [("host", "shop.test")])
        return resp.status, await resp.aread()


@contextlib.asynccontextmanager
async def running_shop() -> AsyncIterator[Shop]:
    """Start every part (metrics/tracing as the caller switched them on), stop them all."""
    store = await connect_store(f"memory://{uuid.uuid4().hex}")
    registry = Registry(store)
    cache = await EndpointCache(store).start()
    bus = await EventBus.connect(f"memory://{uuid.uuid4().hex}", store=store)
    mesh = MeshClient(cache)
    servers: list[HttpServer] = []

    async def serve(service: str, handler: Any) -> None:
        server = HttpServer(observe_handler(handler, service,
                                            route_of=lambda r: r.raw_path.decode()))
        await server.start("127.0.0.1", 0)
        servers.append(server)
        await registry.register(Instance(id=f"{service}-1", service=service,
                                         address=f"127.0.0.1:{server.port}"))

    async def payments(request: Request) -> Response:
        await request.body()
        return Response.json({"paid": True})

    async def orders(request: Request) -> Response:
        body = await request.body()
        await bus.publish("orders", {"order": body.decode()}, key="alice")
        return Response.json({"accepted": True}, status=201)

    await serve("payments", payments)
    await serve("orders", orders)
    for service in ("payments", "orders"):
        await cache.wait_for(service, lambda eps: len(eps) >= 1, timeout=5)

    gateway = Gateway(RouteTable.from_config(ROUTES), cache, bus)
    gateway_server = HttpServer(with_metrics(observe_gateway(gateway)))
    await gateway_server.start("127.0.0.1", 0)
    pool = ConnectionPool(("127.0.0.1", gateway_server.port))
    shop = Shop(bus, mesh, gateway_server, servers, pool)

    async def inventory(event: Event) -> None:
        shop.handled["inventory"].append(event.id)

    async def billing(event: Event) -> None:
        resp = await mesh.request("POST", "http://payments/charge", json={"order": event.id})
        await resp.aread()
        shop.handled["billing"].append(event.id)

    await bus.subscribe("orders", "inventory", inventory)
    await bus.subscribe("orders", "billing", billing)
    try:
        async with asyncio.timeout(60):
            yield shop
    finally:
        await pool.aclose()
        await gateway_server.shutdown(1)
        await gateway.aclose()
        for server in servers:
            await server.shutdown(1)
        await mesh.aclose()
        await bus.close()
        await cache.close()
        await registry.close()
        await store.close()
