"""WAL checkpoints off the write path: PASSIVE, on a thread of their own, about once a second.

SQLite's automatic checkpoint runs inside the commit that finds the WAL over 1000 pages
and fsyncs the database there: one publish in a hundred waited 10-15 ms for it. Writers
open their connection with ``wal_autocheckpoint=0`` and call ``WalCheckpointer.after_write``;
a PASSIVE checkpoint on another connection never blocks writers or readers. Known cost:
while readers never pause, the WAL cannot restart and keeps growing (the broker's reached
tens of MB in the shop bench); the Store therefore keeps SQLite's automatic checkpoints.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("shoal.walcheckpoint")

INTERVAL = 1.0  # seconds between checkpoints while writes go on


class WalCheckpointer:
    """Runs ``PRAGMA wal_checkpoint(PASSIVE)`` at most once per ``interval`` after writes."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], name: str,
                 interval: float = INTERVAL) -> None:
        self._connect = connect
        self._interval = interval
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"shoal-{name}-ckpt")
        self._conn: sqlite3.Connection | None = None
        self._running: asyncio.Future[None] | None = None
        self._last = time.monotonic()
        self._closed = False

    def after_write(self) -> None:
        """Start a checkpoint if none runs and the last one is ``interval`` old (loop side)."""
        if (self._closed or self._running is not None
                or time.monotonic() - self._last < self._interval):
            return
        self._last = time.monotonic()
        self._running = asyncio.get_running_loop().run_in_executor(self._pool, self._run)
        self._running.add_done_callback(self._done)

    def _run(self) -> None:
        if self._conn is None:
            self._conn = self._connect()
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _done(self, fut: asyncio.Future[None]) -> None:
        self._running = None
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("WAL checkpoint failed: %s", fut.exception())

    async def close(self) -> None:
        """A last checkpoint, then close the connection and the thread."""
        self._closed = True

        def last() -> None:
            try:
                if self._conn is not None:
                    self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, last)
        finally:
            self._pool.shutdown(wait=False)
