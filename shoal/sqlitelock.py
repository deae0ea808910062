"""Taking SQLite's write lock across processes without its busy handler's long sleeps.

SQLite's own busy handler (``busy_timeout``) retries a locked ``BEGIN IMMEDIATE`` after
sleeping 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100, 100 ... ms: a writer that has
waited a little sleeps 25-100 ms at a time even when the lock is free again a fraction
of a millisecond later. With the shop's nine processes writing one Store file (each
write holds the lock for well under a millisecond), writers spent most of their time
asleep in that ladder (py-spy: the store threads sat in ``BEGIN IMMEDIATE``) and the
whole pipeline ran at a few dozen events per second. ``begin_immediate`` retries with
short sleeps instead (at most ``MAX_SLEEP``), so a waiter gets the lock about as soon
as it is free; the overall bound stays the connection's ``busy_timeout``.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable

FIRST_SLEEP = 0.0001  # seconds; doubled per attempt up to MAX_SLEEP, with jitter
MAX_SLEEP = 0.002


def begin_immediate(conn: sqlite3.Connection, timeout: float, *,
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> None:
    """``BEGIN IMMEDIATE`` on ``conn``, retrying while another connection writes.

    Raises ``sqlite3.OperationalError`` ("database is locked") after ``timeout`` seconds.
    The connection's own busy handler is switched off for the attempts and restored.
    """
    (saved,) = conn.execute("PRAGMA busy_timeout").fetchone()
    conn.execute("PRAGMA busy_timeout=0")
    try:
        deadline = clock() + timeout
        pause = FIRST_SLEEP
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")  # the common case: nobody else is writing
                return
            except sqlite3.OperationalError as e:
                if not _is_locked(e) or clock() >= deadline:
                    raise
            sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, MAX_SLEEP)
    finally:
        conn.execute(f"PRAGMA busy_timeout={int(saved)}")


def _is_locked(e: sqlite3.OperationalError) -> bool:
    text = str(e)
    return "locked" in text or "busy" in text


def set_wal(conn: sqlite3.Connection, timeout: float, *,
            sleep: Callable[[float], None] = time.sleep,
            clock: Callable[[], float] = time.monotonic) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process is creating or converting
    the same new database: that pragma can answer "database is locked" at once, without
    SQLite's busy handler (seen with several gateway workers opening one new file)."""
    deadline = clock() + timeout
    delay = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if not _is_locked(e) or clock() >= deadline:
                raise
        sleep(delay)
        delay = min(delay * 2, 0.05)
