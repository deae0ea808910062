"""Structured logs carrying the current trace: ``configure_logging()`` once per process.

On a terminal, lines are rich's (time, level, message, and ``trace=<id>`` when a span is
current); anywhere else one JSON object per line: ``time`` (RFC 3339 UTC), ``level``,
``logger``, ``message``, ``trace_id``/``span_id`` (hex, when a span is current),
``service`` (when given), ``exception`` (the traceback), and any ``extra={...}`` fields.
A log call never fails because of what it carries: values JSON cannot hold are written
with ``repr``.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

import msgspec
from opentelemetry import trace

__all__ = ["JsonLineFormatter", "TraceContextFilter", "configure_logging"]

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "trace_id", "span_id", "service"}
_encoder = msgspec.json.Encoder(enc_hook=repr)


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (or ``None``) of the current span to each record."""

    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        sc = trace.get_current_span().get_span_context()
        if sc.is_valid:
            record.trace_id = f"{sc.trace_id:032x}"
            record.span_id = f"{sc.span_id:016x}"
        else:
            record.trace_id = record.span_id = None
        record.service = self.service
        return True


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("service", "trace_id", "span_id"):
            v = getattr(record, name, None)
            if v is not None:
                out[name] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        for key, v in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = v
        try:
            return _encoder.encode(out).decode()
        except (TypeError, msgspec.EncodeError, OverflowError):
            return _encoder.encode({k: v if isinstance(v, str) else repr(v)
                                    for k, v in out.items()}).decode()


def _rich_handler(stream: IO[str]) -> logging.Handler:
    """rich's handler, with the current trace id (short, dim) after each message; no markup
    is read from messages (a ``[/]`` in data must not break a log line)."""
    from rich.console import Console
    from rich.logging import RichHandler
    from rich.text import Text

    class TracedRichHandler(RichHandler):
        def render_message(self, record: logging.LogRecord, message: str) -> Any:
            text = super().render_message(record, message)
            trace_id = getattr(record, "trace_id", None)
            if trace_id:
                text = Text.assemble(text, (f"  trace={trace_id[:16]}", "dim"))
            return text

    return TracedRichHandler(console=Console(file=stream), markup=False,
                             rich_tracebacks=True, show_path=False)


def configure_logging(level: int | str = "INFO", *, json: bool | None = None,
                      stream: IO[str] | None = None, service: str | None = None
                      ) -> logging.Handler:
    """Send the root logger's records to ``stream`` (default stderr): JSON lines unless
    ``json`` is false or (by default) the stream is a terminal. Replaces a handler an
    earlier call installed; returns the new one."""
    stream = stream if stream is not None else sys.stderr
    if isinstance(level, str):
        name = level.upper()
        if name not in logging.getLevelNamesMapping():
            raise ValueError(f"log level {level!r}: expected one of debug, info, warning, "
                             "error, critical")
        level = logging.getLevelNamesMapping()[name]
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    handler: logging.Handler
    if json:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonLineFormatter())
        handler.addFilter(TraceContextFilter(service))
    else:
        handler = _rich_handler(stream)
        handler.addFilter(TraceContextFilter(service))
    handler._shoal = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_shoal", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
