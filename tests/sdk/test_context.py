"""shoal.context: W3C traceparent parsing and continuation (pure)."""

from __future__ import annotations

import asyncio

import pytest

from shoal.context import (
    child_of,
    continue_trace,
    current_traceparent,
    new_traceparent,
    parse_traceparent,
)

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_parse_valid_and_future_versions() -> None:
    assert parse_traceparent(VALID) == ("0af7651916cd43dd8448eb211c80319c",
                                        "b7ad6b7169203331", "01")
    assert parse_traceparent(" " + VALID + " ") is not None  # OWS around header values
    future = "cc" + VALID[2:] + "-what-the-future-holds"
    assert parse_traceparent(future) is not None


@pytest.mark.parametrize("value", [
    None, 42, "", "00", VALID.upper(), VALID + "-extra",  # v00 has exactly four fields
    "ff" + VALID[2:],  # version ff is invalid
    "00-" + "0" * 32 + "-b7ad6b7169203331-01",  # all-zero trace id
    "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01",  # all-zero parent id
    "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",  # short trace id
    "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
    "cc" + VALID[2:] + "x",  # a future version must continue with '-'
    "00-" + "g" * 32 + "-b7ad6b7169203331-01",
    VALID + " " * 600,  # oversized
])
def test_parse_refuses_malformed(value: object) -> None:
    assert parse_traceparent(value) is None


def test_child_keeps_trace_and_flags_with_a_new_span() -> None:
    child = child_of(VALID)
    trace_id, span, flags = parse_traceparent(child)  # type: ignore[misc]
    assert trace_id == "0af7651916cd43dd8448eb211c80319c" and flags == "01"
    assert span != "b7ad6b7169203331" and child.startswith("00-")
    unsampled = child_of(VALID[:-2] + "00")
    assert unsampled.endswith("-00")
    for bad in (None, "garbage"):
        fresh = child_of(bad)
        assert parse_traceparent(fresh) is not None and fresh.endswith("-01")
    assert child_of(None) != child_of(None)
    assert new_traceparent(sampled=False).endswith("-00")


async def test_contextvar_is_per_task_and_restored() -> None:
    seen: dict[str, str | None] = {}

    async def work(name: str, parent: str | None) -> None:
        with continue_trace(parent) as tp:
            await asyncio.sleep(0.01)
            assert current_traceparent.get() == tp
            seen[name] = tp

    await asyncio.gather(work("a", VALID), work("b", None))
    assert seen["a"].split("-")[1] == VALID.split("-")[1]  # type: ignore[union-attr]
    assert seen["b"].split("-")[1] != VALID.split("-")[1]  # type: ignore[union-attr]
    assert current_traceparent.get() is None
