"""Metrics and tracing are process-wide switches: each test gets them fresh and off after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shoal.observability import metrics, tracing


@pytest.fixture
def fresh_metrics() -> Iterator[metrics.Metrics]:
    """Metrics on, on a registry of their own."""
    metrics.disable_metrics()
    m = metrics.enable_metrics()
    try:
        yield m
    finally:
        metrics.disable_metrics()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory."""
    exporter = InMemorySpanExporter()
    tracing.enable_tracing(exporter, service_name="test", sample_ratio=1.0)
    try:
        yield exporter
    finally:
        tracing.disable_tracing()
