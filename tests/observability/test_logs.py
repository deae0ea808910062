"""Structured logs: JSON lines with the current trace, rich on a terminal."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shoal.observability import tracing
from shoal.observability.logs import configure_logging


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_trace_and_extras(restore_root: None,
                                           spans: InMemorySpanExporter) -> None:
    out = io.StringIO()
    configure_logging("info", stream=out, service="orders")
    log = logging.getLogger("shop.orders")
    log.info("outside %s", "a span")
    with tracing.span("work", SpanKind.INTERNAL) as s:
        log.warning("inside", extra={"order": 7, "weird": object(), "bytes": b"\xff"})
        sc = s.get_span_context()
    try:
        raise ValueError("boom\nwith newline")
    except ValueError:
        log.exception("failed")
    log.debug("not shown")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert first["message"] == "outside a span" and "trace_id" not in first
    assert first["level"] == "info" and first["logger"] == "shop.orders"
    assert first["service"] == "orders" and first["time"].endswith("Z")
    assert second["trace_id"] == f"{sc.trace_id:032x}"
    assert second["span_id"] == f"{sc.span_id:016x}"
    assert second["order"] == 7 and second["weird"].startswith("<object")
    assert "ValueError: boom" in third["exception"]


def test_reconfiguring_replaces_the_handler(restore_root: None) -> None:
    a, b = io.StringIO(), io.StringIO()
    configure_logging(stream=a)
    configure_logging(stream=b)
    logging.getLogger("x").warning("once")
    assert a.getvalue() == "" and b.getvalue().count("once") == 1


def test_terminal_gets_rich_lines(restore_root: None, spans: InMemorySpanExporter) -> None:
    out = io.StringIO()
    configure_logging(stream=out, json=False)
    with tracing.span("work", SpanKind.INTERNAL) as s:
        logging.getLogger("x").warning("hello [/] [bold]not markup")
    text = out.getvalue()
    assert "hello [/] [bold]not markup" in text
    assert f"{s.get_span_context().trace_id:032x}"[:16] in text
    assert not text.lstrip().startswith("{")


def test_bad_level_is_named(restore_root: None) -> None:
    with pytest.raises(ValueError, match="'loud'"):
        configure_logging("loud")
