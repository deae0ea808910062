"""Metrics and traces for HTTP servers: the gateway, ``HttpServer`` handlers, ASGI apps,
and the ``/metrics`` endpoint for each.

* ``observe_gateway(gateway)``: an ``HttpServer`` handler that runs ``gateway.handle`` with
  a server span and counts each request under its route (the route's name, else
  ``routes[i]``: bounded, never the raw path) and destination service.
* ``observe_handler(handler, service, route_of=...)``: the same for any ``HttpServer``
  handler; ``route_of(request)`` must return a template (default ``"*"``).
* ``ObservedASGI(app, service)``: the same for an ASGI app; the route label is the matched
  Starlette route's path template (``/orders/{id}``), else ``"unmatched"``.
* ``with_metrics(handler)`` / ``metrics_asgi()``: answer ``GET /metrics`` in Prometheus'
  text format and pass everything else on.

Durations run until the handler returned the response head (a streamed body's transfer
is not included): the time the service took to answer, not the client's download.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shoal.gateway.server import Request, Response
from shoal.observability import metrics as _metrics
from shoal.observability import tracing as _tracing

__all__ = ["MetricsASGI", "ObservedASGI", "metrics_asgi", "observe_gateway", "observe_handler",
           "with_metrics"]

Handler = Callable[[Request], Any]
METRICS_PATH = b"/metrics"
EVENTS_ROUTE = "/events/{topic}"


def metrics_text(metrics: _metrics.Metrics | None = None) -> bytes:
    """The Prometheus text exposition of ``metrics`` (default: the process's)."""
    m = metrics or _metrics.active()
    if m is None:
        return b"# shoal metrics are off (shoal.observability.enable_metrics())\n"
    return generate_latest(m.registry)


def metrics_response(metrics: _metrics.Metrics | None = None) -> Response:
    """``metrics_text`` as an ``HttpServer`` response."""
    return Response(metrics_text(metrics), 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())])


def with_metrics(handler: Handler, *, metrics: _metrics.Metrics | None = None,
                 path: bytes = METRICS_PATH) -> Handler:
    """``handler`` that also answers ``GET path`` with the metrics."""

    def answer(request: Request) -> Any:
        if request.raw_path == path and request.method in ("GET", "HEAD"):
            return metrics_response(metrics)
        return handler(request)

    return answer


class _Exchange:
    """What one request turned out to be, filled in as the handler learns it."""

    __slots__ = ("route", "series")

    def __init__(self) -> None:
        self.route: str | None = None
        self.series: _metrics.RouteSeries | None = None


_exchange: ContextVar[_Exchange | None] = ContextVar("shoal_exchange", default=None)


def observe_gateway(gateway: Any, *, metrics: _metrics.Metrics | None = None) -> Handler:
    """``gateway.handle`` with request metrics and a server span per request."""
    m = metrics or _metrics.active()
    cache: dict[tuple[Any, str], _metrics.RouteSeries] = {}
    labels: dict[Any, str] = {}  # route -> its label (routes hash by identity)

    def label_of(route: Any) -> str:
        label = labels.get(route)
        if label is None:
            label = labels[route] = route.name or f"routes[{route.index}]"
        return label

    def on_route(route: Any, service: str) -> None:
        exchange = _exchange.get()
        if exchange is None:
            return
        if m is None:
            exchange.route = label_of(route)
            return
        series = cache.get((route, service))
        if series is None:
            series = cache[(route, service)] = m.route(service, label_of(route), "gateway")
        series.in_flight += 1
        exchange.series = series
        exchange.route = series.route

    gateway.on_route = on_route
    handle = gateway.handle
    if m is None and _tracing.tracer is None:
        return handle  # nothing to observe: no cost

    def fallback(request: Request) -> _metrics.RouteSeries | None:
        if m is None:
            return None
        if request.raw_path.startswith(b"/events/"):
            return m.route("gateway", EVENTS_ROUTE, "gateway")
        return m.route("gateway", "unmatched", "gateway")

    observed = _observed(handle, "gateway", fallback, in_context=False)
    fast = getattr(gateway, "fast_handle", None)
    if fast is None:
        return observed
    return _ObservedGateway(observed, fast, fallback).handle


class _ObservedGateway:
    """The observed gateway with its fast path kept: ``handle`` is the coroutine path
    (``_observed``), ``fast_handle`` counts a request the same way without a task. A request
    whose trace is recorded (1% of new traces by default) takes ``handle``: its span needs
    a context around the whole exchange. ``HttpServer`` pairs the bound ``handle`` with
    ``fast_handle`` (``shoal.gateway.server``)."""

    __slots__ = ("_fallback", "_fast", "_observed")

    def __init__(self, observed: Callable[..., Any], fast: Callable[..., Any],
                 fallback: Callable[[Request], _metrics.RouteSeries | None]) -> None:
        self._observed, self._fast, self._fallback = observed, fast, fallback

    def handle(self, request: Request) -> Any:
        """The coroutine path (``_observed``)."""
        return self._observed(request)

    def fast_handle(self, request: Request, answer: Callable[[Request, Any], None]) -> Any:
        """``Gateway.fast_handle`` with the request counted under its route, as ``handle``
        counts it; a recorded trace goes to ``handle``.

        Per request one ``_FastExchange`` is all it adds: it is the route's note (for
        ``on_route``), the callback the gateway answers through, and, while the fast try is
        in flight, what the server would cancel. Measured by
        ``bench/observability_hotpath.py`` (``gateway-fast``)."""
        if _tracing.tracer is not None and _unrecorded(request) is None:
            return self._observed(request, True)  # decided once: recorded
        exchange = _FastExchange(request, answer, self._fallback)
        token = _exchange.set(exchange)
        try:
            result = self._fast(request, exchange.deliver)
        except BaseException:
            exchange.finish(None)
            raise
        finally:
            _exchange.reset(token)
        if getattr(result, "answer_later", False) is True:
            exchange.pending = result
            return exchange
        if hasattr(result, "__await__"):
            return exchange.later(result)  # the coroutine path's rest
        exchange.finish(result)
        return result


class _FastExchange(_Exchange):
    """One request on the observed fast path, from ``fast_handle`` to its answer: the
    route's note, ``deliver`` (the callback the gateway answers through, counting the
    request once), and the fast try the server may cancel (a client that left: the request
    is then counted, as 500). No reference cycle outlives the answer."""

    __slots__ = ("_answer", "_fallback", "_request", "_start", "pending")
    answer_later = True

    def __init__(self, request: Request, answer: Callable[[Request, Any], None],
                 fallback: Callable[[Request], _metrics.RouteSeries | None]) -> None:
        self.route = self.series = self.pending = None
        self._request, self._answer, self._fallback = request, answer, fallback
        self._start = time.perf_counter()

    def deliver(self, request: Request, resp: Any) -> None:
        """The fast try's answer (a retry in a task is counted when it ends)."""
        self.pending = None
        if hasattr(resp, "__await__"):
            self._answer(request, self.later(resp))
        else:
            self.finish(resp)
            self._answer(request, resp)

    async def later(self, pending: Awaitable[Any]) -> Any:
        """``pending`` (the rest on the coroutine path), counted when it ends."""
        resp = None
        try:
            resp = await pending
            return resp
        finally:
            self.finish(resp)

    def finish(self, resp: Any) -> None:
        """Count the request once: its status (500 when it ended without a response)."""
        series = self.series
        if series is not None:
            self.series = None
            series.in_flight -= 1
        elif self.route is not None:
            return  # counted already (or metrics are off)
        else:
            series = self._fallback(self._request)
            self.route = "-"
        if series is not None:
            series.finished(getattr(resp, "status", 500), time.perf_counter() - self._start)

    def done(self) -> bool:
        """Whether the fast try ended (the server asks before cancelling)."""
        pending = self.pending
        return pending is None or pending.done()

    def cancel(self, msg: object = None) -> bool:
        """Cancel the fast try (the client left) and count the request."""
        pending = self.pending
        cancelled = pending is not None and pending.cancel(msg)
        if cancelled:
            self.pending = None
            self.finish(None)
        return cancelled


def observe_handler(handler: Handler, service: str, *,
                    route_of: Callable[[Request], str] | None = None,
                    metrics: _metrics.Metrics | None = None) -> Handler:
    """``handler`` with request metrics (``service``, ``route_of(request)``) and spans."""
    m = metrics or _metrics.active()
    table: dict[str, _metrics.RouteSeries] = {}

    async def call(request: Request) -> Any:
        exchange = _exchange.get()
        if exchange is not None and exchange.route is None:
            exchange.route = route = route_of(request) if route_of is not None else "*"
            if m is not None:
                series = table.get(route)
                if series is None:
                    series = table[route] = m.route(service, route)
                series.in_flight += 1
                exchange.series = series
        resp = handler(request)
        if isinstance(resp, Awaitable):
            resp = await resp
        return resp

    return _observed(call, service, None)


def _observed(handle: Callable[[Request], Awaitable[Any]], service: str,
              fallback: Callable[[Request], _metrics.RouteSeries | None] | None,
              in_context: bool = True) -> Handler:
    async def observed(request: Request, recorded: bool = False) -> Any:
        exchange = _Exchange()
        token = _exchange.set(exchange)
        start = time.perf_counter()
        status = 500
        try:
            scope = None if _tracing.tracer is None else _server_scope(
                request, service, in_context, recorded)
            if scope is None:
                resp = await handle(request)
            else:
                with scope:
                    resp = await handle(request)
                    if scope.span is not None:
                        if exchange.route is not None:
                            scope.rename(f"{request.method} {exchange.route}", exchange.route)
                        scope.set_status(resp.status)
            status = resp.status
            return resp
        finally:
            _exchange.reset(token)
            series = exchange.series
            if series is not None:
                series.in_flight -= 1
            elif fallback is not None:
                series = fallback(request)
            if series is not None:
                series.finished(status, time.perf_counter() - start)

    return observed


def _server_scope(request: Request, service: str, in_context: bool, recorded: bool = False
                  ) -> _tracing.Scope | _tracing.Carried | None:
    """The tracing of one request, decided before it runs: a recorded ``SERVER`` span
    continuing its ``traceparent``, whose own replaces the request's header (the next
    hop's parent); or, left unrecorded, no span: the header goes on as it came (flags
    ``00``), or a new unsampled trace's when it had none or a malformed one. Then
    ``in_context`` makes that ``traceparent`` current for the handler (whose calls and
    publishes send it on); the gateway, forwarding the header itself, needs nothing."""
    carried = None if recorded else _unrecorded(request)
    if carried is None:
        headers = request.headers
        scope = _tracing.server_scope(service, request.method, request.path,
                                      headers.get(b"traceparent"))
        _set_traceparent(headers, scope.traceparent.encode())
        return scope
    return _tracing.Carried(carried) if in_context else None


def _unrecorded(request: Request) -> str | None:
    """Whether ``request``'s hop goes unrecorded: then its ``traceparent`` (the one it came
    with, or a new unsampled trace's, which replaces a missing or malformed header);
    ``None``: record it. Decided once per request (a new trace's draw is random)."""
    headers = request.headers
    for name, given in headers:  # the first ``traceparent``, as ``Headers.get`` finds it
        if len(name) == 11 and name.lower() == b"traceparent":
            carried = _tracing.unsampled(given)
            if carried is not None:
                own = carried.encode()
                if own != given:
                    _set_traceparent(headers, own)
            return carried
    carried = _tracing.new_trace()  # none given: no header to look for or replace
    if carried is not None:
        headers.append((b"traceparent", carried.encode()))
    return carried


def _set_traceparent(headers: Any, value: bytes) -> None:
    """Replace the request's ``traceparent`` header with ``value`` (or add it)."""
    for i, (name, _) in enumerate(headers):
        if name.lower() == b"traceparent":
            headers[i] = (name, value)
            return
    headers.append((b"traceparent", value))


class ObservedASGI:
    """An ASGI app with request metrics (route = the matched Starlette template) and a
    server span per request continuing ``traceparent``."""

    def __init__(self, app: Any, service: str, *, metrics: _metrics.Metrics | None = None,
                 metrics_path: str | None = "/metrics",
                 skip: tuple[str, ...] = ("/healthz", "/readyz")) -> None:
        self.app = app
        self.service = service
        self.metrics = metrics or _metrics.active()
        self.metrics_path = metrics_path
        self.skip = skip  # probes: neither counted nor traced
        self._series: dict[str, _metrics.RouteSeries] = {}
        self._exposition = MetricsASGI(self.metrics)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (self.metrics is None and _tracing.tracer is None):
            await self.app(scope, receive, send)
            return
        path = scope.get("path")
        if path == self.metrics_path and self.metrics is not None:
            await self._exposition(scope, receive, send)
            return
        if path in self.skip:
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if _tracing.tracer is None:
                await self.app(scope, receive, sending)
            else:
                await self._traced(scope, receive, sending, lambda: status)
        finally:
            if self.metrics is not None:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                series = self._series.get(route)
                if series is None:
                    series = self._series[route] = self.metrics.route(self.service, route)
                series.finished(status, time.perf_counter() - start)

    async def _traced(self, scope: dict[str, Any], receive: Any, send: Any,
                      status: Callable[[], int]) -> None:
        traceparent = next((v for k, v in scope.get("headers", ())
                            if k.lower() == b"traceparent"), None)
        method = scope.get("method", "GET")
        with _tracing.server_span(self.service, method, str(scope.get("path", "")),
                                  traceparent) as span:
            await self.app(scope, receive, send)
            route = getattr(scope.get("route"), "path", None)
            if route:
                span.rename(f"{method} {route}", route)
            span.set_status(status())


class MetricsASGI:
    """An ASGI app answering every HTTP request with the metrics (route or mount it at
    ``/metrics``; an object, not a function, so Starlette routes treat it as an app)."""

    def __init__(self, metrics: _metrics.Metrics | None = None) -> None:
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = metrics_text(self.metrics)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def metrics_asgi(metrics: _metrics.Metrics | None = None) -> MetricsASGI:
    """The ``/metrics`` ASGI app for ``metrics`` (default: the process's)."""
    return MetricsASGI(metrics)
