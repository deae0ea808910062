"""begin_immediate: short retries while another connection writes, bounded, restored."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.sqlitelock import MAX_SLEEP, begin_immediate

Pair = tuple[sqlite3.Connection, sqlite3.Connection]


@pytest.fixture
def conns(tmp_path: Path) -> Iterator[Pair]:
    """Two connections to one WAL database (a lock holder and a waiter), closed after."""
    pair = []
    for _ in range(2):
        conn = sqlite3.connect(tmp_path / "db", isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        pair.append(conn)
    yield pair[0], pair[1]
    for conn in pair:
        conn.close()


def test_takes_the_lock_once_the_other_writer_commits(conns: Pair) -> None:
    holder, waiter = conns
    holder.execute("BEGIN IMMEDIATE")
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # the other writer commits after a few retries
        sleeps.append(seconds)
        if len(sleeps) == 6:
            holder.execute("COMMIT")

    begin_immediate(waiter, 30.0, sleep=sleep)
    assert waiter.in_transaction
    assert len(sleeps) == 6 and max(sleeps) <= MAX_SLEEP * 1.5  # never SQLite's 25-100 ms
    waiter.execute("ROLLBACK")
    assert waiter.execute("PRAGMA busy_timeout").fetchone() == (30000,)  # restored


def test_gives_up_after_the_timeout_and_restores_the_busy_timeout(conns: Pair) -> None:
    holder, waiter = conns
    holder.execute("BEGIN IMMEDIATE")
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(sqlite3.OperationalError, match="locked"):
        begin_immediate(waiter, 0.5, sleep=sleep, clock=lambda: now[0])
    assert 0.5 <= now[0] < 0.5 + MAX_SLEEP * 2
    assert not waiter.in_transaction
    assert waiter.execute("PRAGMA busy_timeout").fetchone() == (30000,)
    holder.execute("COMMIT")
    begin_immediate(waiter, 0.5)  # free again: taken at once
    assert waiter.in_transaction
