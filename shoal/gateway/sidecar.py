"""The sidecar: brings an app that is not written with Shoal (any language, any HTTP/1.1
server) into the mesh. ``serve_sidecar(config, store=..., stop=...)``:

* **Proxies** inbound traffic to the app with the gateway's own machinery: an
  ``HttpServer`` running a ``Gateway`` with one catch-all route to the service, whose only
  endpoint is the app (``StaticEndpoint``); so limits, smuggling refusals, forwarding
  headers, timeouts, retries and the circuit breaker are the gateway's, unchanged.
* **Registers** the service instance in the registry at the sidecar's address (callers
  reach the app through it), with the lease and heartbeats of ``Registration``.
* **Health-checks the app** actively (``GET --health-path``) on ``ActiveCheckSchedule``
  and feeds ``InstanceHealth``, the registry's own state machine; the instance's declared
  state follows it: STARTING until a check passed, SERVING, UNHEALTHY after
  ``unhealthy_threshold`` failures (balancers then skip it: traffic only in panic), and
  SERVING again after ``healthy_threshold`` passes. The first check runs at once.
* **Serves mutual TLS toward a strict mesh** with ``mtls="strict"`` (``shoal sidecar --mtls
  strict``): it gets the instance's identity ``spiffe://<trust domain>/svc/<service>``
  from the mesh CA through the Store, as an instance does (the key is made here), renews
  it, and accepts only callers with a certificate of the trust bundle; the hop to the
  local app stays plaintext. (``permissive`` is not offered yet.)
* **Stops gracefully** when ``stop`` is set (SIGTERM): declares DRAINING (callers stop
  picking it), waits ``drain`` for that to reach them, deregisters, then lets in-flight
  requests finish (up to ``drain`` again) and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from shoal.errors import ConfigError, ShoalError
from shoal.gateway.config import ListenAddress
from shoal.gateway.proxy import Gateway
from shoal.gateway.routes import RouteTable
from shoal.gateway.running import listen, mesh_identity, open_store
from shoal.gateway.server import HttpServer, ServerLimits
from shoal.mesh.endpoint import Endpoint
from shoal.mesh.health import ActiveCheckSchedule, HealthCheckConfig, HealthState, InstanceHealth
from shoal.mesh.http1 import ConnectionPool
from shoal.mesh.registry import (
    DEFAULT_TTL,
    Instance,
    Registration,
    Registry,
    check_address,
    check_instance_id,
    check_service_name,
    http_check,
)

log = logging.getLogger("shoal.sidecar")

_WILDCARDS = (None, "", "0.0.0.0", "::")


class StaticEndpoint:
    """The endpoint source of a sidecar's ``Gateway``: the app, always in the pool (its
    health decides whether callers send here at all, through the registry)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._pool = [endpoint]
        self._none: list[Endpoint] = []

    def endpoints(self, service: str) -> Sequence[Endpoint]:
        """The app for its own service; nothing for any other."""
        return self._pool if service == self.endpoint.service else self._none

    def is_healthy(self, endpoint: Endpoint) -> bool:
        """Always: the sidecar proxies whatever the app says."""
        return True


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """What one sidecar serves, where, and how it checks the app."""

    service: str
    listen: ListenAddress
    app: str  # "host:port" or a unix socket path
    instance_id: str
    advertise: str | None = None  # the address registered (default: the bound one)
    labels: Mapping[str, str] = field(default_factory=dict)
    health: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    ttl: float = DEFAULT_TTL
    drain: float = 2.0
    limits: ServerLimits = field(default_factory=ServerLimits)
    mtls: str = "off"  # "strict": serve mutual TLS with the instance's mesh identity
    trust_domain: str | None = None  # of that identity (None: the default)

    def __post_init__(self) -> None:
        from shoal.mesh.security.mode import MtlsMode

        if MtlsMode.parse(self.mtls, where="--mtls") is MtlsMode.PERMISSIVE:
            raise ConfigError("--mtls permissive: a sidecar serves strict or off for now")
        check_service_name(self.service)
        check_instance_id(self.instance_id)
        check_address(self.app, what="--app")
        if self.advertise is not None:
            check_address(self.advertise, what="--advertise")
        elif self.listen.path is None and self.listen.host in _WILDCARDS:
            raise ConfigError(f"--listen {self.listen}: listening on every interface, so "
                              "there is no one address to register; give --advertise "
                              "HOST:PORT (how callers reach this sidecar)")


@dataclass(slots=True)
class AppHealth:
    """The app's health as the sidecar declares it: ``InstanceHealth`` fed with check
    results; ``observe`` returns the state to declare when it changed (pure, no I/O)."""

    health: InstanceHealth

    @property
    def state(self) -> HealthState:
        """STARTING, SERVING or UNHEALTHY."""
        return self.health.state

    def observe(self, ok: bool, now: float, detail: str) -> tuple[HealthState, str] | None:
        """One check result; (new state, why) if the declared state must change."""
        transitions = self.health.on_check(ok, now, detail)
        if not transitions:
            return None
        return transitions[-1].to_state, transitions[-1].reason


@dataclass(frozen=True, slots=True)
class SidecarReady:
    """What a started sidecar reports."""

    listen: list[str]
    address: str  # as registered
    instance_id: str


def _advertised(config: SidecarConfig, bound: list[str]) -> str:
    if config.advertise is not None:
        return config.advertise
    first = bound[0]
    if first.startswith("unix:"):
        return first
    port = first.rsplit(":", 1)[1]
    host = config.listen.host or "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_sidecar(config: SidecarConfig, *, store: str, stop: asyncio.Event,
                        on_ready: Callable[[SidecarReady], None]) -> None:
    """Run the sidecar until ``stop`` is set (see the module docstring)."""
    app = Endpoint(config.instance_id, config.service, config.app)
    gateway = Gateway(RouteTable.from_config([{"name": "app", "service": config.service}]),
                      StaticEndpoint(app))  # type: ignore[arg-type]
    async with contextlib.AsyncExitStack() as stack:
        the_store = await open_store(store)
        stack.push_async_callback(the_store.close)
        tls = await mesh_identity(the_store, config.service, config.instance_id, config.mtls,
                                  config.trust_domain, stack)
        server = HttpServer(gateway.handle, limits=config.limits,
                            ssl=None if tls is None else tls.server_context)
        stack.push_async_callback(gateway.aclose)
        stack.push_async_callback(server.shutdown, config.drain)
        bound = await listen(server, (config.listen,))
        address = _advertised(config, bound)
        try:
            registration = await Registry(the_store).register(Instance(
                id=config.instance_id, service=config.service, address=address,
                labels=dict(config.labels), state=HealthState.STARTING,
                reason="waiting for the app's first passing health check"), ttl=config.ttl)
        except ShoalError as exc:
            raise ConfigError(f"cannot register {config.service}/{config.instance_id} at "
                              f"{address}: {exc}") from None
        checks = asyncio.get_running_loop().create_task(
            _check_app(config, registration), name=f"shoal-sidecar-checks {config.service}")
        try:
            log.info("sidecar: %s/%s registered at %s, proxying to %s", config.service,
                     config.instance_id, address, config.app)
            on_ready(SidecarReady(bound, address, config.instance_id))
            await stop.wait()
        finally:
            checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checks
            log.info("sidecar: draining: deregistering in %gs, then finishing in-flight "
                     "requests", config.drain)
            try:
                await registration.deregister(grace=config.drain,
                                              reason="sidecar stopping (SIGTERM)")
            except ShoalError as exc:
                log.warning("sidecar: deregistering failed (the lease expires in %gs): %s",
                            config.ttl, exc)


async def _check_app(config: SidecarConfig, registration: Registration) -> None:
    """Active checks of the app, for as long as the sidecar runs; the declared state
    follows ``AppHealth``."""
    health = AppHealth(InstanceHealth(config.instance_id, config.health, now=time.time()))
    schedule = ActiveCheckSchedule.from_config(config.health)
    timeout: float = config.health.timeout  # type: ignore[assignment]
    pool = ConnectionPool(config.app, max_connections=1, max_idle=1, connect_timeout=timeout)
    clock = asyncio.get_running_loop().time
    try:
        while True:
            ok, detail = await http_check(pool, config.health.path, timeout)
            change = health.observe(ok, time.time(), detail)
            if change is not None:
                state, reason = change
                log.log(logging.INFO if state is HealthState.SERVING else logging.WARNING,
                        "sidecar: app %s is %s: %s", config.app, state.value, reason)
                try:
                    await registration.set_state(state, reason)
                except ShoalError as exc:
                    log.warning("sidecar: declaring %s failed: %s", state.value, exc)
            await asyncio.sleep(max(0.0, schedule.next_check_at(
                clock(), healthy=health.state is HealthState.SERVING) - clock()))
    finally:
        await pool.aclose()
