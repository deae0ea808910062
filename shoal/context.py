"""The current W3C trace context, carried from a request or event to what it causes.

A service continues the trace of what it is handling: an incoming ``traceparent`` (HTTP
header or the event's ``traceparent`` extension) keeps its trace id and gets a new span
id for this hop; without one (or with a malformed one) a new trace starts. Whatever runs
under it (``Service.publish``, ``Service.call``) sends that context on. A contextvar
holds it, so concurrent requests and events never see each other's context.

Pure functions (``parse_traceparent``, ``child_of``) plus the contextvar; no I/O.
"""

from __future__ import annotations

import contextvars
import os
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

# Ids need to be unique, not secret (W3C: "randomly generated"); the Mersenne Twister is
# seeded from os.urandom and costs a fraction of a syscall per id.
_random = random.Random()
_ID_BATCH = 64
_ids: list[str] = []
"""Unused ``trace-id-parent-id`` pairs of new traces, made ``_ID_BATCH`` at a time (one
``randbytes`` and one ``hex`` for many: a new trace costs a list pop, not two formats)."""


def _reseed() -> None:
    _random.seed()
    _ids.clear()


os.register_at_fork(after_in_child=_reseed)  # a forked child must not repeat our ids

current_traceparent: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "shoal_traceparent", default=None)


MAX_TRACEPARENT = 512  # a longer value is not a traceparent: ignored, not parsed


def match_traceparent(value: object) -> re.Match[str] | None:
    """The match (groups: version, trace id, parent id, flags) of a valid ``traceparent``
    (str or bytes), else None. The one W3C check of the project.

    Invalid per W3C: not 55 lowercase-hex characters in four fields, version ``ff``,
    an all-zero trace id or parent id. Higher versions are read by their first four
    fields, as the spec asks. Over ``MAX_TRACEPARENT`` characters: not parsed.
    """
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str) or len(value) < 55 or len(value) > MAX_TRACEPARENT:
        return None
    value = value.strip()
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace_id, parent_id, _ = m.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    if version == "00" and len(value) != 55:
        return None
    if version != "00" and len(value) > 55 and value[55] != "-":
        return None
    return m


def parse_traceparent(value: object) -> tuple[str, str, str] | None:
    """``(trace_id, parent_id, flags)`` of a valid ``traceparent``, else None."""
    m = match_traceparent(value)
    return None if m is None else (m.group(2), m.group(3), m.group(4))


def new_span_id() -> str:
    """A random, non-zero 8-byte span id in hex."""
    return f"{_random.getrandbits(64) or 1:016x}"


def _refill() -> None:
    """``_ID_BATCH`` new id pairs from one ``randbytes``. A batch with 16 zero digits in a
    row anywhere (about once in 10^16 batches) is drawn again: one scan of the batch rules
    out an all-zero trace or parent id, instead of two comparisons per id."""
    h = _random.randbytes(24 * _ID_BATCH).hex()
    while _ZERO_SPAN in h:
        h = _random.randbytes(24 * _ID_BATCH).hex()
    _ids.extend([f"{h[i:i + 32]}-{h[i + 32:i + 48]}" for i in range(0, 48 * _ID_BATCH, 48)])


def new_traceparent(*, sampled: bool = True) -> str:
    """The context of a new trace (a root span): random, non-zero trace and parent ids."""
    try:
        ids = _ids.pop()
    except IndexError:
        _refill()
        ids = _ids.pop()
    return "00-" + ids + ("-01" if sampled else "-00")


def child_of(parent: str | None) -> str:
    """This hop's context: the parent's trace and flags with a new span id, or a new trace."""
    parsed = parse_traceparent(parent)
    if parsed is None:
        return new_traceparent()
    trace_id, _, flags = parsed
    return f"00-{trace_id}-{new_span_id()}-{flags}"


@contextmanager
def continue_trace(parent: str | None) -> Iterator[str]:
    """Run a block under ``child_of(parent)``; yields that traceparent."""
    traceparent = child_of(parent)
    token = current_traceparent.set(traceparent)
    try:
        yield traceparent
    finally:
        current_traceparent.reset(token)
