"""The gateway's proxy: routes a request, sends it through the mesh's call stack, streams
the answer back. ``Gateway(routes, cache, bus).handle`` is an ``HttpServer`` handler.

One request goes: ``POST /events/{topic}`` (built in, before any route) -> route match ->
destination by weight -> fault injection -> header edits and forwarding headers ->
``Upstream.send`` (timeout, retry, circuit breaker, balancer, pool: the same stack as the
proxyless client) -> the upstream response, streamed back with the route's edits.

Decisions, written down once:

* **One ``Upstream`` per (service, subset, route)**, made on first use and kept: the
  route's policy is merged over the service's own (``Route.policy_for``), and breaker,
  balancer and outlier state belong to that one traffic class. A subset is a filter of
  the service's endpoints by labels, recomputed only when the endpoint cache replaces the
  service's list.
* **Bodies are streamed, except small ones.** A request body with a Content-Length of at
  most ``BUFFER_MAX`` is read whole, so the stack may retry it (and a mirror may copy it);
  larger or chunked bodies are streamed, with the server's backpressure on the client and
  the pool's on the upstream, and are never retried once sent. A response whose body had
  wholly arrived with its head is answered as bytes (no streaming coroutine: about 25%
  more requests per second for small answers); any other is streamed.
* **Hop-by-hop headers stop here** in both directions: ``connection`` and the names it
  lists, ``keep-alive``, ``proxy-connection``, ``te``, ``trailer``, ``upgrade``,
  ``transfer-encoding`` (the body is re-framed) and ``expect`` (the server answers
  ``100 Continue`` itself when the body is first read). ``Host`` is the route's
  (``rewrite.host``, else the client's).
* **Every error the gateway makes names its layer**: ``router`` (no route: 404), ``fault``
  (injected abort), ``events`` (the HTTP binding), or the mesh layer that gave up
  (``balancer``, ``circuit-breaker``, ``retry-budget``, ``timeout``, ``upstream``) with its
  own status. An upstream's own error response is relayed as it is.
* **A fast path, the same behaviour.** ``fast_handle`` (which ``HttpServer`` calls for a
  request whose body has arrived) routes like ``handle`` and, for a route with no fault and
  no mirror, a body of at most ``BUFFER_MAX``, and an idle pooled connection, sends the
  request with ``Upstream.start`` and answers from the upstream protocol's callback: no
  task and no coroutine. Anything else, and a try that must be retried, continues on the
  coroutine path from where it stopped, with what was decided kept (route, destination,
  endpoint), so no choice is made twice. Observability: ``on_route`` is called the same;
  ``observe_gateway`` keeps the fast path (its ``fast_handle`` counts the request), and
  only a request whose trace is recorded takes the coroutine path.
* **Header lines are encoded in the pass that picks them.** Without route edits, the
  forwarded request's lines and a whole response's relayed lines are built as bytes while
  the hop-by-hop ones are dropped (``shoal.mesh.http1.EncodedHeaders``), not as pairs that
  the next layer encodes in a second pass (a ``Connection`` header naming other headers
  takes the pairs path). Generated ``X-Request-Id`` values are a random prefix per process
  (drawn again in each forked worker) and a counter: unique, with no syscall.
* **Mirrors are fire-and-forget** and only for buffered bodies; at most ``MAX_MIRRORS``
  are in flight (more are skipped, never queued), and their responses are discarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

import msgspec

from shoal.errors import InvalidEvent, MeshError, ShoalError, TopicError, TransportError
from shoal.events.bus import EventBus
from shoal.events.codec import MAX_EVENT_SIZE, from_http
from shoal.events.partitioning import check_topic_name
from shoal.gateway.edge import EdgePolicy
from shoal.gateway.routes import Destination, InvalidPath, Route, RouteMatch, RouteTable
from shoal.gateway.server import Request, Response
from shoal.mesh.ejections import EjectionReporter
from shoal.mesh.endpoint import Endpoint
from shoal.mesh.fast_try import FastTry
from shoal.mesh.http1 import Body, EncodedHeaders
from shoal.mesh.http1 import Response as UpstreamResponse
from shoal.mesh.registry import EndpointCache
from shoal.mesh.security.tls import MeshTLS
from shoal.mesh.upstream import Upstream

__all__ = ["BUFFER_MAX", "EVENTS_PREFIX", "HOP_BY_HOP", "MAX_MIRRORS", "Gateway"]

log = logging.getLogger("shoal.gateway")

BUFFER_MAX = 64 * 1024
"""Request bodies with a Content-Length up to this are read whole (retriable, mirrorable)."""
MAX_MIRRORS = 64
"""Mirrored requests in flight at most; more are skipped."""
EVENTS_PREFIX = b"/events/"
"""``POST /events/{topic}`` publishes a CloudEvent (the HTTP binding) on the bus."""
HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
    b"transfer-encoding",
))
"""Headers that concern one connection and are never forwarded (RFC 9110 7.6.1)."""
_REQUEST_DROP = HOP_BY_HOP | {b"host", b"expect", b"x-forwarded-proto"}
_HOP_LENGTHS = frozenset(len(n) for n in HOP_BY_HOP)  # other names need no lower-casing
_REQUEST_LOOK = frozenset(len(n) for n in (*_REQUEST_DROP, b"x-forwarded-for", b"x-request-id"))
_NOT_LISTED = HOP_BY_HOP | {b"close"}  # ``Connection`` tokens that name nothing left to drop
_ANSWER_LOOK = _HOP_LENGTHS | {len(b"date"), len(b"content-length")}

HeaderPairs = list[tuple[bytes, bytes]]


def _strip(headers: Sequence[tuple[bytes, bytes]]) -> HeaderPairs:
    """``headers`` without the hop-by-hop ones and the names a ``Connection`` header lists.
    A name of a length no hop-by-hop name has is kept without being lower-cased."""
    out: HeaderPairs = []
    listed: set[bytes] | None = None
    for pair in headers:
        if len(pair[0]) in _HOP_LENGTHS:
            low = pair[0].lower()
            if low in HOP_BY_HOP:
                if low == b"connection":
                    listed = _listed(listed, pair[1])
                continue
        out.append(pair)
    if listed and not listed <= _NOT_LISTED:  # "keep-alive", "close": nothing more to drop
        out = [(n, v) for n, v in out if n.lower() not in listed]
    return out


def _encoded_answer_headers(headers: Sequence[tuple[bytes, bytes]]) -> EncodedHeaders | None:
    """A whole upstream response's headers as the server takes them, encoded in one pass:
    ``_strip``'s, and no Content-Length line (the server frames the body; the length is
    kept for a HEAD or 304 answer). None if ``Connection`` names more to drop."""
    parts: list[bytes] = []
    listed: set[bytes] | None = None
    length: int | None = None
    date = False
    for name, value in headers:
        if len(name) in _ANSWER_LOOK:
            low = name.lower()
            if low in HOP_BY_HOP:
                if low == b"connection":
                    listed = _listed(listed, value)
                continue
            if low == b"content-length":
                length = int(value)  # digits: llhttp checked it
                continue
            if low == b"date":
                date = True
        parts += (name, b": ", value, b"\r\n")
    if listed and not listed <= _NOT_LISTED:
        return None
    return EncodedHeaders(b"".join(parts), len(parts) // 4, content_length=length, date=date)


def _listed(listed: set[bytes] | None, value: bytes) -> set[bytes]:
    """The header names a ``Connection`` header value lists, added to ``listed``."""
    names = {t.strip().lower() for t in value.split(b",")}
    return names if listed is None else listed | names


_CLIENT_IPS: dict[str, bytes] = {}


def _client_ip(client: Any) -> bytes | None:
    """The client's address as bytes (encoded once per address, for a bounded few)."""
    if type(client) is tuple and client:
        host = client[0]
        ip = _CLIENT_IPS.get(host)
        if ip is None:
            ip = str(host).encode("latin-1")
            if len(_CLIENT_IPS) < 1024:
                _CLIENT_IPS[host] = ip
        return ip
    return None


def _event_error(status: int, reason: str, message: str, **extra: Any) -> Response:
    """An ``events`` layer error, with extra fields (``attribute``) in the JSON body."""
    body = msgspec.json.encode({"error": message, "layer": "events", "reason": reason, **extra})
    return Response(body, status, [(b"content-type", b"application/json"),
                                   (b"shoal-error", f"events; {reason}".encode("latin-1"))])


class Gateway:
    """The proxy handler: ``HttpServer(Gateway(routes, cache, bus).handle)``."""

    def __init__(self, routes: RouteTable, cache: EndpointCache, bus: EventBus | None = None,
                 *, services: Mapping[str, Mapping[str, Any]] | None = None,
                 rng: random.Random | None = None, tls: MeshTLS | None = None,
                 edge: EdgePolicy | None = None,
                 ejections: EjectionReporter | None = None) -> None:
        self.routes = routes
        self.tls = tls  # mutual TLS to services (the gateway's own mesh identity)
        self.edge = edge  # JWT and rate limits per route (shoal.gateway.edge)
        self.cache = cache
        self.ejections = ejections  # shares outlier ejections with the registry
        self.bus = bus
        self.services = dict(services or {})
        self.rng = rng or random.Random()
        self._upstreams: dict[tuple[Route, str, tuple[tuple[str, str], ...]], Upstream] = {}
        self._mirrors: set[asyncio.Task[None]] = set()
        self.on_route: Callable[[Route, str], None] | None = None  # observability's hook

    # -- the handler -----------------------------------------------------------------------
    async def handle(self, request: Request) -> Any:
        """Answer one request: an event publish, a proxied call, or a JSON error."""
        routed = self._route(request)
        if type(routed) is not tuple:
            return await routed if hasattr(routed, "__await__") else routed
        return await self._proxy(request, *routed)

    def fast_handle(self, request: Request, answer: Callable[[Request, Any], None]) -> Any:
        """``handle`` without a task or a coroutine for the common case (the server calls it
        for a request whose body has all arrived, see ``shoal.gateway.server``).

        A route with no fault and no mirror, a body of at most ``BUFFER_MAX`` bytes, and an
        idle pooled connection to the endpoint the balancer picks: the request is written at
        once (``Upstream.start``) and a ``FastTry`` is returned, whose callback gives
        ``answer(request, response)`` the same response ``handle`` would return. Anything
        else returns what ``handle`` would (an awaitable from where this one stopped: the
        route matched and the destination chosen are kept), and so does a try that must be
        retried (the retry runs in a task). One stack, one behaviour: only the scheduling
        differs."""
        routed = self._route(request)
        if type(routed) is not tuple:
            return routed
        m, destination = routed
        route = m.route
        length = request.content_length
        if route.fault is not None or route.mirror is not None or request.chunked or (
                length is not None and length > BUFFER_MAX):
            return self._proxy(request, m, destination)
        body = request.complete_body() if length else None
        if length and body is None:
            return self._proxy(request, m, destination)
        headers = self._upstream_headers(request, m)
        upstream = self.upstream(m, destination)
        hash_key = None
        hash_header = upstream.policy.load_balancer.hash_header
        if hash_header:
            hash_key = request.headers.get(hash_header)

        def deliver(result: Any) -> None:
            if isinstance(result, UpstreamResponse):
                answer(request, self._relay(m, result))
            elif isinstance(result, BaseException):
                answer(request, _mesh_error(result))
            else:
                answer(request, self._relayed(m, result))

        started = upstream.start(request.method, m.target, headers, body or None, deliver,
                                 hash_key=hash_key)
        if type(started) is FastTry:
            return started
        return self._relayed(m, started)  # type: ignore[arg-type]

    def _route(self, request: Request) -> Any:
        """The route match and destination for ``request``, or what answers it instead
        (an error ``Response``, or the events endpoint's coroutine)."""
        path, query, _ = request._parts()
        if request.method == "POST" and path.startswith(EVENTS_PREFIX):
            refusal = None if self.edge is None else self.edge.check(request, None)
            return refusal or self._publish(request)
        host = request.host or ""
        try:
            m = self.routes.match(request.method, host, path, request.headers, query)
        except InvalidPath as exc:
            return Response.error(exc.status, "invalid-path", str(exc), layer="router")
        if self.edge is not None:
            refusal = self.edge.check(request, None if m is None else m.route)
            if refusal is not None:
                return refusal
        if m is None:
            return Response.error(404, "no-route", f"no route for {request.method} "
                                  f"{host}{request.path}", layer="router")
        destination = m.choose_destination(self.rng)
        if self.on_route is not None:
            self.on_route(m.route, destination.service)
        return m, destination

    async def _proxy(self, request: Request, m: RouteMatch, destination: Destination) -> Any:
        """The routed request through fault injection, mirroring and the upstream's stack."""
        rng = self.rng
        fault = m.fault_decision(rng)
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.abort is not None:
            return Response.error(fault.abort, "fault-injected",
                                  f"fault injection aborted the request with {fault.abort}",
                                  layer="fault")
        headers = self._upstream_headers(request, m)
        length = request.content_length
        if request.chunked or (length is not None and length > BUFFER_MAX):
            body: Body = request.stream()
        elif length:
            body = await request.body()
        else:
            body = None
        upstream = self.upstream(m, destination)
        hash_key = None
        hash_header = upstream.policy.load_balancer.hash_header
        if hash_header:
            hash_key = request.headers.get(hash_header)
        target = m.target
        if (body is None or isinstance(body, bytes)) and m.should_mirror(rng):
            self._mirror(m, request.method, target, headers, body)
        return await self._relayed(
            m, upstream.send(request.method, target, headers, body, hash_key=hash_key))

    async def _relayed(self, m: RouteMatch, pending: Awaitable[UpstreamResponse]) -> Any:
        """The answer to relay once ``pending`` (an upstream call) ends."""
        try:
            resp = await pending
        except (MeshError, TransportError) as exc:
            return _mesh_error(exc)
        return self._relay(m, resp)

    def _relay(self, m: RouteMatch, resp: UpstreamResponse) -> Any:
        """The upstream's response as relayed: hop-by-hop headers dropped, the route's
        edits; as bytes if the whole body is here, else streamed."""
        content = resp.complete_body()
        if content is not None and not m.response_headers:  # the usual case: one pass
            encoded = _encoded_answer_headers(resp.headers)
            if encoded is not None:
                return Response(content, resp.status, encoded)
        out = _strip(resp.headers)
        if m.response_headers:
            out = m.response_headers.apply_bytes(out)
        if content is not None:  # the whole body is already here: no stream
            return Response(content, resp.status, out)
        resp.headers = out
        return resp

    # -- pieces ----------------------------------------------------------------------------
    def upstream(self, m: RouteMatch, destination: Destination) -> Upstream:
        """The call stack for ``destination`` under ``m``'s route (made on first use)."""
        key = (m.route, destination.service, destination.subset)  # routes hash by identity
        upstream = self._upstreams.get(key)
        if upstream is not None:
            return upstream
        service = destination.service
        policy = m.route.policy_for(self.services.get(service))
        upstream = Upstream(service, self._source(service, destination.subset), policy,
                            is_healthy=self.cache.is_healthy,
                            on_ejection=None if self.ejections is None else self.ejections.report,
                            pool_options=None if self.tls is None else
                            {"ssl": self.tls.client_context(service)})  # type: ignore[dict-item]
        self._upstreams[key] = upstream
        return upstream

    def _source(self, service: str, subset: tuple[tuple[str, str], ...]
                ) -> Callable[[], Sequence[Endpoint]]:
        cache = self.cache
        if not subset:
            return lambda: cache.endpoints(service)
        seen: list[Any] = [None, []]

        def endpoints() -> Sequence[Endpoint]:
            current = cache.endpoints(service)
            if current is not seen[0]:
                seen[0] = current
                seen[1] = [e for e in current
                           if all(e.labels.get(k) == v for k, v in subset)]
            return seen[1]  # type: ignore[no-any-return]

        return endpoints

    def _upstream_headers(self, request: Request, m: RouteMatch) -> HeaderPairs | EncodedHeaders:
        """The request's headers as forwarded: hop-by-hop and ``host`` dropped, the
        route's edits, ``X-Forwarded-*``, ``X-Request-Id``, ``Host``. Without edits, and
        unless ``Connection`` lists a header to drop, the lines are encoded in the one pass
        over the request's headers (``EncodedHeaders``); else they are pairs."""
        if m.request_headers:
            return self._edited_headers(request, m)
        parts: list[bytes] = []
        forwarded: list[bytes] | None = None
        listed: set[bytes] | None = None
        has_id = False
        for name, value in request.headers:
            if len(name) in _REQUEST_LOOK:  # the length of a name that needs a look
                low = name.lower()
                if low in _REQUEST_DROP:
                    if low == b"connection":
                        listed = _listed(listed, value)
                    continue
                if low == b"x-forwarded-for":
                    if forwarded is None:
                        forwarded = []
                    forwarded.append(value)
                    continue
                if low == b"x-request-id":
                    has_id = True
            parts += (name, b": ", value, b"\r\n")
        if listed and not listed <= _NOT_LISTED:
            return self._edited_headers(request, m)  # Connection names more to drop
        lines = len(parts) // 4 + 1  # the request's own, and x-forwarded-proto below
        ip = _client_ip(request.client)
        if ip is not None:
            parts += (b"x-forwarded-for: ", b", ".join([*forwarded, ip]) if forwarded else ip,
                      b"\r\n")
            lines += 1
        elif forwarded:
            for value in forwarded:
                parts += (b"x-forwarded-for: ", value, b"\r\n")
            lines += len(forwarded)
        parts.append(b"x-forwarded-proto: http\r\n")
        if not has_id:
            parts += (b"x-request-id: ", _request_id(), b"\r\n")
            lines += 1
        if m.host:
            parts += (b"host: ", m.host.encode("latin-1"), b"\r\n")
            lines += 1
        return EncodedHeaders(b"".join(parts), lines, host=bool(m.host),
                              content_length=request.content_length)

    def _edited_headers(self, request: Request, m: RouteMatch) -> HeaderPairs:
        """``_upstream_headers`` as pairs, in one pass over the request's headers."""
        headers: HeaderPairs = []
        forwarded: list[bytes] = []
        listed: set[bytes] | None = None
        has_id = False
        for pair in request.headers:
            low = pair[0].lower()
            if low in _REQUEST_DROP:
                if low == b"connection":
                    listed = _listed(listed, pair[1])
            elif low == b"x-forwarded-for":
                forwarded.append(pair[1])
            else:
                if low == b"x-request-id":
                    has_id = True
                headers.append(pair)
        if listed:
            headers = [(n, v) for n, v in headers if n.lower() not in listed]
            if b"x-forwarded-for" in listed:
                forwarded = []
        if m.request_headers:
            headers = m.request_headers.apply_bytes(
                headers + [(b"x-forwarded-for", v) for v in forwarded])
            forwarded = [v for n, v in headers if n.lower() == b"x-forwarded-for"]
            if forwarded:
                headers = [(n, v) for n, v in headers if n.lower() != b"x-forwarded-for"]
        ip = _client_ip(request.client)
        if ip is not None:
            headers.append((b"x-forwarded-for",
                            b", ".join([*forwarded, ip]) if forwarded else ip))
        else:
            headers.extend((b"x-forwarded-for", v) for v in forwarded)
        headers.append((b"x-forwarded-proto", b"http"))
        if not has_id:
            headers.append((b"x-request-id", _request_id()))
        if m.host:
            headers.append((b"host", m.host.encode("latin-1")))
        return headers

    def _mirror(self, m: RouteMatch, method: str, target: str, headers: HeaderPairs,
                body: bytes | None) -> None:
        mirror = m.route.mirror
        if mirror is None or len(self._mirrors) >= MAX_MIRRORS:
            return
        upstream = self.upstream(m, mirror.destination)

        async def send() -> None:
            try:
                resp = await upstream.send(method, target, headers, body)
                resp.close()
            except Exception as exc:  # a mirror's failure is never the client's
                log.debug("gateway: mirror to %s failed: %s", upstream.service, exc)

        task = asyncio.get_running_loop().create_task(send())
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    async def _publish(self, request: Request) -> Response:
        topic = unquote(request.raw_path[len(EVENTS_PREFIX):].decode("latin-1"))
        try:
            check_topic_name(topic)
        except TopicError as exc:
            return _event_error(400, "invalid-topic", str(exc))
        if self.bus is None:
            return _event_error(503, "no-bus", "this gateway has no event bus configured")
        if request.content_length is not None and request.content_length > MAX_EVENT_SIZE:
            return _event_error(413, "event-too-large", f"an event is at most {MAX_EVENT_SIZE} "
                                f"bytes, this one has {request.content_length}")
        body = await request.body()
        try:
            event = from_http(request.headers, body)
        except InvalidEvent as exc:
            return _event_error(400, "invalid-event", str(exc), attribute=exc.attribute)
        try:
            ack = await self.bus.publish_event(topic, event)
        except ShoalError as exc:
            log.warning("gateway: publishing to %r failed: %s", topic, exc)
            return _event_error(503, "publish-failed", str(exc))
        return Response.json(ack, status=202)

    def swap_routes(self, routes: RouteTable,
                    unchanged: Mapping[Route, Route] | None = None) -> None:
        """Route new requests with ``routes``; requests already routed finish on the old
        table. The upstreams (breaker, balancer, outlier and pool state) of a route in
        ``unchanged`` (old route -> its identical successor) carry over to the successor;
        the others stay until ``retire_upstreams``."""
        moved = dict(self._upstreams)
        for (route, service, subset), upstream in self._upstreams.items():
            successor = (unchanged or {}).get(route)
            if successor is not None:
                moved.setdefault((successor, service, subset), upstream)
        self._upstreams = moved
        self.routes = routes

    async def retire_upstreams(self) -> int:
        """Forget the upstreams of routes no longer in the table and close those no current
        route shares; returns how many were closed. Call it once requests routed by an
        older table have had time to finish."""
        current = set(self.routes)
        kept = {k: u for k, u in self._upstreams.items() if k[0] in current}
        live = {id(u) for u in kept.values()}
        retired = {id(u): u for k, u in self._upstreams.items()
                   if k[0] not in current and id(u) not in live}
        self._upstreams = kept
        for upstream in retired.values():
            await upstream.aclose()
        return len(retired)

    async def aclose(self) -> None:
        """Stop mirrors and close every upstream's connections."""
        for task in list(self._mirrors):
            task.cancel()
        for task in list(self._mirrors):
            with contextlib.suppress(BaseException):
                await task
        held, self._upstreams = self._upstreams, {}
        for upstream in held.values():
            await upstream.aclose()
        if self.ejections is not None:
            await self.ejections.aclose()


_ID_PREFIX = b""
_ID_COUNTER = itertools.count()


def _reseed_request_ids() -> None:
    """A new random prefix and counter start: at import, and in every forked child (the
    gateway's workers are forked: they must not repeat each other's ids)."""
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = os.urandom(8).hex().encode()
    _ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4)))


_reseed_request_ids()
os.register_at_fork(after_in_child=_reseed_request_ids)


def _request_id() -> bytes:
    """A new ``X-Request-Id``: 32 hex digits, a random per-process prefix and a counter
    (unique without a syscall or a ``uuid4`` per request)."""
    return b"%s%016x" % (_ID_PREFIX, next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF)


def _mesh_error(exc: BaseException) -> Response:
    """The answer for the error the mesh stack gave up with (anything else is re-raised:
    the server answers it as a handler failure)."""
    if isinstance(exc, MeshError | TransportError):
        return Response.error(exc.status, _reason(exc), str(exc), layer=exc.layer)
    raise exc


def _reason(exc: BaseException) -> str:
    """A stable token for an error class: ``UpstreamTimeout`` -> ``upstream-timeout``."""
    name = type(exc).__name__
    return "".join(f"-{c.lower()}" if c.isupper() and i else c.lower()
                   for i, c in enumerate(name))
