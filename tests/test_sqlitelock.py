"""begin_immediate and set_wal: short retries while another connection holds the lock."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.sqlitelock import MAX_SLEEP, begin_immediate, set_wal

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


def test_set_wal_waits_for_a_reader_of_the_new_database(tmp_path: Path) -> None:
    holder = sqlite3.connect(tmp_path / "db", isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN")
    holder.execute("SELECT * FROM t").fetchall()  # a shared lock: WAL conversion must wait
    waiter = sqlite3.connect(tmp_path / "db", isolation_level=None, timeout=0)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            holder.execute("COMMIT")

    set_wal(waiter, 5.0, sleep=sleep)
    assert len(sleeps) == 3
    assert waiter.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    other = sqlite3.connect(tmp_path / "db2", isolation_level=None, timeout=0)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN")
    other.execute("SELECT * FROM t").fetchall()
    late = sqlite3.connect(tmp_path / "db2", isolation_level=None, timeout=0)
    now = [0.0]

    def tick(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(sqlite3.OperationalError, match="locked"):
        set_wal(late, 0.2, sleep=tick, clock=lambda: now[0])
    for conn in (holder, waiter, other, late):
        conn.close()
