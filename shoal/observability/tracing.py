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
import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

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

_propagator = TraceContextTextMapPropagator()
MAX_TRACEPARENT = 512  # a longer header is not a traceparent: ignored, not parsed


def enable_tracing(
    exporter: SpanExporter | None = None,
    *,
    endpoint: str | None = None,
    service_name: str | None = None,
    batch: bool | None = None,
) -> trace.Tracer:
    """Turn tracing on: spans go to ``exporter``, or OTLP/HTTP at ``endpoint`` (else
    ``$OTEL_EXPORTER_OTLP_ENDPOINT``). ``batch`` (default: on for OTLP, off for a given
    exporter) batches exports in a background thread."""
    global tracer, provider
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
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
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
def extract(traceparent: str | bytes | None, tracestate: str | bytes | None = None
            ) -> otel_context.Context | None:
    """The remote parent a ``traceparent`` names, or ``None`` (absent, malformed, huge)."""
    if not traceparent or len(traceparent) > MAX_TRACEPARENT:
        return None
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("latin-1")
    carrier = {"traceparent": traceparent}
    if tracestate and len(tracestate) <= MAX_TRACEPARENT:
        carrier["tracestate"] = tracestate.decode("latin-1") if isinstance(
            tracestate, bytes) else tracestate
    ctx = _propagator.extract(carrier)
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def traceparent_of(span: Span) -> str:
    """``span``'s context as a ``traceparent`` value."""
    return traceparent_of_context(span.get_span_context())


def traceparent_of_context(sc: trace.SpanContext) -> str:
    """A span context as a ``traceparent`` value."""
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def current_traceparent() -> str | None:
    """The current span's ``traceparent``, or ``None`` when there is no valid span."""
    span = trace.get_current_span()
    if not span.get_span_context().is_valid:
        return None
    return traceparent_of(span)


@contextlib.contextmanager
def span(name: str, kind: SpanKind, parent: otel_context.Context | None = None,
         attributes: Mapping[str, Any] | None = None, links: list[Link] | None = None
         ) -> Iterator[Span]:
    """A span, current inside the block; an exception marks it failed and goes on."""
    assert tracer is not None, "tracing is off"
    with tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes,
                                      links=links, record_exception=True,
                                      set_status_on_exception=True) as s:
        yield s


# -- the hooks' helpers -----------------------------------------------------------------
@contextlib.contextmanager
def producer_span(topic: str, extensions: Mapping[str, Any] | None
                  ) -> Iterator[dict[str, Any]]:
    """A ``PRODUCER`` span around a publish; yields the extensions to publish with (the
    caller's, plus ``traceparent`` = this span's). A caller's ``traceparent`` is the parent."""
    ext = dict(extensions or {})
    parent = extract(ext.get("traceparent")) if "traceparent" in ext else None
    with span(f"{topic} publish", SpanKind.PRODUCER, parent,
              {"messaging.system": "shoal", "messaging.destination.name": topic,
               "messaging.operation.type": "send"}) as s:
        ext["traceparent"] = traceparent_of(s)
        yield ext


@contextlib.contextmanager
def consumer_span(topic: str, group: str, event: Any, partition: int, offset: int
                  ) -> Iterator[Span]:
    """A ``CONSUMER`` span around one handling of ``event``, child of its ``traceparent``
    (and linked to it, for tools that draw messaging as links)."""
    parent = extract(event.extensions.get("traceparent"))
    links = None
    if parent is not None:
        links = [Link(trace.get_current_span(parent).get_span_context())]
    attributes = {"messaging.system": "shoal", "messaging.destination.name": topic,
                  "messaging.consumer.group.name": group, "messaging.message.id": event.id,
                  "messaging.destination.partition.id": str(partition),
                  "messaging.operation.type": "process", "shoal.offset": offset}
    with span(f"{topic} process", SpanKind.CONSUMER, parent or otel_context.Context(),
              attributes, links) as s:
        yield s


@contextlib.contextmanager
def client_span(service: str, method: str, target: str) -> Iterator[str]:
    """A ``CLIENT`` span around a mesh call; yields the ``traceparent`` to send."""
    path = target.split("?", 1)[0]
    with span(f"{method} {service}", SpanKind.CLIENT, None,
              {"http.request.method": method, "server.address": service,
               "url.path": path[:256], "shoal.service": service}) as s:
        yield traceparent_of(s)


def with_traceparent(messages: Iterable[Any], traceparent: str, message_type: type
                     ) -> list[Any]:
    """``publish_many``'s items, each carrying ``traceparent`` unless it has its own."""
    out = []
    for m in messages:
        if not isinstance(m, message_type):
            m = message_type(data=m)
        ext = m.extensions or {}
        if "traceparent" not in ext:
            m = dataclasses.replace(m, extensions={**ext, "traceparent": traceparent})
        out.append(m)
    return out


def set_status(s: Span, status: int) -> None:
    """Record an HTTP status on ``s`` (5xx marks it failed)."""
    s.set_attribute("http.response.status_code", status)
    if status >= 500:
        s.set_status(Status(StatusCode.ERROR))
