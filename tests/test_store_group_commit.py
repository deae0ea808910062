"""SQLite Store group commit: a process's concurrent writes share one transaction, and
each keeps its own outcome (as if committed one by one)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shoal.errors import LeaseExpired, StoreError
from shoal.store.sqlite import SqliteStore, _Txn, _upsert


async def test_concurrent_writes_share_transactions_and_keep_their_own_outcome(
        tmp_path: Path) -> None:
    store = await SqliteStore.open(f"sqlite:///{tmp_path}/s.db")
    batches: list[int] = []
    real = store._in_write_batch

    def counting(ops):  # type: ignore[no-untyped-def]
        batches.append(len(ops))
        return real(ops)

    store._in_write_batch = counting  # type: ignore[method-assign]
    try:
        lease = await store.lease(0.2)
        await asyncio.sleep(0.3)  # expired: writes on it fail, the others must not
        outcomes = await asyncio.gather(
            *(store.cas("one", str(i).encode(), expected_revision=0) for i in range(50)),
            *(store.put(f"k/{i}", b"v") for i in range(50)),
            store.put("leased", b"x", lease=lease),
            return_exceptions=True)
        assert len(batches) < 1 + 101 // 2, batches  # grouped, not one per write
        cas, puts, leased = outcomes[:50], outcomes[50:100], outcomes[100]
        assert sum(r is not None for r in cas) == 1  # exactly one compare-and-set won
        assert isinstance(leased, LeaseExpired)
        revisions = sorted(r for r in [*cas, *puts] if isinstance(r, int))
        assert revisions == list(range(revisions[0], revisions[0] + 51))  # gapless
        assert len(await store.list("k/")) == 50 and await store.get("leased") is None
    finally:
        await store.close()


async def test_a_failing_write_is_undone_alone(tmp_path: Path) -> None:
    store = await SqliteStore.open(f"sqlite:///{tmp_path}/s.db")
    try:
        def half_then_fail(tx: _Txn) -> None:
            _upsert(tx, "bad", b"half-written", None)
            raise RuntimeError("op failed after writing")

        good = store.put("good/1", b"1")
        bad = store._write(half_then_fail)
        after = store.put("good/2", b"2")
        first, failed, second = await asyncio.gather(good, bad, after, return_exceptions=True)
        assert isinstance(failed, RuntimeError)
        assert await store.get("bad") is None
        assert second == first + 1  # the undone write left no revision behind
        assert [c.key async for c in _take(store.watch("", after_revision=0), 2)] == [
            "good/1", "good/2"]
    finally:
        await store.close()


async def test_writes_queued_on_a_closing_store_fail_cleanly(tmp_path: Path) -> None:
    store = await SqliteStore.open(f"sqlite:///{tmp_path}/s.db")
    writes = [asyncio.ensure_future(store.put(f"k/{i}", b"v")) for i in range(20)]
    await asyncio.sleep(0)
    await store.close()
    results = await asyncio.gather(*writes, return_exceptions=True)
    assert all(isinstance(r, int | StoreError) for r in results), results
    with pytest.raises(StoreError, match="closed"):
        await store.put("k/late", b"v")


async def _take(stream, n: int):  # type: ignore[no-untyped-def]
    async with stream:
        for _ in range(n):
            yield await asyncio.wait_for(anext(stream), 5)
