"""The gateway as a running program: ``serve_gateway(config, store=..., broker=...)`` opens
the Store and the bus, follows the registry (``EndpointCache``) and the routes key
(``RouteWatcher``), listens, reports ready, and on ``stop`` shuts down gracefully: stop
accepting, let in-flight requests finish within ``config.drain``, then close.

``shoal gateway`` (``shoal.commands.gateway``) runs it on uvloop in one process.

**Toward a strict mesh** (``mtls="strict"`` or ``"permissive"``, ``shoal gateway --mtls``):
the gateway gets the mesh identity ``shoal up``'s gateway has (``spiffe://<trust domain>/
svc/shoal-gateway``) from the control plane's CA through the Store, as an instance does
(``request_identity``: the key is made here and never leaves), renews it
(``rotate_forever``), and calls services over mutual TLS (``Gateway(tls=...)``). Its own
listeners stay as configured (edge TLS is ``gateway.edge``'s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from shoal.errors import ConfigError
from shoal.events.bus import EventBus
from shoal.gateway.config import GatewayConfig, ListenAddress
from shoal.gateway.proxy import Gateway
from shoal.gateway.reload import RouteWatcher
from shoal.gateway.server import Handler, HttpServer
from shoal.mesh.ejections import EjectionReporter
from shoal.mesh.registry import EndpointCache
from shoal.store.base import Store
from shoal.store.connect import connect_store

log = logging.getLogger("shoal.gateway")


@dataclass(frozen=True, slots=True)
class RunningGateway:
    """A gateway with its parts open: ``gateway.handle`` is the server's handler."""

    gateway: Gateway
    watcher: RouteWatcher | None

    @property
    def handle(self) -> Handler:
        """The ``HttpServer`` handler."""
        return self.gateway.handle


@dataclass(frozen=True, slots=True)
class Ready:
    """What a started gateway reports: where it listens and what it serves."""

    listen: list[str]
    routes: int
    routes_key: str | None
    routes_revision: int


async def listen(server: HttpServer, addresses: tuple[ListenAddress, ...], *,
                 reuse_port: bool = False) -> list[str]:
    """Start ``server`` on every address; the addresses bound (real ports for port 0)."""
    for address in addresses:
        try:
            if address.path is not None:
                await server.start(path=address.path)
            else:
                await server.start(address.host, address.port, reuse_port=reuse_port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    out = []
    for bound in server.addresses:
        if isinstance(bound, str):
            out.append(f"unix:{bound}")
        else:
            host, port = bound
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return out


async def open_store(url: str) -> Store:
    """The Store at ``url``; an unopenable one is a ConfigError naming the URL."""
    try:
        return await connect_store(url)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"cannot open store {url!r}: {exc}") from None


async def mesh_identity(store: Store, service: str, instance: str, mtls: str,
                        trust_domain: str | None, stack: contextlib.AsyncExitStack) -> Any:
    """``service``'s ``MeshTLS`` from the mesh CA through ``store`` (renewed until ``stack``
    closes), or None when ``mtls`` is off; a bad ``mtls`` is a ConfigError naming --mtls."""
    from shoal.mesh.security.mode import MtlsMode

    if not MtlsMode.parse(mtls, where="--mtls").uses_tls:
        return None
    from shoal.mesh.security.identity import request_identity
    from shoal.mesh.security.spiffe import DEFAULT_TRUST_DOMAIN
    from shoal.mesh.security.tls import MeshTLS, rotate_forever

    tls = MeshTLS(await request_identity(store, service, instance,
                                         trust_domain=trust_domain or DEFAULT_TRUST_DOMAIN))
    renewal = asyncio.get_running_loop().create_task(rotate_forever(tls, store, instance))

    async def stop_renewal() -> None:
        renewal.cancel()
        await asyncio.gather(renewal, return_exceptions=True)

    stack.push_async_callback(stop_renewal)
    return tls


@contextlib.asynccontextmanager
async def gateway_app(config: GatewayConfig, *, store: str, broker: str | None,
                      mtls: str = "off", trust_domain: str | None = None,
                      ) -> AsyncIterator[RunningGateway]:
    """The gateway's parts, opened and closed together: Store, bus, endpoint cache, the
    ``Gateway`` and its route watcher. Each worker process enters its own (the shape
    ``shoal.gateway.workers.run_workers`` takes, via ``.handle``). ``mtls``: see the module
    docstring."""
    async with contextlib.AsyncExitStack() as stack:
        the_store = await open_store(store)
        stack.push_async_callback(the_store.close)
        tls = None
        if mtls != "off":  # only then the control plane's names (and cryptography) load
            from shoal.control.plane import GATEWAY_IDENTITY

            tls = await mesh_identity(the_store, GATEWAY_IDENTITY, f"gateway-{os.getpid()}",
                                      mtls, trust_domain, stack)
        bus = None
        if broker is not None:
            try:
                bus = await EventBus.connect(broker, store=the_store)
            except (OSError, sqlite3.Error) as exc:
                raise ConfigError(f"cannot open broker {broker!r}: {exc}") from None
            stack.push_async_callback(bus.close)
        cache = await EndpointCache(the_store).start()
        stack.push_async_callback(cache.close)
        gateway = Gateway(config.routes.table, cache, bus, services=config.services,
                          ejections=EjectionReporter(the_store), tls=tls)
        stack.push_async_callback(gateway.aclose)
        watcher = None
        if config.routes_key is not None:
            watcher = await RouteWatcher(gateway, the_store, config.routes_key,
                                         config.routes).start()
            stack.push_async_callback(watcher.close)
        yield RunningGateway(gateway, watcher)


async def serve_gateway(config: GatewayConfig, *, store: str, broker: str | None,
                        stop: asyncio.Event, on_ready: Callable[[Ready], None],
                        reuse_port: bool = False, mtls: str = "off",
                        trust_domain: str | None = None) -> None:
    """Run the gateway in this process until ``stop`` is set (see the module docstring)."""
    async with gateway_app(config, store=store, broker=broker, mtls=mtls,
                           trust_domain=trust_domain) as running:
        server = HttpServer(running.gateway.handle, limits=config.limits)
        try:
            bound = await listen(server, config.listen, reuse_port=reuse_port)
            for overlap in config.routes.table.overlaps():
                log.warning("gateway: %s", overlap)
            watcher = running.watcher
            on_ready(Ready(bound, len(running.gateway.routes), config.routes_key,
                           watcher.revision if watcher else 0))
            await stop.wait()
            log.info("gateway: stopping: finishing in-flight requests (up to %gs)",
                     config.drain)
        finally:
            await server.shutdown(grace=config.drain)
