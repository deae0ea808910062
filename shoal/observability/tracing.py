"""OpenTelemetry tracing: one W3C trace from the gateway through calls, events and handlers.

Off by default, and then free: every hook tests the module attribute ``tracer`` against
``None`` and does nothing else (no span objects, no context switches). ``enable_tracing()``
turns it on with the OTLP/HTTP exporter when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``endpoint=``) says where, or with any exporter given (tests use the in-memory one).

Where spans come from:

* a server (``observe_handler`` in ``shoal.observability.http``, the gateway and services):
  a ``SERVER`` span per request, continuing an incoming ``traceparent`` header, which is
  replaced by the server span's own so the next hop is its child;
* ``MeshClient.request``: a ``CLIENT`` span per call, injecting ``traceparent``;
* ``EventBus.publish``/``publish_many``: a ``PRODUCER`` span whose context travels in the
  event's ``traceparent`` extension (CloudEvents distributed tracing); an explicit
  ``traceparent`` given by the caller is the parent;
* a subscription's handler: a ``CONSUMER`` span *parented* on the event's ``traceparent``
  (so the order's trace contains its consumers: one trace per flow, not one per hop) and
  current while the handler runs, so its own calls and publishes join the trace.

Decision: the provider is Shoal's own (``provider``), not the process-global one, so
enabling Shoal's tracing never fights another library over the global; the current span
is OpenTelemetry's context, so spans of other instrumentations nest with ours.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # at run time, _load_otel() binds these names
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SimpleSpanProcessor,
        SpanExporter,
    )
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
    from opentelemetry.trace import (
        Link,
        NonRecordingSpan,
        Span,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
        TraceState,
    )

from shoal.context import MAX_TRACEPARENT, child_of, match_traceparent
from shoal.errors import ConfigError

__all__ = [
    "current_traceparent",
    "disable_tracing",
    "enable_tracing",
    "enable_tracing_from_env",
    "extract",
    "provider",
    "tracer",
]

tracer: trace.Tracer | None = None
"""Shoal's tracer, or ``None`` when tracing is off (hooks test exactly this)."""
provider: TracerProvider | None = None
"""The provider behind ``tracer`` (flush it with ``provider.force_flush()``)."""

_root_ratio = 1.0  # share of new traces recorded (``sample_ratio``)

_OTEL_NAMES = ("otel_context", "trace", "Resource", "TracerProvider", "BatchSpanProcessor",
               "SimpleSpanProcessor", "ALWAYS_ON", "ParentBased", "Link", "NonRecordingSpan",
               "SpanContext", "SpanKind", "Status", "StatusCode", "TraceFlags", "TraceState")


def _load_otel() -> None:
    """Import OpenTelemetry into this module's globals, once.

    Deferred because tracing is off by default and the SDK costs every process that
    imports the bus or the mesh ~30 ms of CPU at start (nine at once under ``shoal up``);
    every function below that touches OpenTelemetry calls this first, and the hooks only
    reach them when ``tracer`` is set (which ``enable_tracing`` does after loading).
    """
    global otel_context, trace, Resource, TracerProvider, BatchSpanProcessor
    global SimpleSpanProcessor, ALWAYS_ON, ParentBased, Link, NonRecordingSpan, SpanContext
    global SpanKind, Status, StatusCode, TraceFlags, TraceState
    if "trace" in globals():
        return
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
    from opentelemetry.trace import (
        Link,
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
        TraceState,
    )


def __getattr__(name: str) -> Any:
    """OpenTelemetry names re-exported here (``tracing.SpanKind``) load it on first use."""
    if name in _OTEL_NAMES:
        _load_otel()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enable_tracing(
    exporter: SpanExporter | None = None,
    *,
    endpoint: str | None = None,
    service_name: str | None = None,
    batch: bool | None = None,
    sample_ratio: float | None = None,
) -> trace.Tracer:
    """Turn tracing on: spans go to ``exporter``, or OTLP/HTTP at ``endpoint`` (else
    ``$OTEL_EXPORTER_OTLP_ENDPOINT``). ``batch`` (default: on for OTLP, off for a given
    exporter) batches exports in a background thread. ``sample_ratio`` keeps that share
    of new traces (a traced request's parent decision is always followed); default: the
    ``OTEL_TRACES_SAMPLER`` environment, else every trace."""
    global tracer, provider
    global _root_ratio
    _load_otel()
    sampler = None
    _root_ratio = 1.0
    if sample_ratio is not None:
        if not isinstance(sample_ratio, int | float) or not 0.0 <= sample_ratio <= 1.0:
            raise ConfigError(f"tracing: sample_ratio must be within 0..1, got {sample_ratio!r}")
        _root_ratio = float(sample_ratio)  # new traces are sampled in Scope, before the SDK
        sampler = ParentBased(ALWAYS_ON)
    if exporter is None:
        url = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if not url:
            raise ConfigError("tracing: give an exporter, endpoint=, or set "
                              "OTEL_EXPORTER_OTLP_ENDPOINT")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"tracing: OTLP endpoint must be an http(s) URL, got {url!r}")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=url.rstrip("/") + "/v1/traces")
        batch = True if batch is None else batch
    name = service_name or os.environ.get("OTEL_SERVICE_NAME") or "shoal"
    if provider is not None:
        provider.shutdown()
    provider = TracerProvider(resource=Resource.create({"service.name": name}), sampler=sampler)
    processor: SpanProcessor = BatchSpanProcessor(exporter) if batch else \
        SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("shoal")
    return tracer


def enable_tracing_from_env(service_name: str | None = None) -> trace.Tracer | None:
    """Tracing on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (and ``OTEL_SDK_DISABLED`` is
    not true); else off, and ``None``."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None
    return enable_tracing(service_name=service_name)


def disable_tracing() -> None:
    """Turn tracing off (flushing what was recorded)."""
    global tracer, provider
    if provider is not None:
        provider.shutdown()
    tracer = provider = None


# -- propagation ------------------------------------------------------------------------
_last_valid: tuple[Any, tuple[str, re.Match[str]] | None] = (None, None)


def _valid(value: Any) -> tuple[str, re.Match[str]] | None:
    """``value`` as text and its match if it is a well-formed ``traceparent``. The last
    answer is kept: the events of one batch share their producer's ``traceparent``."""
    global _last_valid
    last = _last_valid
    if value is last[0] or (value == last[0] and value is not None):
        return last[1]
    answer = _check(value)
    _last_valid = (value, answer)
    return answer


def _check(value: Any) -> tuple[str, re.Match[str]] | None:
    m = match_traceparent(value)
    return None if m is None else (m.string, m)


def parse_traceparent(value: str | bytes | None) -> SpanContext | None:
    """The remote span a W3C ``traceparent`` names, or ``None`` (absent, malformed, all-zero
    ids, version ``ff``, oversized): a bad header starts a new trace, never an error."""
    _load_otel()
    valid = _valid(value)
    if valid is None:
        return None
    m = valid[1]
    return SpanContext(int(m.group(2), 16), int(m.group(3), 16), is_remote=True,
                       trace_flags=TraceFlags(int(m.group(4), 16) & 1))


def extract(traceparent: str | bytes | None, tracestate: str | bytes | None = None
            ) -> otel_context.Context | None:
    """The remote parent a ``traceparent`` names as an OpenTelemetry context, or ``None``."""
    sc = parse_traceparent(traceparent)
    if sc is None:
        return None
    if tracestate and len(tracestate) <= MAX_TRACEPARENT:
        if isinstance(tracestate, bytes):
            tracestate = tracestate.decode("latin-1")
        sc = SpanContext(sc.trace_id, sc.span_id, True, sc.trace_flags,
                         TraceState.from_header([tracestate]))
    return trace.set_span_in_context(NonRecordingSpan(sc))


def traceparent_of(span: Span) -> str:
    """``span``'s context as a ``traceparent`` value."""
    return traceparent_of_context(span.get_span_context())


def traceparent_of_context(sc: trace.SpanContext) -> str:
    """A span context as a ``traceparent`` value."""
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def current_traceparent() -> str | None:
    """The ``traceparent`` the current code would send on, or ``None`` outside any trace."""
    _load_otel()
    unsampled = _unsampled.get()
    if unsampled is not None:
        return unsampled
    span = trace.get_current_span()
    if not span.get_span_context().is_valid:
        return None
    return traceparent_of(span)


_random = random.Random()
_IN_PROCESS = object()  # Scope's default parent: the current span
_unsampled: ContextVar[str | None] = ContextVar("shoal_unsampled_traceparent", default=None)
"""Inside a trace that is not recorded: the ``traceparent`` to send on (no span exists)."""


class Scope:
    """A span current for a ``with`` block; an exception marks it failed and goes on.

    The sampling decision is made here before any SDK object exists: under a parent that
    was not sampled, or for a new trace the root ratio leaves out, no span is made at all
    and OpenTelemetry's context is not touched; the block runs with the ``traceparent`` to
    send on (sampled flag off) in one context variable, so a trace that is not recorded
    costs a regular expression and a variable, not a span. ``parent`` is a ``traceparent``
    (text or bytes; ``None`` or malformed: a new trace), or by default the current span.
    """

    __slots__ = ("_token", "_unsampled_token", "span", "traceparent")

    def __init__(self, name: str, kind: SpanKind, parent: Any = _IN_PROCESS,
                 attributes: Callable[[], Mapping[str, Any]] | None = None,
                 link_parent: bool = False) -> None:
        _load_otel()
        self.span = None
        self._token = None
        sc: SpanContext | None = None
        if parent is _IN_PROCESS:
            unsampled = _unsampled.get()
            if unsampled is not None:
                self.traceparent = unsampled
                self._unsampled_token = None  # already in place
                return
            current = trace.get_current_span().get_span_context()
            sc = current if current.is_valid else None
        else:
            valid = _valid(parent)
            if valid is not None:
                text, m = valid
                if not int(m.group(4), 16) & 1:  # the parent was not sampled: follow it
                    self.traceparent = text if len(text) == 55 else text[:55]
                    self._unsampled_token = _unsampled.set(self.traceparent)
                    return
                sc = SpanContext(int(m.group(2), 16), int(m.group(3), 16), True,
                                 TraceFlags(1))
        if sc is None and _root_ratio < 1.0 and _random.random() >= _root_ratio:
            self.traceparent = (f"00-{_random.getrandbits(128) or 1:032x}-"
                                f"{_random.getrandbits(64) or 1:016x}-00")
            self._unsampled_token = _unsampled.set(self.traceparent)
            return
        if sc is not None and not sc.trace_flags.sampled:  # an in-process unsampled span
            self.traceparent = traceparent_of_context(sc)
            self._unsampled_token = None
            return
        assert tracer is not None, "tracing is off"
        ctx = otel_context.Context() if sc is None else trace.set_span_in_context(
            NonRecordingSpan(sc))
        links = [Link(sc)] if link_parent and sc is not None else None
        s = self.span = tracer.start_span(name, ctx, kind, links=links)
        if attributes is not None and s.is_recording():
            s.set_attributes(attributes())
        self.traceparent = traceparent_of(s)
        self._token = otel_context.attach(trace.set_span_in_context(s))
        self._unsampled_token = _unsampled.set(None) if _unsampled.get() is not None else None

    def __enter__(self) -> Scope:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> None:
        if self._unsampled_token is not None:
            _unsampled.reset(self._unsampled_token)
        s = self.span
        if s is not None:
            if exc is not None:
                s.record_exception(exc)
                s.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
            s.end()
            otel_context.detach(self._token)  # type: ignore[arg-type]

    def set_status(self, status: int) -> None:
        """Record an HTTP status (5xx marks the span failed)."""
        if self.span is not None:
            set_status(self.span, status)

    def rename(self, name: str, route: str) -> None:
        """Name the span after the route that took the request."""
        if self.span is not None:
            self.span.update_name(name)
            self.span.set_attribute("http.route", route)


@contextlib.contextmanager
def span(name: str, kind: SpanKind, parent: otel_context.Context | None = None,
         attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """An always-recorded span, current inside the block (tests, user code)."""
    assert tracer is not None, "tracing is off"
    with tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes,
                                      record_exception=True,
                                      set_status_on_exception=True) as s:
        yield s


# -- the hooks' helpers -----------------------------------------------------------------
def producer_span(topic: str, traceparent: Any = None) -> Scope:
    """A ``PRODUCER`` span around a publish; its ``traceparent`` goes into the events. A
    caller's own ``traceparent`` extension is the parent, else the current span."""
    _load_otel()
    parent = _IN_PROCESS if traceparent is None else traceparent
    return Scope(f"{topic} publish", SpanKind.PRODUCER, parent, lambda: {
        "messaging.system": "shoal", "messaging.destination.name": topic,
        "messaging.operation.type": "send"})


def consumer_span(topic: str, group: str, event: Any, partition: int, offset: int) -> Scope:
    """A ``CONSUMER`` span around one handling of ``event``, child of its ``traceparent``
    (and linked to it, for tools that draw messaging as links); a new trace without one."""
    _load_otel()
    parent = event.extensions.get("traceparent")
    return Scope(f"{topic} process", SpanKind.CONSUMER, parent, lambda: {
        "messaging.system": "shoal", "messaging.destination.name": topic,
        "messaging.consumer.group.name": group, "messaging.message.id": event.id,
        "messaging.destination.partition.id": str(partition),
        "messaging.operation.type": "process", "shoal.offset": offset}, link_parent=True)


def client_span(service: str, method: str, target: str, traceparent: Any = None) -> Scope:
    """A ``CLIENT`` span around a mesh call; send its ``traceparent``. A ``traceparent`` the
    caller gave is the parent, else the current span."""
    _load_otel()
    parent = _IN_PROCESS if traceparent is None else traceparent
    return Scope(f"{method} {service}", SpanKind.CLIENT, parent, lambda: {
        "http.request.method": method, "server.address": service,
        "url.path": target.split("?", 1)[0][:256], "shoal.service": service})


def server_span(service: str, method: str, path: str, traceparent: bytes | str | None
                ) -> Scope:
    """A ``SERVER`` span for one request, continuing its ``traceparent`` (else a new trace)."""
    _load_otel()
    return Scope(f"{method} {service}", SpanKind.SERVER, traceparent,
                 lambda: {"http.request.method": method, "url.path": path[:256],
                          "shoal.service": service})


def hop(parent: str | None) -> str:
    """The ``traceparent`` a service's handler runs under: with tracing on, the current
    span's (the server or consumer span around it), else ``shoal.context.child_of``."""
    if tracer is not None:
        current = current_traceparent()
        if current is not None:
            return current
    return child_of(parent)


def set_status(s: Span, status: int) -> None:
    """Record an HTTP status on ``s`` (5xx marks it failed)."""
    _load_otel()
    s.set_attribute("http.response.status_code", status)
    if status >= 500:
        s.set_status(Status(StatusCode.ERROR))
