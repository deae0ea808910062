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

Sampling is decided first, by Shoal, before any SDK object exists (``unsampled``): a hop
under a parent whose sampled flag is off, or a new trace the ratio leaves out
(``sample_ratio``, else ``OTEL_TRACES_SAMPLER``/``_ARG``, else ``DEFAULT_SAMPLE_RATIO``
= 1%), makes no span and attaches no OpenTelemetry context: it only carries its
``traceparent`` on (flags ``00``; a new trace gets new ids, a parent's is passed on
unchanged, as W3C allows a participant that records nothing), in one context variable
for the code it runs, in the header the gateway forwards, in the events it publishes.
So every hop agrees with the first one, and an unrecorded request costs a check of its
``traceparent``, not a span. Only recorded hops pay the SDK's span (``Scope``).

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

from shoal.context import MAX_TRACEPARENT, child_of, match_traceparent, new_traceparent
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

DEFAULT_SAMPLE_RATIO = 0.01
"""Share of new traces recorded when neither ``sample_ratio=`` nor ``OTEL_TRACES_SAMPLER``
says (1%, as Istio): a request whose parent was sampled is always recorded, so a client
sending ``traceparent`` with flags ``01`` gets its whole trace."""
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
            "parentbased_always_off", "parentbased_traceidratio")
"""``OTEL_TRACES_SAMPLER`` values understood; all follow a parent's decision."""

_root_ratio = DEFAULT_SAMPLE_RATIO  # share of new traces recorded (``sample_ratio``)


def sample_ratio_from_env(environ: Mapping[str, str] | None = None) -> float:
    """The share of new traces to record, from ``OTEL_TRACES_SAMPLER`` and
    ``OTEL_TRACES_SAMPLER_ARG`` (OpenTelemetry's names); ``DEFAULT_SAMPLE_RATIO`` when unset.
    Shoal decides before any SDK object exists and always follows a parent's decision, so
    ``always_on`` and ``parentbased_always_on`` mean the same here."""
    env = os.environ if environ is None else environ
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not name:
        return DEFAULT_SAMPLE_RATIO
    if name in ("always_on", "parentbased_always_on"):
        return 1.0
    if name in ("always_off", "parentbased_always_off"):
        return 0.0
    if name not in SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER: {name[:60]!r} is not a sampler Shoal "
                          f"supports (one of {', '.join(SAMPLERS)})")
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if not arg:
        return 1.0  # OpenTelemetry's default argument of the ratio samplers
    try:
        ratio = float(arg) if len(arg) <= 32 else -1.0
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:  # also NaN
        raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: {name} needs a ratio within 0..1, "
                          f"got {arg[:60]!r}")
    return ratio

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
    global SpanKind, Status, StatusCode, TraceFlags, TraceState, _attached_context
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
    _attached_context = _context_reader(otel_context)


def _context_reader(otel_context: Any) -> Callable[[], Any]:
    """What reads the attached OpenTelemetry context: the bound ``get`` of the SDK's
    context variable when it keeps it in one (the default runtime context, whose value is
    an empty ``Context`` while nothing is attached), else ``get_current`` (the public API)."""
    var = getattr(getattr(otel_context, "_RUNTIME_CONTEXT", None), "_current_context", None)
    return var.get if isinstance(var, ContextVar) else otel_context.get_current


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
    of new traces (a request's parent decision is always followed); default:
    ``sample_ratio_from_env()`` (``OTEL_TRACES_SAMPLER``, else ``DEFAULT_SAMPLE_RATIO``).

    The decision is Shoal's, made before any SDK object exists: a trace left out costs no
    span, only its ``traceparent`` (flags ``00``) carried on to the next hops."""
    global tracer, provider
    global _root_ratio
    _load_otel()
    if sample_ratio is None:
        ratio = sample_ratio_from_env()
    elif not isinstance(sample_ratio, int | float) or not 0.0 <= sample_ratio <= 1.0:
        raise ConfigError(f"tracing: sample_ratio must be within 0..1, got {sample_ratio!r}")
    else:
        ratio = float(sample_ratio)
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
    _root_ratio = ratio
    # Every span the SDK is asked for is one Shoal decided to record.
    provider = TracerProvider(resource=Resource.create({"service.name": name}),
                              sampler=ParentBased(ALWAYS_ON))
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
_Valid = tuple[str, re.Match[str], bool]  # version-00 text, its match, the sampled flag
_last_valid: tuple[Any, _Valid | None] = (None, None)


def _valid(value: Any) -> _Valid | None:
    """``value`` as version-00 text, its match and its sampled flag if it is a well-formed
    ``traceparent``, else ``None``. The last answer is kept: the events of one batch share
    their producer's ``traceparent``."""
    global _last_valid
    last = _last_valid
    if value is last[0] or (value == last[0] and value is not None):
        return last[1]
    answer = _check(value)
    _last_valid = (value, answer)
    return answer


def _check(value: Any) -> _Valid | None:
    m = match_traceparent(value)
    if m is None:
        return None
    text = m.string
    if len(text) != 55:  # a higher version, read by its first four fields, sent as 00
        text = "00" + text[2:55]
    return text, m, bool(int(m.group(4), 16) & 1)


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
    carried = _unsampled.get()
    if carried is not None:
        return carried
    _load_otel()
    span = trace.get_current_span()
    if not span.get_span_context().is_valid:
        return None
    return traceparent_of(span)


_random = random.Random()
os.register_at_fork(after_in_child=_random.seed)  # a forked child decides on its own
_attached_context: Callable[[], Any] | None = None
"""Reads OpenTelemetry's attached context (bound when it is loaded): empty, hence false,
when no span can be current, so a hop outside any trace skips the span lookup."""
_unsampled: ContextVar[str | None] = ContextVar("shoal_unsampled_traceparent", default=None)
"""Inside a trace that is not recorded: the ``traceparent`` to send on (no span exists)."""


# -- the decision, before any SDK object ------------------------------------------------
def new_trace() -> str | None:
    """A new trace: ``None`` if the ratio records it, else its ``traceparent`` (a new trace
    id and span id, flags ``00``) to carry on."""
    ratio = _root_ratio
    if ratio >= 1.0 or (ratio > 0.0 and _random.random() < ratio):
        return None
    return new_traceparent(sampled=False)


def unsampled(parent: Any) -> str | None:
    """Whether a hop under ``parent`` (a ``traceparent``, text or bytes; ``None`` or
    malformed: a new trace) goes unrecorded: then the ``traceparent`` to carry on (the
    parent's own, flags ``00``, or a new trace's), else ``None`` (record a span).

    Under an unsampled parent the hop keeps the parent's ``parent-id`` (W3C lets a
    participant that records nothing pass it on unchanged); a new trace gets new ids."""
    valid = _valid(parent)
    if valid is None:
        return new_trace()
    return None if valid[2] else valid[0]


def unsampled_here() -> str | None:
    """``unsampled`` for a hop under the current code's trace (else a new trace).

    Outside any trace (the common publish or call of a loop, a timer, a script) this costs
    two context-variable reads and the draw: OpenTelemetry's current span is looked up
    only when some context is attached (a recorded span of ours, or another library's)."""
    carried = _unsampled.get()
    if carried is not None:
        return carried
    attached = _attached_context
    if attached is None:
        _load_otel()
        attached = _attached_context
    if attached():  # type: ignore[misc]
        sc = trace.get_current_span().get_span_context()
        if sc.is_valid:
            return None if sc.trace_flags.sampled else traceparent_of_context(sc)
    return new_trace()


def carry(traceparent: str | None) -> None:
    """Make ``traceparent`` the current unsampled trace in this task's context, with no
    reset: for a loop (a partition worker) whose every iteration sets its own."""
    if _unsampled.get() is not traceparent:
        _unsampled.set(traceparent)


class Carried:
    """A hop left unrecorded, for a ``with`` block: its ``traceparent`` is current
    (``current_traceparent()``, and what calls and publishes inside send on); no span."""

    __slots__ = ("_token", "traceparent")
    span = None

    def __init__(self, traceparent: str) -> None:
        self.traceparent = traceparent

    def __enter__(self) -> Carried:
        self._token = _unsampled.set(self.traceparent)
        return self

    def __exit__(self, *exc: object) -> None:
        _unsampled.reset(self._token)

    def set_status(self, status: int) -> None:
        """Nothing is recorded."""

    def rename(self, name: str, route: str) -> None:
        """Nothing is recorded."""


class Scope:
    """A recorded span current for a ``with`` block; an exception marks it failed and goes
    on. Made only for hops the decision (``unsampled``) records. ``parent``: the remote or
    in-process span it continues (``None``: the root of a new trace)."""

    __slots__ = ("_token", "_unsampled_token", "span", "traceparent")

    def __init__(self, name: str, kind: SpanKind, parent: SpanContext | None,
                 attributes: Callable[[], Mapping[str, Any]] | None = None,
                 link_parent: bool = False) -> None:
        assert tracer is not None, "tracing is off"
        ctx = otel_context.Context() if parent is None else trace.set_span_in_context(
            NonRecordingSpan(parent))
        links = [Link(parent)] if link_parent and parent is not None else None
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
        if exc is not None:
            s.record_exception(exc)
            s.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
        s.end()
        otel_context.detach(self._token)

    def set_status(self, status: int) -> None:
        """Record an HTTP status (5xx marks the span failed)."""
        set_status(self.span, status)

    def rename(self, name: str, route: str) -> None:
        """Name the span after the route that took the request."""
        self.span.update_name(name)
        self.span.set_attribute("http.route", route)


def _remote(parent: Any) -> SpanContext | None:
    """The sampled remote span a recorded hop continues (``None``: a new trace)."""
    valid = _valid(parent)
    if valid is None:
        return None
    m = valid[1]
    return SpanContext(int(m.group(2), 16), int(m.group(3), 16), True, TraceFlags(1))


def _here() -> SpanContext | None:
    """The in-process span a recorded hop continues (``None``: a new trace)."""
    sc = trace.get_current_span().get_span_context()
    return sc if sc.is_valid else None


@contextlib.contextmanager
def span(name: str, kind: SpanKind, parent: otel_context.Context | None = None,
         attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """An always-recorded span, current inside the block (tests, user code)."""
    assert tracer is not None, "tracing is off"
    with tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes,
                                      record_exception=True,
                                      set_status_on_exception=True) as s:
        yield s


# -- the hooks' helpers: each decides first, and makes a span only when it records ----
def producer_span(topic: str, traceparent: Any = None) -> Scope | Carried:
    """A ``PRODUCER`` span around a publish; its ``traceparent`` goes into the events. A
    caller's own ``traceparent`` extension is the parent, else the current span."""
    carried = unsampled_here() if traceparent is None else unsampled(traceparent)
    if carried is not None:
        return Carried(carried)
    return producer_scope(topic, traceparent)


def producer_scope(topic: str, traceparent: Any = None) -> Scope:
    """``producer_span`` once decided recorded (``unsampled``/``unsampled_here``)."""
    _load_otel()
    return Scope(f"{topic} publish", SpanKind.PRODUCER,
                 _here() if traceparent is None else _remote(traceparent), lambda: {
                     "messaging.system": "shoal", "messaging.destination.name": topic,
                     "messaging.operation.type": "send"})


def consumer_span(topic: str, group: str, event: Any, partition: int, offset: int) -> Scope:
    """A recorded ``CONSUMER`` span around one handling of ``event``, child of its
    ``traceparent`` (and linked to it, for tools that draw messaging as links); a new
    trace without one. The caller decided (``unsampled``) that this hop is recorded."""
    _load_otel()
    parent = event.extensions.get("traceparent")
    return Scope(f"{topic} process", SpanKind.CONSUMER, _remote(parent), lambda: {
        "messaging.system": "shoal", "messaging.destination.name": topic,
        "messaging.consumer.group.name": group, "messaging.message.id": event.id,
        "messaging.destination.partition.id": str(partition),
        "messaging.operation.type": "process", "shoal.offset": offset}, link_parent=True)


def client_span(service: str, method: str, target: str, traceparent: Any = None
                ) -> Scope | Carried:
    """A ``CLIENT`` span around a mesh call; send its ``traceparent``. A ``traceparent`` the
    caller gave is the parent, else the current span."""
    carried = unsampled_here() if traceparent is None else unsampled(traceparent)
    if carried is not None:
        return Carried(carried)
    return client_scope(service, method, target, traceparent)


def client_scope(service: str, method: str, target: str, traceparent: Any = None) -> Scope:
    """``client_span`` once decided recorded (``unsampled``/``unsampled_here``)."""
    _load_otel()
    return Scope(f"{method} {service}", SpanKind.CLIENT,
                 _here() if traceparent is None else _remote(traceparent), lambda: {
                     "http.request.method": method, "server.address": service,
                     "url.path": target.split("?", 1)[0][:256], "shoal.service": service})


def server_span(service: str, method: str, path: str, traceparent: bytes | str | None
                ) -> Scope | Carried:
    """A ``SERVER`` span for one request, continuing its ``traceparent`` (else a new trace)."""
    carried = unsampled(traceparent)
    if carried is not None:
        return Carried(carried)
    return server_scope(service, method, path, traceparent)


def server_scope(service: str, method: str, path: str, traceparent: bytes | str | None
                 ) -> Scope:
    """``server_span`` once decided recorded (``unsampled``)."""
    _load_otel()
    return Scope(f"{method} {service}", SpanKind.SERVER, _remote(traceparent),
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
