"""`Service`: what a developer writes. An ASGI app with event handlers, that joins the mesh.

::

    svc = shoal.Service("billing", version="2")

    @svc.post("/charge")
    async def charge(request):
        order = await request.json()
        await svc.publish("payments", order, key=order["customer"], type="payment.settled")
        return JSONResponse({"ok": True})

    @svc.subscribe("orders")                   # group "billing": instances share the events
    async def on_order(event):
        resp = await svc.call("payments", "POST", "/pay", json=event.data)

Routes use Starlette's ``Request``/``Response`` and router; any ASGI app (Starlette,
FastAPI) can be mounted with ``svc.mount``; their lifespan startup runs in ``start`` and
their shutdown in ``stop``. ``svc.start(...)`` (done for you by
``python -m shoal.instance``) connects the bus and the mesh client, serves HTTP, registers
the instance with heartbeats, joins every subscription's group, and declares the instance
SERVING; ``/readyz`` turns 200 only then. ``svc.stop()`` drains: DRAINING in the registry
first (callers' caches drop it while it keeps serving for a short grace), then the
listener closes and no new events are taken, in-flight requests and events finish,
offsets are committed, and the instance leaves the registry. Sync event handlers run in
threads and publish with ``svc.publish_sync``.

**Zero trust** (``start(mtls=..., authorization=..., topic_policy=...)``, given by
``python -m shoal.instance`` from the manifest's ``security:`` and the service's
``policies:`` / ``topics:``): under ``strict`` or ``permissive`` the instance makes its key,
gets its SPIFFE certificate from the control plane's CA through the Store before it
serves, renews it at two thirds of its life (``rotate_forever``), serves HTTP over mutual
TLS (``strict`` refuses plaintext and callers without a certificate of the trust bundle;
``permissive`` takes both on one port) and calls other services over mTLS. Each request
is checked against the service's authorization policy with the caller's verified
identity (a denial answers 403 naming the rule, counted in ``shoal_authz_denials_total``);
``/healthz``, ``/readyz`` and ``/metrics`` are not (they carry no application data, and the
control plane's checks and scrapes must work whatever the policy: under ``strict`` they
still need a certificate of the mesh). Publishes
and subscriptions pass the topic policy (``Forbidden``, nothing appended).

The HTTP server is uvicorn (uvloop + httptools): it speaks ASGI natively, including
streaming, keep-alive, and graceful shutdown that waits for in-flight requests. The
project's own ``HttpServer`` is a raw request/response core; adapting it to ASGI would be
a second ASGI server to maintain, for a gain that matters on the gateway's path (which
uses it) more than behind a Python handler. ``bench/service.py`` measures what the SDK
adds over the same app as bare Starlette on uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import BaseRoute, Mount, Route, Router

from shoal.context import current_traceparent
from shoal.errors import ConfigError, ShoalError
from shoal.events.brokers.connect import DEFAULT_BROKER_URL
from shoal.events.bus import EventBus, PublishAck, default_store_for
from shoal.events.consumer import Subscription
from shoal.events.event import Event
from shoal.events.partitioning import check_group_name, check_topic_name
from shoal.events.retry import RetryPolicy
from shoal.lifespan import Lifespan
from shoal.load import Load
from shoal.mesh.client import MeshClient
from shoal.mesh.health import HealthState
from shoal.mesh.http1 import Response as MeshResponse
from shoal.mesh.registry import (
    Instance,
    Registration,
    Registry,
    check_address,
    check_instance_id,
    check_service_name,
)
from shoal.mesh.resilience import TrafficPolicy
from shoal.mesh.security.authz import AuthorizationPolicy
from shoal.mesh.security.mode import MtlsMode
from shoal.mesh.security.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from shoal.mesh.security.topics import TopicPolicy
from shoal.observability import metrics as _metrics
from shoal.observability import tracing as _tracing
from shoal.store.base import Store
from shoal.store.connect import connect_store
from shoal.units import parse_duration, parse_size

if TYPE_CHECKING:  # loaded when mTLS is on: with it off, cryptography is never imported
    from shoal.mesh.security.tls import MeshTLS, PermissiveListener

log = logging.getLogger("shoal.service")

ASGIApp = Callable[[dict[str, Any], Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]],
                   Awaitable[None]]
RequestHandler = Callable[..., Awaitable[Any]]
EventHandler = Callable[[Event], Awaitable[Any] | Any]

HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
DEFAULT_MAX_BODY_SIZE = "16MiB"  # a request body, routes and mounted apps alike
DEFAULT_DRAIN_GRACE = 0.25  # seconds between DRAINING and closing the listener
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds in-flight requests get to finish

_json = msgspec.json.Encoder()


class ServiceNotRunning(ShoalError):
    """``publish``/``call`` was used on a service that is not started (or already stopped)."""


@dataclass(frozen=True, slots=True)
class SubscriptionSpec:
    """One ``@svc.subscribe``: what to consume, as which group, with which handler."""

    topic: str
    group: str
    handler: EventHandler
    retry: RetryPolicy | None
    concurrency: int


class Service:
    """A named service: an ASGI 3 application plus event handlers, that runs in the mesh."""

    def __init__(self, name: str, *, version: str | None = None,
                 max_body_size: int | str | None = DEFAULT_MAX_BODY_SIZE) -> None:
        """``max_body_size`` bounds request bodies (answered 413 beyond; None: no limit)."""
        self.name = check_service_name(name)
        if version is not None and (not isinstance(version, str) or not version
                                    or len(version) > 256):
            raise ConfigError(f"service {name!r}: version must be a non-empty string")
        self.version = version
        self.subscriptions: list[SubscriptionSpec] = []
        self.load = Load()
        self.bus: EventBus | None = None
        self.mesh: MeshClient | None = None
        self.store: Store | None = None
        self.registration: Registration | None = None
        self.instance_id: str | None = None
        self.address: str | None = None  # "host:port" the HTTP server listens on
        self.max_body_size = parse_size(max_body_size, name="max_body_size")
        self._router = Router(routes=[], max_body_size=self.max_body_size)
        self._app = ExceptionMiddleware(self._router)
        self._running: list[Subscription] = []
        self._server: _UvicornServer | None = None
        self._serving: asyncio.Task[None] | None = None
        self._owned_store = False
        self._closing: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lifespans: list[Lifespan] = []
        self._lifespan_state: dict[str, Any] = {}
        self._state = "stopped"  # stopped -> starting -> ready -> draining -> stopped
        self._missing: list[str] = ["not started"]
        self.mtls = MtlsMode.OFF
        self.tls: MeshTLS | None = None  # this instance's identity and contexts (mTLS on)
        self.authorization: AuthorizationPolicy | None = None
        self._rotation: asyncio.Task[None] | None = None
        self._permissive: PermissiveListener | None = None

    def __repr__(self) -> str:
        return f"<Service {self.name} {self._state}>"

    # -- declaring routes ------------------------------------------------------------
    def route(self, path: str, methods: Sequence[str] | None = None, *,
              name: str | None = None) -> Callable[[RequestHandler], RequestHandler]:
        """Declare ``async def handler(request) -> Response`` for ``path`` and ``methods``."""
        _check_path(path, "route")
        wanted = [m.upper() for m in (methods or ["GET"])]

        def register(handler: RequestHandler) -> RequestHandler:
            if not callable(handler):
                raise ConfigError(f"route {path}: handler must be callable, got {handler!r}")
            self._router.routes.append(Route(path, handler, methods=wanted, name=name))
            return handler

        return register

    def get(self, path: str, **kw: Any) -> Callable[[RequestHandler], RequestHandler]:
        """``route(path, ["GET"])`` (HEAD is answered too)."""
        return self.route(path, ["GET"], **kw)

    def post(self, path: str, **kw: Any) -> Callable[[RequestHandler], RequestHandler]:
        """``route(path, ["POST"])``."""
        return self.route(path, ["POST"], **kw)

    def put(self, path: str, **kw: Any) -> Callable[[RequestHandler], RequestHandler]:
        """``route(path, ["PUT"])``."""
        return self.route(path, ["PUT"], **kw)

    def delete(self, path: str, **kw: Any) -> Callable[[RequestHandler], RequestHandler]:
        """``route(path, ["DELETE"])``."""
        return self.route(path, ["DELETE"], **kw)

    def patch(self, path: str, **kw: Any) -> Callable[[RequestHandler], RequestHandler]:
        """``route(path, ["PATCH"])``."""
        return self.route(path, ["PATCH"], **kw)

    def mount(self, path: str, app: ASGIApp, *, name: str | None = None) -> None:
        """Serve the ASGI ``app`` (Starlette, FastAPI, ...) under ``path`` ("" or "/" for all)."""
        if not callable(app):
            raise ConfigError(f"mount {path!r}: expected an ASGI application, got {app!r}")
        path = "" if path in ("", "/") else path.rstrip("/")
        if path:
            _check_path(path, "mount")
        self._router.routes.append(Mount(path, app=app, name=name))

    @property
    def routes(self) -> list[BaseRoute]:
        """The declared routes and mounts, in matching order."""
        return list(self._router.routes)

    # -- declaring event handlers -----------------------------------------------------
    def subscribe(self, topic: str, *, group: str | None = None,
                  retry: RetryPolicy | int | None = None, concurrency: int = 1
                  ) -> Callable[[EventHandler], EventHandler]:
        """Handle ``topic``'s events with ``handler(event)`` (async, or sync in a thread).

        ``group`` defaults to the service's name: its instances share the events, and
        every other service gets each of them too. ``retry`` is a ``RetryPolicy`` (or a
        number of attempts); after the last one the event goes to ``<topic>.dlq``.
        """
        check_topic_name(topic)
        group = check_group_name(group if group is not None else self.name)
        if isinstance(retry, int) and not isinstance(retry, bool):
            retry = RetryPolicy(attempts=retry)
        elif retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigError(f"subscribe {topic!r}: retry must be a RetryPolicy or a number "
                              f"of attempts, got {retry!r}")
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ConfigError(f"subscribe {topic!r}: concurrency must be a positive integer, "
                              f"got {concurrency!r}")
        for spec in self.subscriptions:
            if (spec.topic, spec.group) == (topic, group):
                raise ConfigError(f"subscribe {topic!r}: group {group!r} already has a handler "
                                  f"({_name_of(spec.handler)}); one handler per topic and group")

        def register(handler: EventHandler) -> EventHandler:
            if not callable(handler):
                raise ConfigError(f"subscribe {topic!r}: handler must be callable")
            self.subscriptions.append(SubscriptionSpec(topic, group, handler, retry,
                                                       concurrency))
            return handler

        return register

    # -- inside handlers ---------------------------------------------------------------
    async def publish(self, topic: str, data: Any = None, *, key: str | None = None,
                      type: str | None = None, id: str | None = None,
                      extensions: Mapping[str, Any] | None = None) -> PublishAck:
        """Publish an event, carrying the current trace context; durable when it returns."""
        bus = self.bus
        if bus is None:
            raise ServiceNotRunning(f"service {self.name!r}: publish({topic!r}) needs a started "
                                    "service (svc.start(...), the instance runner or "
                                    "shoal.testing.ServiceHarness)")
        traceparent = current_traceparent.get()
        if traceparent is not None and not (extensions and "traceparent" in extensions):
            extensions = {**(extensions or {}), "traceparent": traceparent}
        return await bus.publish(topic, data, key=key, type=type, id=id, extensions=extensions)

    def publish_sync(self, topic: str, data: Any = None, **kw: Any) -> PublishAck:
        """``publish`` from a sync handler (it runs in a thread): waits until durable.
        Keyword arguments are ``publish``'s; the handler's trace context is carried."""
        loop = self._loop
        if loop is None or self.bus is None:
            raise ServiceNotRunning(f"service {self.name!r}: publish_sync({topic!r}) needs a "
                                    "started service")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise ShoalError(f"service {self.name!r}: publish_sync called on the event loop; "
                             "use `await svc.publish(...)` in async code")
        traceparent = current_traceparent.get()
        extensions = dict(kw.pop("extensions", None) or {})
        if traceparent is not None:
            extensions.setdefault("traceparent", traceparent)
        future = asyncio.run_coroutine_threadsafe(
            self.publish(topic, data, extensions=extensions or None, **kw), loop)
        return future.result()

    async def call(self, service: str, method: str, path: str, *,
                   headers: Mapping[str, str] | None = None, **kw: Any) -> MeshResponse:
        """Call ``service`` by name through the mesh (``MeshClient.request``), with the
        current trace context in a ``traceparent`` header. Keyword arguments are
        ``MeshClient.request``'s: ``json``, ``content``, ``params``, ``hash_key``."""
        mesh = self.mesh
        if mesh is None:
            raise ServiceNotRunning(f"service {self.name!r}: call({service!r}) needs a started "
                                    "service")
        check_service_name(service)
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigError(f"call {service!r}: path must start with '/', got {path!r}")
        pairs = dict(headers or {})
        traceparent = current_traceparent.get()
        if traceparent is not None and not any(k.lower() == "traceparent" for k in pairs):
            pairs["traceparent"] = traceparent
        return await mesh.request(method.upper(), f"http://{service}{path}", headers=pairs,
                                  **kw)

    # -- ASGI ---------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _answer_lifespan(receive, send)
            return
        if kind != "http":
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        if path == HEALTH_PATH:
            await _send_json(send, 200, {"status": "alive", "service": self.name})
            return
        if path == READY_PATH:
            missing = self.missing()
            body = {"ready": not missing, "service": self.name, "missing": missing}
            await _send_json(send, 503 if missing else 200, body)
            return
        parent = None
        for name, value in scope.get("headers", ()):
            if name == b"traceparent":
                parent = value.decode("latin-1")
                break
        policy = self.authorization
        if policy is not None:
            from shoal.mesh.security.asgi_server import forbidden, peer_identity

            raw = scope.get("raw_path") or path.encode("utf-8")
            decision = policy.decide(peer_identity(scope), scope.get("method", "GET"),
                                     raw.decode("latin-1"))
            if not decision.allowed:
                counted = _metrics.active()
                if counted is not None:
                    counted.authz_denials.labels(self.name, decision.rule).inc()
                await forbidden(send, self.name, decision)
                return
        if self._lifespan_state:  # what mounted apps' lifespans left for their requests
            scope["state"] = {**self._lifespan_state, **scope.get("state", {})}
        token = current_traceparent.set(_tracing.hop(parent))  # the server span's, if traced
        load = self.load
        load.request_started()
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self._app(scope, receive, tracking_send)
        except Exception:
            log.exception("service %s: %s %s failed", self.name, scope.get("method"), path)
            if not started:
                await _send_json(send, 500, {"error": "internal server error",
                                             "service": self.name})
        finally:
            load.request_finished()
            current_traceparent.reset(token)

    # -- readiness ------------------------------------------------------------------------
    def missing(self) -> list[str]:
        """What keeps the instance from being ready (empty when it is)."""
        missing = list(self._missing)
        if self.registration is not None and self.registration.lost and \
                "registry" not in missing:
            missing.append("registry")  # another registration took our id, or it was deleted
        return missing

    @property
    def ready(self) -> bool:
        """True when ``/readyz`` answers 200."""
        return not self.missing()

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, *, broker: str | None = None, store: str | Store | None = None,
                    listen: str | None = "127.0.0.1:0", instance_id: str | None = None,
                    labels: Mapping[str, str] | None = None, ttl: float | str = "10s",
                    register: bool = True,
                    policies: Mapping[str, TrafficPolicy] | None = None,
                    mtls: MtlsMode | str = MtlsMode.OFF,
                    trust_domain: str = DEFAULT_TRUST_DOMAIN,
                    authorization: AuthorizationPolicy | None = None,
                    topic_policy: TopicPolicy | None = None,
                    identity_timeout: float = 30.0) -> None:
        """Connect, serve, register and subscribe; returns when the instance is ready.

        ``listen`` is ``HOST:PORT`` (port 0: any free port; ``self.address`` says which),
        or None to serve no HTTP (and not register): the ASGI app is then used directly,
        as ``shoal.testing.ServiceHarness`` does. ``policies`` are the traffic policies of
        the services it calls (the manifest's ``services.<name>.policy``; default: the
        mesh's). ``mtls``, ``trust_domain``, ``authorization`` and ``topic_policy``: see
        "Zero trust" above (the certificate is awaited for ``identity_timeout`` seconds).
        """
        if self._state != "stopped":
            raise ShoalError(f"service {self.name!r} is already {self._state}")
        if instance_id is not None:
            check_instance_id(instance_id)
        labels = dict(labels or {})
        if self.version is not None:
            labels.setdefault("version", self.version)
        self._state = "starting"
        self._loop = asyncio.get_running_loop()
        self.mtls = MtlsMode.parse(mtls.value if isinstance(mtls, MtlsMode) else mtls,
                                   where="mtls")
        self.authorization = authorization
        self._missing = ["store", "bus", "http", "registry", "subscriptions"]
        if listen is None or not register:
            self._missing.remove("registry")
        if listen is None:
            self._missing.remove("http")
        try:
            if isinstance(store, Store):
                self.store, self._owned_store = store, False
            else:
                store_url = store or os.environ.get("SHOAL_STORE")
                if store_url is None:
                    store_url = default_store_for(broker or os.environ.get("SHOAL_BROKER")
                                                  or DEFAULT_BROKER_URL)
                self.store, self._owned_store = await connect_store(store_url), True
            self._missing.remove("store")
            self.instance_id = instance_id or f"{self.name}-{secrets.token_hex(4)}"
            if self.mtls.uses_tls:  # cryptography is loaded only here
                from shoal.mesh.security.identity import request_identity
                from shoal.mesh.security.tls import MeshTLS, rotate_forever

                self.tls = MeshTLS(await request_identity(
                    self.store, self.name, self.instance_id, trust_domain=trust_domain,
                    timeout=identity_timeout))
                self._rotation = asyncio.get_running_loop().create_task(
                    rotate_forever(self.tls, self.store, self.instance_id),
                    name=f"shoal-certificate-rotation {self.name}")
            self.bus = await EventBus.connect(
                broker, store=self.store, source=f"/shoal/services/{self.name}",
                topic_policy=topic_policy,
                identity=None if topic_policy is None else SpiffeId(trust_domain, self.name).uri)
            self._missing.remove("bus")
            self.mesh = await MeshClient.connect(self.store, policies=policies, tls=self.tls)
            await self._start_mounted()
            if listen is not None:
                self.address = await self._serve(listen)
                self._missing.remove("http")
            if listen is not None and register:
                self.registration = await Registry(self.store).register(
                    Instance(id=self.instance_id, service=self.name,
                             address=_registered_address(self.address), labels=labels,
                             state=HealthState.STARTING, reason="joining its groups"),
                    ttl=ttl)
                self._missing.remove("registry")
            await self._subscribe_all()
            self._missing.remove("subscriptions")
            if self.registration is not None:
                await self.registration.set_state(HealthState.SERVING, "ready")
            self._state = "ready"
        except BaseException:
            await asyncio.shield(self._close(grace=0.0))
            raise

    async def _start_mounted(self) -> None:
        """Run the lifespan startup of every mounted app (FastAPI/Starlette resources)."""
        for route in self._router.routes:
            if isinstance(route, Mount) and route.app is not None:
                lifespan = Lifespan(route.app, f"mount {route.path or '/'}")
                await lifespan.startup()
                if lifespan.supported:
                    self._lifespans.append(lifespan)
                    self._lifespan_state.update(lifespan.state)

    async def _stop_mounted(self) -> None:
        for lifespan in reversed(self._lifespans):
            try:
                await lifespan.shutdown()
            except ShoalError as e:
                log.error("service %s: %s", self.name, e)
        self._lifespans.clear()
        self._lifespan_state = {}

    async def _subscribe_all(self) -> None:
        assert self.bus is not None
        for spec in self.subscriptions:
            sub = await self.bus.subscribe(spec.topic, spec.group, self._traced(spec.handler),
                                           retry=spec.retry, concurrency=spec.concurrency)
            self._running.append(sub)

    def _traced(self, handler: EventHandler) -> EventHandler:
        """The handler run under the event's trace context, counted in ``load``."""
        load = self.load
        if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
                getattr(handler, "__call__", None)):  # noqa: B004 - async callable objects

            async def run_async(event: Event) -> Any:
                token = current_traceparent.set(_tracing.hop(event.traceparent))
                load.event_started()
                try:
                    return await handler(event)
                finally:
                    load.event_finished()
                    current_traceparent.reset(token)

            return run_async

        loop = asyncio.get_running_loop()

        def run_sync(event: Event) -> Any:  # runs in the subscription's thread pool
            token = current_traceparent.set(_tracing.hop(event.traceparent))
            loop.call_soon_threadsafe(load.event_started)
            try:
                return handler(event)
            finally:
                loop.call_soon_threadsafe(load.event_finished)
                current_traceparent.reset(token)

        return run_sync

    async def _serve(self, listen: str) -> str:
        host, port = _split_listen(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # TCP_NODELAY on the listener (Linux copies it to accepted sockets): uvicorn writes
        # head and body separately, and under uvloop, or asyncio with a proto-0 listener,
        # accepted sockets kept Nagle on: every response waited for a delayed ACK (~40 ms).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise ConfigError(f"service {self.name!r}: cannot listen on {listen}: "
                              f"{e.strerror or e}") from None
        bound_port = sock.getsockname()[1]
        tls, permissive = self.tls, self.mtls is MtlsMode.PERMISSIVE
        self._server = _UvicornServer(self, sock, ssl=None if tls is None or permissive
                                      else tls.server_context)
        self._serving = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[] if permissive else [sock]),
            name=f"shoal-service-http {self.name}")
        while not self._server.started:
            if self._serving.done():
                self._serving.result()
                raise ShoalError(f"service {self.name!r}: HTTP server stopped while starting")
            await asyncio.sleep(0.005)
        if permissive and tls is not None:  # mTLS and plaintext on one port: sniffed
            from shoal.mesh.security.asgi_server import UvicornAdopter
            from shoal.mesh.security.tls import PermissiveListener

            self._permissive = PermissiveListener(UvicornAdopter(self._server.uvicorn),
                                                  tls.server_context)
            sock.close()  # the listener binds the same port (SO_REUSEADDR)
            await self._permissive.start(host, bound_port)
        shown = f"[{host}]" if ":" in host else host
        return f"{shown}:{bound_port}"

    async def stop(self, *, grace: float | str = DEFAULT_DRAIN_GRACE,
                   timeout: float | str = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
        """Drain and stop: DRAINING first, then finish in-flight work, commit, deregister.

        ``grace`` is how long the instance keeps serving after declaring DRAINING, so
        callers' endpoint caches drop it before its listener closes; ``timeout`` bounds
        how long in-flight requests may take to finish.
        """
        if self._closing is None:
            if self._state == "stopped":
                return
            self._closing = asyncio.ensure_future(self._close(
                grace=parse_duration(grace, name="grace") or 0.0,
                timeout=parse_duration(timeout, name="timeout")))
        closing = self._closing
        try:
            await asyncio.shield(closing)  # a second caller waits for the same drain
        finally:
            if closing.done() and self._closing is closing:
                self._closing = None

    async def _close(self, *, grace: float, timeout: float | None = None) -> None:
        """Drain in order; a step that fails is logged and the next ones still run."""
        self._state = "draining"
        self._missing = ["draining"]
        if self.registration is not None:
            await self._quietly(self.registration.set_state(HealthState.DRAINING,
                                                            "shutting down"), "DRAINING")
        if grace:
            await asyncio.sleep(grace)
        stops: list[Awaitable[Any]] = [sub.close() for sub in self._running]
        if self._permissive is not None:
            await self._permissive.aclose()  # no new connections; served ones drain below
            self._permissive = None
        if self._server is not None:
            stops.append(self._stop_http(timeout))
        results = await asyncio.gather(*stops, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.error("service %s: while draining: %r", self.name, result)
        self._running.clear()
        await self._stop_mounted()
        if self.bus is not None:
            await self._quietly(self.bus.close(), "closing the bus")  # flushes publishes
            self.bus = None
        if self.registration is not None:
            await self._quietly(self.registration.deregister(reason="stopped"), "deregister")
            self.registration = None
        if self.mesh is not None:
            await self._quietly(self.mesh.aclose(), "closing the mesh client")
            self.mesh = None
        if self._rotation is not None:
            self._rotation.cancel()
            await asyncio.gather(self._rotation, return_exceptions=True)
            self._rotation = None
        if self.store is not None and self._owned_store:
            await self._quietly(self.store.close(), "closing the store")
        self.store = None
        self._state = "stopped"
        self._missing = ["not started"]

    async def _quietly(self, step: Awaitable[Any], what: str) -> None:
        try:
            await step
        except Exception as e:
            log.error("service %s: %s failed while stopping: %s", self.name, what, e)

    async def _stop_http(self, timeout: float | None) -> None:
        server, serving = self._server, self._serving
        self._server = self._serving = None
        if server is None or serving is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(serving), timeout)
        except TimeoutError:
            log.warning("service %s: in-flight requests did not finish within %.3gs",
                        self.name, timeout)
            server.force_exit = True
            await serving

    @contextlib.asynccontextmanager
    async def running(self, **start: Any) -> AsyncIterator[Service]:
        """``async with svc.running(broker=..., store=..., listen=...)``: start, then stop."""
        await self.start(**start)
        try:
            yield self
        finally:
            await self.stop()

    async def __aenter__(self) -> Service:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _name_of(handler: Any) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)


def _check_path(path: object, what: str) -> None:
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 2048:
        raise ConfigError(f"{what}: path must be a string starting with '/', got {path!r}")
    if path.rstrip("/") in (HEALTH_PATH, READY_PATH):
        raise ConfigError(f"{what}: {path} is reserved for the instance's health checks")


def _split_listen(listen: str) -> tuple[str, int]:
    """``("127.0.0.1", 8000)`` from ``"127.0.0.1:8000"`` (``"[::1]:8000"`` for IPv6)."""
    if not isinstance(listen, str) or ":" not in listen or len(listen) > 300:
        raise ConfigError(f"listen: expected HOST:PORT like 127.0.0.1:8000, got {listen!r}")
    host, _, port_text = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"listen: expected HOST:PORT like 127.0.0.1:8000, got {listen!r}")
    return host, int(port_text)


def _registered_address(address: str) -> str:
    """The address others reach us at: a wildcard host becomes loopback."""
    host, port = _split_listen(address)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host}]" if ":" in host else host
    return check_address(f"{shown}:{port}")


async def _send_json(send: Any, status: int, body: Any, *, close: bool = False) -> None:
    payload = _json.encode(body)
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _answer_lifespan(receive: Any, send: Any) -> None:
    """Lifespan events from a server that runs us directly: our lifecycle is ``start``."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _uvicorn_server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn without its own signal handling: the instance runner owns signals."""

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    return Server


class _UvicornServer:
    """uvicorn serving one Service on an already-bound socket."""

    def __init__(self, service: Service, sock: socket.socket, *,
                 ssl: Any = None) -> None:
        """``ssl``: the server context of mutual TLS (every connection), else plaintext."""
        import uvicorn

        from shoal.mesh.security.asgi_server import PeerIdentityProtocol
        from shoal.mesh.tls_reads import buffered_reads
        from shoal.observability.http import ObservedASGI

        # over TLS, reads land in one reused buffer (see shoal.mesh.tls_reads)
        http = PeerIdentityProtocol if ssl is None else buffered_reads(PeerIdentityProtocol)
        config = uvicorn.Config(  # metrics (and /metrics), server spans: when switched on
            ObservedASGI(service, service.name), loop="none", http=http,
            lifespan="off", log_level="warning", access_log=False, server_header=False,
            date_header=False, timeout_graceful_shutdown=None,
            ssl_context_factory=None if ssl is None else (lambda _config, _default: ssl),
        )
        self.uvicorn = self._server = _uvicorn_server_class()(config)
        self._sock = sock

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    @property
    def should_exit(self) -> bool:
        return bool(self._server.should_exit)

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._server.should_exit = value

    @property
    def force_exit(self) -> bool:
        return bool(self._server.force_exit)

    @force_exit.setter
    def force_exit(self, value: bool) -> None:
        self._server.force_exit = value

    async def serve(self, sockets: list[socket.socket]) -> None:
        try:
            await self._server.serve(sockets=sockets)
        finally:
            self._sock.close()
