"""The control plane of ``shoal up``: instances, health, autoscaling, gateway, admin API.

``ControlPlane(plan)`` runs, in this process: the ``Supervisor`` (every instance its own
process), the ``HealthMonitor`` (active checks feeding the registry's state machine,
transitions on ``shoal.instances``), the ``AutoscalerLoop``, the gateway (``HttpServer``
with the ``Gateway`` handler over the monitor's endpoint cache, built from the manifest's
``gateway:`` section as ``shoal gateway`` builds it: listen addresses, limits, drain,
services' policies, routes, and the routes Store key followed by a ``RouteWatcher``) and
the admin API
(``admin_app`` served by uvicorn). ``start`` returns when every instance said it is
ready and is registered; ``close`` stops taking requests at the gateway, then stops the
instances (SIGTERM: each drains and commits), then the rest. Events an instance had not
acknowledged stay in the log for the next run: nothing acknowledged is lost.

**Zero trust** (``Plan.mtls`` strict or permissive, the manifest's default being strict):
the plane runs the mesh's CA (``CertificateSigner`` on the roots in ``<state_dir>/ca/``),
so instances get their certificates through the Store as they start; the gateway gets its
own identity (``shoal-gateway``: policies name it in ``from:``) and calls services over
mTLS, and the plane's health checks and dashboard scrapes use the plane's identity
(``shoal-control``). Both renew at two thirds of their life, as instances do.

Why the health checker gets an identity rather than a plain health port beside each
instance: Istio's pain under STRICT was probes sent by something *outside* the mesh (the
kubelet), fixed by rewriting them to a plaintext agent port - one more port per workload,
open to anything on the host. Here the checker is ours, so it can hold a certificate like
any workload: health checks keep working under strict with nothing to configure, no
plaintext listener exists, and what a check sees is exactly the port callers use (a
broken TLS setup fails the check instead of hiding behind a healthy side port).
``/healthz`` and ``/readyz`` are answered before authorization policies apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from shoal.control.autoscaler import ScalePolicy
from shoal.control.cleanup import forget_load, release_group_memberships
from shoal.control.forkserver import (
    ForkServer,
    Preload,
    instance_environment,
    startup_modules,
)
from shoal.control.restart import RestartPolicy
from shoal.control.supervisor import Launch, Output, SupervisedInstance, Supervisor, _print_line
from shoal.control.timeline import mark
from shoal.errors import ConfigError
from shoal.events.bus import EventBus
from shoal.gateway.config import GatewayConfig, ListenAddress
from shoal.mesh.health import HealthCheckConfig
from shoal.mesh.registry import HealthMonitor, InstanceChange, check_address
from shoal.mesh.security.mode import MtlsMode
from shoal.mesh.security.spiffe import DEFAULT_TRUST_DOMAIN
from shoal.observability.metrics import Metrics, enable_metrics
from shoal.observability.tracing import enable_tracing_from_env

if TYPE_CHECKING:  # the gateway, admin API, dashboard and TLS are imported as they start,
    # after the instances are forked: their start overlaps these imports (~0.2 s of CPU)
    from shoal.control.dashboard import SnapshotHub
    from shoal.control.scaling import AutoscalerLoop
    from shoal.gateway.proxy import Gateway
    from shoal.gateway.reload import RouteWatcher
    from shoal.gateway.server import HttpServer
    from shoal.mesh.security.tls import MeshTLS
    from shoal.observability.sampling import Sampler

CONTROL_SOURCE = "/shoal/control"
GATEWAY_IDENTITY = "shoal-gateway"
"""The service name in the gateway's SPIFFE id (``spiffe://<domain>/svc/shoal-gateway``)."""
CONTROL_IDENTITY = "shoal-control"
"""The service name in the control plane's SPIFFE id (health checks, scrapes)."""


@dataclass(frozen=True, slots=True)
class ServicePlan:
    """One service as the control plane runs it."""

    name: str
    app: str  # module:attribute
    replicas: int = 1
    autoscale: ScalePolicy | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    traffic: Mapping[str, Any] = field(default_factory=dict)  # the gateway's policy for it
    guarded: bool = False  # has authorization or topic policies (its instances read the manifest)


@dataclass(frozen=True, slots=True)
class Plan:
    """What ``shoal up`` runs (built from a manifest by ``shoal.control.plan``)."""

    broker: str
    store: str
    services: Mapping[str, ServicePlan]
    base_dir: Path = Path(".")  # instances run here (their apps import from it)
    gateway: GatewayConfig | None = field(default_factory=GatewayConfig)  # None: no gateway
    admin_listen: str = "127.0.0.1:8081"
    health: HealthCheckConfig = field(
        default_factory=lambda: HealthCheckConfig(interval="2s", timeout="1s",
                                                  jitter="200ms", unhealthy_threshold=2))
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    autoscale_interval: float = 1.0
    grace: float = 10.0  # SIGTERM -> SIGKILL
    manifest_path: Path | None = None  # read by instances of guarded services
    mtls: str = "off"  # strict | permissive | off (a manifest's default is strict)
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    state_dir: Path = Path(".shoal")  # the CA's roots are kept in <state_dir>/ca/


def instance_argv(plan: Plan, service: ServicePlan, instance_id: str, port: int,
                  python: str = sys.executable) -> list[str]:
    """The command that runs one instance (the Service SDK's instance runner)."""
    argv = [python, "-m", "shoal.instance", "--app", service.app,
            "--listen", f"127.0.0.1:{port}", "--broker", plan.broker, "--store", plan.store,
            "--instance-id", instance_id, "--mtls", plan.mtls]
    if plan.trust_domain != DEFAULT_TRUST_DOMAIN:
        argv += ["--trust-domain", plan.trust_domain]
    for key, value in service.labels.items():
        argv += ["--label", f"{key}={value}"]
    # Each service's policy for our calls, as JSON: no manifest parsing in every instance.
    policies = {name: dict(s.traffic) for name, s in plan.services.items() if s.traffic}
    if policies:
        argv += ["--policies", json.dumps(policies, separators=(",", ":"))]
    if service.guarded and plan.manifest_path is not None:  # its policies: and topics:
        argv += ["--manifest", str(plan.manifest_path)]
    return argv


def _listen_socket(address: str, what: str) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port)."""
    host, sep, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if not sep or not port.isdigit() or int(port) > 65535 or not host:
        raise ConfigError(f"{what} {address!r}: expected 'host:port' with a port 0-65535 "
                          "(0: any free port)")
    if port != "0":
        check_address(address, what=what)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted ones
    try:
        sock.bind((host, int(port)))
    except (OSError, UnicodeError) as e:
        sock.close()
        why = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"{what} {address}: cannot listen there: {why}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def _admin_server(config: Any) -> Any:
    """A uvicorn server without its own signal handling: ``shoal up`` owns SIGINT and
    SIGTERM."""
    import uvicorn

    class AdminServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    return AdminServer(config)


class ControlPlane:
    """Everything ``shoal up`` runs in its own process, around the instance processes."""

    def __init__(self, plan: Plan, *, output: Output | None = _print_line,
                 launch: Launch | None = None, forkserver: ForkServer | None = None) -> None:
        """``launch``: how to start an instance (default: ``python -m shoal.instance``,
        forked from a ``ForkServer``); ``forkserver``: one already launched (with
        ``preload_later``, as ``shoal up`` does before its own imports), used if it forks
        into this plan's environment, else closed."""
        self.plan = plan
        self.output = output
        self.started_at = time.monotonic()
        self.ready_after: float | None = None
        self.gateway_url: str | None = None
        self.admin_url: str | None = None
        self.bus: EventBus | None = None
        self.monitor: HealthMonitor | None = None
        self.autoscaler: AutoscalerLoop | None = None
        env = instance_environment(plan.base_dir)

        def default_launch(service: str, instance_id: str, port: int) -> list[str]:
            return instance_argv(plan, plan.services[service], instance_id, port)

        # Instances fork from one pre-imported process (shoal.control.forkserver), unless
        # a custom launch is given or SHOAL_FORKSERVER=0.
        forks = launch is None and os.environ.get("SHOAL_FORKSERVER", "1") != "0"
        self._spare_forkserver: ForkServer | None = None
        if forks and (forkserver is None or not forkserver.matches(env, str(plan.base_dir))):
            self._spare_forkserver = forkserver
            forkserver = ForkServer(env, str(plan.base_dir), preload_later=True)
        elif not forks:
            self._spare_forkserver, forkserver = forkserver, None
        if forkserver is not None:
            forkserver.preload(preload_for(plan))
        self.supervisor = Supervisor(launch or default_launch, policy=plan.restart,
                                     output=output, grace=plan.grace, env=env,
                                     cwd=str(plan.base_dir),
                                     env_for=lambda name: plan.services[name].env,
                                     forkserver=forkserver)
        self._gateway_server: HttpServer | None = None
        self._gateway: Gateway | None = None
        self._route_watcher: RouteWatcher | None = None
        self._admin: Any = None
        self._admin_task: asyncio.Task[None] | None = None
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._sampler: Sampler | None = None
        self._dashboard: SnapshotHub | None = None
        self.tls: MeshTLS | None = None  # the plane's identity (health checks, scrapes)
        self.gateway_tls: MeshTLS | None = None  # the gateway's
        self._security: list[asyncio.Task[None]] = []  # signer, rotations

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, ready_timeout: float = 60.0) -> None:
        """Start everything; return when every instance is ready and registered."""
        plan = self.plan
        if self._spare_forkserver is not None:  # launched for another environment
            await self._spare_forkserver.close()
            self._spare_forkserver = None
        metrics = enable_metrics()  # before the bus, gateway and clients take their series
        enable_tracing_from_env("shoal-control")
        try:
            admin_sock = _listen_socket(plan.admin_listen, "admin.listen")
            self._sockets.append(admin_sock)
            gateway_socks = []
            for address in plan.gateway.listen if plan.gateway is not None else ():
                if address.path is None:  # unix sockets: bound by the server itself
                    gateway_socks.append(_listen_socket(_host_port(address),
                                                        "gateway.listen"))
                    self._sockets.append(gateway_socks[-1])
            # Instances first: their start (mostly imports) overlaps the plane's own.
            started: list[SupervisedInstance] = []
            for name, service in plan.services.items():
                started += await self.supervisor.scale(name, service.replicas)
            await self._spawned(started)  # the forks go out before the imports below
            mark("plane: instances spawned")
            self.bus = await EventBus.connect(plan.broker, store=plan.store,
                                              source=CONTROL_SOURCE)
            mark("plane: bus and store open")
            if MtlsMode.parse(plan.mtls, where="Plan.mtls").uses_tls:
                await self._start_security()
                mark("plane: CA and identities ready")
            self.monitor = await HealthMonitor(
                self.bus.store, self.bus, config=plan.health, tls=self.tls).start()
            mark("plane: health monitor started")
            self.supervisor.exit_hooks.append(self._release_dead)
            if plan.gateway is not None:
                await self._start_gateway(plan.gateway, gateway_socks)
                mark("plane: gateway serving")
            from shoal.control.scaling import AutoscalerLoop
            from shoal.observability.sampling import Sampler

            self._sampler = Sampler(metrics, bus=self.bus, interval=5.0,
                                    instances=self.monitor.cache.instances).start()
            await self._start_admin(admin_sock, metrics)
            policies = {n: s.autoscale for n, s in plan.services.items() if s.autoscale}
            self.autoscaler = AutoscalerLoop(
                self.bus, policies, replicas=self.supervisor.replicas, scale=self.scale_to,
                interval=plan.autoscale_interval).start()
            self.monitor.cache.on_instance(self._wake_autoscaler)
            mark("plane: admin and autoscaler started")
            await self.supervisor.wait_ready(ready_timeout)
            mark("plane: every instance said ready")
            await self._wait_registered(ready_timeout)
            mark("plane: every instance registered")
            self.ready_after = time.monotonic() - self.started_at
        except BaseException:
            await self.close()
            raise

    async def _spawned(self, instances: list[SupervisedInstance], timeout: float = 5.0
                       ) -> None:
        """Wait (at most ``timeout`` seconds) until each of ``instances`` was spawned or
        could not be."""
        pending = {inst.id for inst in instances if inst.process is None}
        done = asyncio.Event()

        def on_change(inst: SupervisedInstance, what: str) -> None:
            if what in ("spawned", "exited", "failed"):
                pending.discard(inst.id)
            if not pending:
                done.set()

        if not pending:
            return
        self.supervisor.listeners.append(on_change)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await done.wait()
        finally:
            self.supervisor.listeners.remove(on_change)

    async def _start_security(self) -> None:
        """The CA's signer, then the plane's and the gateway's identities (renewed)."""
        from shoal.control.ca import CAFiles, CertificateSigner
        from shoal.mesh.security.identity import request_identity
        from shoal.mesh.security.tls import MeshTLS, rotate_forever

        assert self.bus is not None
        store, plan, loop = self.bus.store, self.plan, asyncio.get_running_loop()
        files = CAFiles(plan.state_dir)
        ca = files.load_or_create(trust_domain=plan.trust_domain)
        if ca.trust_domain != plan.trust_domain:
            raise ConfigError(f"security.trust_domain is {plan.trust_domain!r}, but the CA in "
                              f"{files.directory} is for {ca.trust_domain!r}: use that trust "
                              "domain, or another state directory")
        signer = CertificateSigner.from_files(store, files, trust_domain=plan.trust_domain)
        self._security.append(loop.create_task(signer.run(), name="shoal-ca-signer"))
        me = f"control-{os.getpid()}"
        self.tls, self.gateway_tls = [MeshTLS(identity) for identity in await asyncio.gather(
            request_identity(store, CONTROL_IDENTITY, me, trust_domain=plan.trust_domain),
            request_identity(store, GATEWAY_IDENTITY, me, trust_domain=plan.trust_domain))]
        for tls in (self.tls, self.gateway_tls):
            self._security.append(loop.create_task(rotate_forever(tls, store, me)))

    async def _start_gateway(self, config: GatewayConfig, socks: list[socket.socket]
                             ) -> None:
        from shoal.gateway.proxy import Gateway
        from shoal.gateway.reload import RouteWatcher
        from shoal.gateway.server import HttpServer
        from shoal.mesh.ejections import EjectionReporter
        from shoal.observability.http import observe_gateway

        assert self.monitor is not None and self.bus is not None
        self._gateway = Gateway(config.routes.table, self.monitor.cache, self.bus,
                                services=gateway_policies(self.plan.services, config),
                                ejections=EjectionReporter(self.bus.store),
                                tls=self.gateway_tls)
        if config.routes_key is not None:
            self._route_watcher = await RouteWatcher(
                self._gateway, self.bus.store, config.routes_key, config.routes).start()
        self._gateway_server = HttpServer(observe_gateway(self._gateway), limits=config.limits)
        for sock in socks:
            await self._gateway_server.start(sock=sock)
        for address in config.listen:
            if address.path is not None:
                await self._gateway_server.start(path=address.path)
        self.gateway_url = _url(socks[0]) if socks else str(config.listen[0])

    async def _start_admin(self, sock: socket.socket, metrics: Metrics) -> None:
        import uvicorn
        from starlette.routing import Route

        from shoal.control.admin import admin_app
        from shoal.control.dashboard import ControlSource, mount_dashboard
        from shoal.observability.http import metrics_asgi

        app = admin_app(self)  # + the dashboard, its stream, and /metrics
        source = ControlSource(self, bus=self.bus, metrics=metrics)
        if source.scraper is not None:
            source.scraper.tls = self.tls  # instances' /metrics over mTLS when it is on
        self._dashboard = mount_dashboard(app, source)
        app.router.routes.append(Route("/metrics", metrics_asgi(metrics)))
        config = uvicorn.Config(app, log_level="warning", lifespan="off",
                                access_log=False)
        self._admin = _admin_server(config)
        self._admin_task = asyncio.get_running_loop().create_task(
            self._admin.serve(sockets=[sock]), name="shoal-admin")
        while not self._admin.started:
            if self._admin_task.done():
                self._admin_task.result()
                raise ConfigError("admin API: the server stopped while starting")
            await asyncio.sleep(0.005)
        self.admin_url = _url(sock)

    async def _wait_registered(self, timeout: float) -> None:
        assert self.monitor is not None
        cache = self.monitor.cache
        for name in self.plan.services:
            wanted = {i.id for i in self.supervisor.of(name)}
            await cache.wait_for(
                name, lambda endpoints, w=wanted: w <= {e.instance_id for e in endpoints},
                timeout=timeout)

    async def _release_dead(self, inst: Any, pid: int) -> None:
        """A supervised process died: hand its partitions over now (``shoal.control.cleanup``)."""
        if self.bus is None:
            return
        released = await release_group_memberships(self.bus.store, pid)
        await forget_load(self.bus.store, inst.service, inst.id)
        if released and self.output is not None:
            self.output(f"[{inst.id}] supervisor: released {released} consumer-group key(s) "
                        f"of dead pid {pid}")

    def _wake_autoscaler(self, change: InstanceChange) -> None:
        """An instance changed state (not a mere heartbeat): evaluate now."""
        before, after = change.before, change.after
        moved = before is None or after is None or before.state is not after.state
        if moved and self.autoscaler is not None:
            self.autoscaler.wake.set()

    async def close(self) -> None:
        """Stop taking requests, stop the instances (they drain), then the rest."""
        if self._closed:
            return
        self._closed = True
        if self._spare_forkserver is not None:  # built, never started
            await self._spare_forkserver.close()
        if self._gateway_server is not None:
            drain = self.plan.gateway.drain if self.plan.gateway is not None else 5.0
            await self._gateway_server.shutdown(grace=drain)
        if self._route_watcher is not None:
            await self._route_watcher.close()
        if self._gateway is not None:
            await self._gateway.aclose()
        if self.autoscaler is not None:
            await self.autoscaler.close()
        if self._sampler is not None:
            await self._sampler.aclose()
        if self._dashboard is not None:
            await self._dashboard.close()  # live dashboard streams end: admin can stop
        await self.supervisor.close()
        if self._admin is not None and self._admin_task is not None:
            self._admin.should_exit = True
            with contextlib.suppress(Exception):
                await self._admin_task
        if self.monitor is not None:
            await self.monitor.close()
        for task in self._security:
            task.cancel()
        await asyncio.gather(*self._security, return_exceptions=True)
        if self.bus is not None:
            await self.bus.close()
        for sock in self._sockets:
            sock.close()

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- what the admin API shows --------------------------------------------------------------
    async def scale_to(self, service: str, replicas: int) -> None:
        """Run ``replicas`` instances of ``service``."""
        if service not in self.plan.services:
            from shoal.control.admin import UnknownService

            known = ", ".join(sorted(self.plan.services)) or "none"
            raise UnknownService(f"service {service!r}: not in the manifest (services: {known})")
        await self.supervisor.scale(service, replicas)

    async def scale(self, service: str, replicas: int) -> dict[str, Any]:
        """``POST /api/services/{name}/scale``."""
        before = self.supervisor.replicas(service) if service in self.plan.services else 0
        await self.scale_to(service, replicas)
        return {"service": service, "from": before, "replicas": replicas}

    async def services(self) -> list[dict[str, Any]]:
        """``GET /api/services``."""
        states: dict[str, dict[str, int]] = {}
        for inst in await self.instances():
            counts = states.setdefault(inst["service"], {})
            counts[inst["state"]] = counts.get(inst["state"], 0) + 1
        out = []
        for name, service in self.plan.services.items():
            scale = service.autoscale
            out.append({
                "name": name, "app": service.app,
                "replicas": self.supervisor.replicas(name),
                "states": states.get(name, {}),
                "autoscale": None if scale is None else {
                    "min": scale.min, "max": scale.max,
                    "target_inflight": scale.target_inflight, "target_lag": scale.target_lag,
                    "cooldown": scale.cooldown},
            })
        return out

    async def instances(self) -> list[dict[str, Any]]:
        """``GET /api/instances``: process state (supervisor) and health state (registry);
        instances registered by others (started on another host) have process "external"."""
        cache = self.monitor.cache if self.monitor is not None else None
        out = []
        for name in self.plan.services:
            for inst in self.supervisor.of(name):
                view = inst.describe()
                record = cache.get(name, inst.id) if cache is not None else None
                view["state"] = record.state.value if record is not None else "unregistered"
                view["health_reason"] = record.reason if record is not None else ""
                out.append(view)
            out += _external(cache, name, {inst.id for inst in self.supervisor.of(name)})
        return out

    def routes(self) -> list[dict[str, Any]]:
        """``GET /api/routes``: the gateway's routes in service (the manifest's, or the
        routes Store key's once set), as configured, in match order."""
        if self.plan.gateway is None:
            return []
        watcher = self._route_watcher
        loaded = watcher.current if watcher is not None else self.plan.gateway.routes
        out = []
        for i, (route, config) in enumerate(zip(loaded.table.routes, loaded.fingerprints,
                                                strict=True)):
            try:
                item = msgspec.json.decode(config)
            except msgspec.DecodeError:
                item = {"name": route.name}
            out.append({"index": i, **(item if isinstance(item, dict) else {})})
        return out

    async def topics(self) -> list[dict[str, Any]]:
        """``GET /api/topics``: partitions, events, lag per group, dead letters."""
        assert self.bus is not None
        infos = await self.bus.topics()
        sizes = {info.spec.name: info.events for info in infos}
        out = []
        for info in infos:
            name = info.spec.name
            if name.endswith(".dlq"):
                continue
            lag = {group: sum((await self.bus.lag(name, group)).values())
                   for group in await self.bus.groups(name)}
            out.append({"name": name, "partitions": info.spec.partitions,
                        "events": info.events, "size_bytes": info.size_bytes, "lag": lag,
                        "dead_letters": sizes.get(f"{name}.dlq", 0)})
        return out


def gateway_policies(services: Mapping[str, ServicePlan], config: GatewayConfig
                     ) -> dict[str, dict[str, Any]]:
    """Each service's traffic policy at the gateway: the service's own (``services.X.policy``)
    with the gateway section's ``services.X`` over it, key by key."""
    out = {name: dict(service.traffic) for name, service in services.items()}
    for name, policy in config.services.items():
        out[name] = {**out.get(name, {}), **policy}
    return out


def _host_port(address: ListenAddress) -> str:
    host = address.host or "0.0.0.0"
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


def _external(cache: Any, service: str, supervised: set[str]) -> list[dict[str, Any]]:
    """The registered instances of ``service`` this plane does not run, as admin views."""
    if cache is None:
        return []
    return [{"id": i.id, "service": service, "address": i.address, "pid": None,
             "process": "external", "restarts": 0, "reason": "", "last_output": [],
             "state": i.state.value, "health_reason": i.reason}
            for i in cache.instances(service) if i.id not in supervised]


def preload_for(plan: Plan) -> Preload:
    """What the fork server imports for ``plan``'s instances: their start's modules, and
    the apps' modules unless ``SHOAL_PRELOAD_APPS=0``. An app a service with its own
    ``env:`` runs is not preloaded (its import must see that environment)."""
    modules = startup_modules(plan.broker, plan.store, plan.mtls)
    if any(s.guarded for s in plan.services.values()):  # their instances read the manifest
        modules.append("shoal.config")
    if os.environ.get("SHOAL_PRELOAD_APPS", "1") == "0":
        return Preload(tuple(modules))
    apps = {s.app.partition(":")[0] for s in plan.services.values()}
    apps -= {s.app.partition(":")[0] for s in plan.services.values() if s.env}
    return Preload(tuple(modules), tuple(sorted(apps)))

