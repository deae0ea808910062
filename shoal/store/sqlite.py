"""The embedded Store: one SQLite file shared by every process of a Shoal deployment.

Layout: ``kv`` (current values), ``leases`` (wall-clock ``expires_at``), ``changes`` (one
row per revision: the watch log), ``meta`` (the store-wide revision and the compaction
point). How it stays correct across processes:

* WAL journal and ``busy_timeout``; every write is ``BEGIN IMMEDIATE`` .. ``COMMIT``, so
  revisions are assigned under the write lock and never reused. ``synchronous=NORMAL``:
  a commit survives kill -9 of any process (not power loss; the store holds
  coordination state that live processes re-assert through leases). Writers take the
  lock with ``shoal.sqlitelock.begin_immediate`` (short retries, not SQLite's sleep
  ladder). Checkpoints stay SQLite's automatic ones: with every process always reading,
  PASSIVE checkpoints off the commit path (``shoal.walcheckpoint``, as the broker does)
  never let the WAL restart, and it grew by ~5 MB/s under the shop's load.
* Leases expire on ``time.time()`` (processes on one machine share the clock). Any
  client sweeps expired leases (deleting their keys and logging the deletes): lazily at
  the start of every write and before reads, and in stores with watchers on a timer set
  for the earliest expiry. So a holder killed with -9 loses its keys about ``ttl`` later
  and every watcher sees the deletes.
* Watch without polling, and only for what is watched: after each commit the writer
  writes one byte to a small file per channel it touched (``shoal.store.channels``: the
  key's first path segments, hashed into 64 files in ``<db>-watch/``); each process
  awaits inotify on the channel files of its watches only (``FileSetSignal``), so a
  write under a prefix nobody watches wakes nobody (in the shop, ~90% of the writes).
  The touch follows the commit, so a woken watcher sees the change at once; a writer
  killed between its commit and its touch delays the wakeup to the next write on that
  channel, or at most ``IDLE_POLL`` (each watching process re-reads the revision that
  often, cheaply, and wakes its watchers when it moved).
* The log keeps the last ``history`` changes (between 1x and 2x, pruned in bulk). A
  watcher that falls further behind gets a ``StoreError`` (it cannot be resynced without
  losing deletes): list again and watch from ``revision()``.

Group commit: the writes a process queues while its previous transaction is in flight
are committed together in the next one (``_write``), each in a savepoint so one that
fails is undone alone. One lock, one commit and one wakeup serve them all, as the SQLite
broker does for publishes; nothing waits for a batch to fill.

Threads: every SQLite call runs on one dedicated thread per store (its own connection),
one ``run_in_executor`` hop per read or write batch (~50 us). Inline calls would be
sub-millisecond when idle, but ``BEGIN IMMEDIATE`` may wait up to ``busy_timeout`` on
another process's write and a large ``list`` or prune is not bounded, so they stay off
the event loop. The
one exception: ``watch()`` reads the current revision inline (one indexed row from a
second connection; a WAL read never waits for writers; ~5 us measured), because "from
now" must mean before ``watch()`` returns, not whenever the store thread gets to it.
A store belongs to the event loop that opened it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from shoal.errors import ConfigError, LeaseExpired, StoreError
from shoal.filewatch import FileSetSignal, file_set_signal_for
from shoal.sqlitelock import begin_immediate
from shoal.store.base import Change, Entry, Lease, Store
from shoal.store.channels import LEASES, key_channels, prefix_channel
from shoal.store.validation import (
    DEFAULT_HISTORY,
    check_key,
    check_prefix,
    check_revision,
    check_ttl,
    check_value,
    prefix_end,
)
from shoal.store.watch import ChangeStream

T = TypeVar("T")

log = logging.getLogger("shoal.store.sqlite")

BUSY_TIMEOUT_MS = 30_000
INLINE_BUSY_TIMEOUT_MS = 200
IDLE_POLL = 1.0  # a watching process re-reads the revision this often (module docstring)
EXPIRY_SLACK = 0.005  # wake this long after a lease's expiry, so it has surely expired
WATCH_BATCH = 500
MAX_GROUP_COMMIT = 256  # writes of one process committed in one transaction, at most

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, revision INTEGER NOT NULL, lease INTEGER);
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv(lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ttl REAL NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases(expires_at);
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY, kind TEXT NOT NULL, key TEXT NOT NULL, value BLOB);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compacted', 0);
COMMIT;
"""


def sqlite_store_path(url: str) -> Path:
    """The database path of ``sqlite:///PATH`` (relative to the cwd; ``////abs`` absolute)."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or parts.netloc or not parts.path.startswith("/"):
        raise ConfigError(f"store url: expected sqlite:///PATH, got {url!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"store url: options are not supported in {url!r}")
    path = parts.path[1:]
    if not path or path.endswith("/"):
        raise ConfigError(f"store url: no database file name in {url!r}")
    return Path(path)


class _Txn:
    """One write transaction: assigns revisions and logs changes."""

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self.conn = conn
        self.now = now
        rows = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        self.start = self.revision = int(rows["revision"])
        self.compacted = int(rows["compacted"])
        self.channels: set[str] = set()  # touched after the commit (shoal.store.channels)

    def record(self, kind: Literal["put", "delete"], key: str, value: bytes | None) -> int:
        self.revision += 1
        self.channels.update(key_channels(key))
        self.conn.execute(
            "INSERT INTO changes(revision, kind, key, value) VALUES (?, ?, ?, ?)",
            (self.revision, kind, key, value),
        )
        return self.revision

    def drop_lease(self, lease_id: int) -> None:
        """Delete the lease and its keys, logging a delete per key (in key order)."""
        keys = self.conn.execute(
            "SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease_id,)
        ).fetchall()
        for (key,) in keys:
            self.record("delete", key, None)
        self.conn.execute("DELETE FROM kv WHERE lease = ?", (lease_id,))
        self.conn.execute("DELETE FROM leases WHERE id = ?", (lease_id,))
        self.channels.add(LEASES)

    def sweep(self) -> None:
        expired = self.conn.execute(
            "SELECT id FROM leases WHERE expires_at <= ? ORDER BY expires_at", (self.now,)
        ).fetchall()
        for (lease_id,) in expired:
            self.drop_lease(lease_id)

    def require_lease(self, lease_id: int | None) -> None:
        if lease_id is not None and not self.conn.execute(
            "SELECT 1 FROM leases WHERE id = ?", (lease_id,)
        ).fetchone():
            raise LeaseExpired(f"lease {lease_id} expired or was revoked")

    def finish(self, history: int) -> None:
        """Save the revision; prune the log in bulk once it holds 2x ``history``."""
        if self.revision == self.start:
            return
        self.conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (self.revision,))
        if self.revision - self.compacted >= 2 * history:
            cut = self.revision - history
            self.conn.execute("DELETE FROM changes WHERE revision <= ?", (cut,))
            self.conn.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (cut,))


class SqliteLease(Lease):
    """A lease in a ``SqliteStore`` (valid in every store opened on the same file)."""

    def __init__(self, store: SqliteStore, lease_id: int, ttl: float) -> None:
        self._store = store
        self.id = lease_id
        self.ttl = ttl

    async def keepalive(self) -> None:
        await self._store._write(_keepalive, self.id, self.ttl)

    async def revoke(self) -> None:
        await self._store._write(lambda tx: tx.drop_lease(self.id))

    def __repr__(self) -> str:
        return f"SqliteLease(id={self.id}, ttl={self.ttl}, path={str(self._store.path)!r})"


def _keepalive(tx: _Txn, lease_id: int, ttl: float) -> None:
    tx.channels.add(LEASES)  # watchers' sweep timers follow the earliest expiry
    cur = tx.conn.execute(
        "UPDATE leases SET expires_at = ? WHERE id = ?", (tx.now + ttl, lease_id)
    )
    if cur.rowcount == 0:  # the sweep at the start of this transaction already ended it
        raise LeaseExpired(f"lease {lease_id} (ttl {ttl}s) expired or was revoked")


def _upsert(tx: _Txn, key: str, value: bytes, lease_id: int | None) -> int:
    revision = tx.record("put", key, value)
    tx.conn.execute(
        "INSERT INTO kv(key, value, revision, lease) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
        "revision = excluded.revision, lease = excluded.lease",
        (key, value, revision, lease_id),
    )
    return revision


def _key_revision(tx: _Txn, key: str) -> int:
    row = tx.conn.execute("SELECT revision FROM kv WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


def _cas(tx: _Txn, key: str, value: bytes, expected: int, lease_id: int | None) -> int | None:
    tx.require_lease(lease_id)
    if _key_revision(tx, key) != expected:
        return None
    return _upsert(tx, key, value, lease_id)


def _put(tx: _Txn, key: str, value: bytes, lease_id: int | None) -> int:
    tx.require_lease(lease_id)
    return _upsert(tx, key, value, lease_id)


def _delete(tx: _Txn, key: str, expected: int | None) -> bool:
    current = _key_revision(tx, key)
    if current == 0 or expected not in (None, current):
        return False
    tx.conn.execute("DELETE FROM kv WHERE key = ?", (key,))
    tx.record("delete", key, None)
    return True


def _grant(tx: _Txn, ttl: float) -> int:
    tx.channels.add(LEASES)
    cur = tx.conn.execute(
        "INSERT INTO leases(ttl, expires_at) VALUES (?, ?)", (ttl, tx.now + ttl)
    )
    return int(cur.lastrowid)  # type: ignore[arg-type]


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(row[0], bytes(row[1]), int(row[2]), row[3])


def _range(prefix: str) -> tuple[str, tuple[str, ...]]:
    """SQL condition and parameters for "key starts with ``prefix``"."""
    if not prefix:
        return "1", ()
    end = prefix_end(prefix)
    if end is None:
        return "key >= ?", (prefix,)
    return "key >= ? AND key < ?", (prefix, end)


class _SqliteChangeStream(ChangeStream):
    def __init__(self, store: SqliteStore, prefix: str, last: int) -> None:
        super().__init__(prefix, last, store._watcher_stopped)
        self._store = store

    async def _fetch(self) -> list[Change] | None:
        store = self._store
        while not store._closed:
            changed = store._changed  # taken before reading: no wakeup is lost
            rows, self.last = await store._read(_changes_after, self.prefix, self.last, store.url)
            if rows:
                return rows
            await changed.wait()
        return None


class SqliteStore(Store):
    """Store adapter on one SQLite file, shared by many processes."""

    def __init__(self, url: str, path: Path, history: int) -> None:
        self.url = url
        self.path = path
        self.history = history
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="shoal-store")
        self._conn: sqlite3.Connection | None = None  # used on the store thread only
        self._inline: sqlite3.Connection | None = None  # used on the event loop only
        self._closed = False
        self._signal: FileSetSignal | None = None
        self._channel_dir = path.with_name(path.name + "-watch")
        self._channel_fds: dict[str, int] = {}  # written on the store thread only
        self._changed = asyncio.Event()  # replaced on every bump; watchers await it
        self._kick = asyncio.Event()  # set by the listener on every file change
        self._watchers = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._queued: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
        self._committer: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, *, history: int = DEFAULT_HISTORY) -> SqliteStore:
        """Open (creating it and its parent directories if needed) ``sqlite:///PATH``."""
        path = sqlite_store_path(url)
        if not isinstance(history, int) or history < 1:
            raise ConfigError(f"store history: must be an int >= 1, got {history!r}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"store {url}: cannot create {path.parent}: {e}") from e
        self = cls(url, path.resolve(), history)
        try:
            await self._loop.run_in_executor(self._executor, self._connect)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        self._signal = file_set_signal_for(self._channel_dir)
        return self

    # -- the store thread ------------------------------------------------------------
    def _connect(self) -> None:
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None
            )
        except sqlite3.Error as e:
            raise StoreError(f"store {self.url}: cannot open {self.path}: {e}") from e
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            for attempt in range(100):  # concurrent first opens race on the WAL switch
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute("PRAGMA synchronous=NORMAL")
                    conn.executescript(_SCHEMA)
                    break
                except sqlite3.OperationalError:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    if attempt == 99:
                        raise
                    time.sleep(0.01)
        except sqlite3.Error as e:
            conn.close()
            raise StoreError(f"store {self.url}: cannot initialise {self.path}: {e}") from e
        try:
            self._channel_dir.mkdir(exist_ok=True)
        except OSError as e:
            conn.close()
            raise StoreError(f"store {self.url}: cannot create {self._channel_dir}: {e}") from e
        self._conn = conn
        self._inline = sqlite3.connect(
            self.path, timeout=INLINE_BUSY_TIMEOUT_MS / 1000, isolation_level=None,
            check_same_thread=False,
        )

    def _in_write(self, fn: Callable[..., T], *args: Any) -> tuple[T | LeaseExpired, bool]:
        """Run ``fn(txn, *args)`` in ``BEGIN IMMEDIATE`` after sweeping expired leases.

        A ``LeaseExpired`` from ``fn`` (raised before it writes) is returned, not raised,
        so the sweep still commits. Returns (result, whether the revision moved).
        """
        (result,), changed = self._in_write_batch([(fn, args)])
        if isinstance(result, BaseException) and not isinstance(result, LeaseExpired):
            raise result
        return result, changed

    def _in_write_batch(self, ops: list[tuple[Callable[..., Any], tuple[Any, ...]]]
                        ) -> tuple[list[Any], bool]:
        """Run each ``fn(txn, *args)`` in order in one ``BEGIN IMMEDIATE`` transaction
        (group commit), each in its own savepoint: an op that raises is undone alone and
        its exception is its result. Returns (results, whether the revision moved)."""
        conn = self._conn
        assert conn is not None
        begin_immediate(conn, BUSY_TIMEOUT_MS / 1000)
        results: list[Any] = []
        try:
            tx = _Txn(conn, time.time())
            tx.sweep()
            for fn, args in ops:
                revision = tx.revision
                conn.execute("SAVEPOINT op")
                try:
                    results.append(fn(tx, *args))
                except Exception as e:  # LeaseExpired, or a failure of this op only
                    conn.execute("ROLLBACK TO op")
                    tx.revision = revision
                    results.append(e)
                conn.execute("RELEASE op")
            tx.finish(self.history)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._touch(tx.channels)
        return results, tx.revision != tx.start

    def _touch(self, channels: set[str]) -> None:
        """Wake the watchers of ``channels`` in every process (a one-byte write each)."""
        for name in channels:
            try:
                fd = self._channel_fds.get(name)
                if fd is None:
                    fd = self._channel_fds[name] = os.open(
                        self._channel_dir / name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
                os.pwrite(fd, b"\0", 0)
            except OSError as e:  # committed already: watchers learn of it by IDLE_POLL
                log.warning("store %s: cannot signal channel %s: %s", self.url, name, e)

    def _in_read(self, fn: Callable[..., T], *args: Any) -> tuple[T, bool]:
        """Run ``fn(conn, *args)`` in one read snapshot, sweeping first if a lease is due."""
        conn = self._conn
        assert conn is not None
        swept = False
        if conn.execute(
            "SELECT 1 FROM leases WHERE expires_at <= ? LIMIT 1", (time.time(),)
        ).fetchone():
            _, swept = self._in_write(lambda tx: None)
        conn.execute("BEGIN")
        try:
            return fn(conn, *args), swept
        finally:
            conn.execute("COMMIT")

    # -- the event loop side ---------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise StoreError(f"store {self.url}: closed")
        try:
            return await self._loop.run_in_executor(
                self._executor, functools.partial(fn, *args)
            )
        except sqlite3.Error as e:
            raise StoreError(f"store {self.url}: {e}") from e

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Queue ``fn(txn, *args)``; writes queued while a transaction is in flight go
        together in the next one (one lock, one commit, one wakeup for all of them)."""
        if self._closed:
            raise StoreError(f"store {self.url}: closed")
        done: asyncio.Future[Any] = self._loop.create_future()
        self._queued.append((fn, args, done))
        if self._committer is None:
            self._committer = self._loop.create_task(self._commit_queued())
        result = await asyncio.shield(done)  # a cancelled caller does not undo the write
        if isinstance(result, BaseException):
            raise result
        return result

    async def _commit_queued(self) -> None:
        """Commit what is queued, batch after batch, until the queue is empty."""
        try:
            while self._queued:
                batch = self._queued[:MAX_GROUP_COMMIT]
                del self._queued[:MAX_GROUP_COMMIT]
                try:
                    results, changed = await self._call(
                        self._in_write_batch, [(fn, args) for fn, args, _ in batch])
                except BaseException as e:  # the whole batch failed (e.g. the store closed)
                    error = e if isinstance(e, Exception) else StoreError(
                        f"store {self.url}: closed while writing")
                    for _, _, done in batch:
                        if not done.done():
                            done.set_result(error)  # raised by each waiting _write
                    if not isinstance(e, Exception):
                        raise
                    continue
                if changed and self._signal is not None and not self._signal.native:
                    self._signal.notify()  # with inotify, our own touches wake our watchers
                for (_, _, done), result in zip(batch, results, strict=True):
                    if not done.done():
                        done.set_result(_store_error(self.url, result))
        finally:
            self._committer = None

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        result, swept = await self._call(self._in_read, fn, *args)
        if swept and self._signal is not None and not self._signal.native:
            self._signal.notify()
        return result

    def _lease_id(self, lease: Lease | None) -> int | None:
        if lease is None:
            return None
        if not isinstance(lease, SqliteLease) or lease._store.path != self.path:
            raise StoreError(f"store {self.url}: {lease!r} was granted by another store")
        return lease.id

    async def get(self, key: str) -> Entry | None:
        key = check_key(key)

        def run(conn: sqlite3.Connection) -> Entry | None:
            row = conn.execute(
                "SELECT key, value, revision, lease FROM kv WHERE key = ?", (key,)
            ).fetchone()
            return _entry(row) if row else None

        return await self._read(run)

    async def list(self, prefix: str) -> list[Entry]:
        cond, params = _range(check_prefix(prefix))

        def run(conn: sqlite3.Connection) -> list[Entry]:
            sql = f"SELECT key, value, revision, lease FROM kv WHERE {cond} ORDER BY key"
            return [_entry(r) for r in conn.execute(sql, params)]

        return await self._read(run)

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        key = check_key(key)
        value = check_value(key, value)
        return await self._write(_put, key, value, self._lease_id(lease))

    async def cas(
        self, key: str, value: bytes, *, expected_revision: int, lease: Lease | None = None
    ) -> int | None:
        key = check_key(key)
        value = check_value(key, value)
        expected = check_revision(expected_revision, "cas expected_revision")
        return await self._write(_cas, key, value, expected, self._lease_id(lease))

    async def delete(self, key: str, *, expected_revision: int | None = None) -> bool:
        key = check_key(key)
        if expected_revision is not None:
            check_revision(expected_revision, "delete expected_revision")
        return await self._write(_delete, key, expected_revision)

    async def lease(self, ttl: float) -> Lease:
        ttl = check_ttl(ttl)
        lease_id = await self._write(_grant, ttl)  # its notify() reschedules sweep timers
        return SqliteLease(self, lease_id, ttl)

    async def revision(self) -> int:
        return await self._read(_current_revision)

    # -- watch -----------------------------------------------------------------------
    def watch(self, prefix: str, *, after_revision: int | None = None) -> ChangeStream:
        """Changes under ``prefix``; "now" is this call, not the first ``anext``.

        A watcher further behind than the kept log gets a ``StoreError``: list again and
        watch from ``revision()``.
        """
        prefix = check_prefix(prefix)
        if self._closed:
            raise StoreError(f"store {self.url}: closed")
        self._listen_to(prefix_channel(prefix))  # before "now": no write slips between
        if after_revision is None:
            start = self._revision_inline()
        else:
            start = check_revision(after_revision, "watch after_revision")
        self._watcher_started()
        return _SqliteChangeStream(self, prefix, start)

    def _revision_inline(self) -> int:
        """The current revision, read on the event loop: "now" must precede the return."""
        assert self._inline is not None
        try:
            return _current_revision(self._inline)
        except sqlite3.Error as e:
            raise StoreError(f"store {self.url}: {e}") from e

    def _listen_to(self, channel: str) -> None:
        """Make this process's signal wake on writes to ``channel`` (creating its file)."""
        assert self._signal is not None
        path = self._channel_dir / channel
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
            self._signal.add(path)
        except OSError as e:
            raise StoreError(f"store {self.url}: cannot watch {path}: {e}") from e

    def _bump(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _watcher_started(self) -> None:
        self._watchers += 1
        self._listen_to(LEASES)  # the sweep timer follows every lease's expiry
        if not self._tasks and not self._closed:
            self._tasks = [
                self._loop.create_task(self._listen(), name=f"shoal-store-listen {self.url}"),
                self._loop.create_task(self._pump(), name=f"shoal-store-pump {self.url}"),
            ]

    def _watcher_stopped(self) -> None:
        self._watchers -= 1
        if self._watchers == 0 and not self._loop.is_closed():
            self._stop_tasks()

    def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []

    async def _listen(self) -> None:
        """Turn every file-change signal into a kick; never leaves a gap between waits."""
        assert self._signal is not None
        while True:
            await self._signal.wait(None)
            self._kick.set()

    async def _pump(self) -> None:
        """Wake watchers after each kick, or when an ``IDLE_POLL`` read finds the revision
        moved; sweep leases when due."""
        next_expiry: float | None = None
        seen = -1
        while True:
            timeout = IDLE_POLL
            if next_expiry is not None:
                timeout = min(timeout, max(0.0, next_expiry - time.time()) + EXPIRY_SLACK)
            kicked = True
            try:
                async with asyncio.timeout(timeout):
                    await self._kick.wait()
            except TimeoutError:
                kicked = False
            self._kick.clear()
            try:  # also sweeps due leases
                next_expiry, revision = await self._read(_earliest_expiry)
            except StoreError:
                if self._closed:
                    return
                next_expiry, revision = time.time() + 1.0, -1  # e.g. locked: retry soon
            if kicked or revision != seen:
                seen = revision
                self._bump()

    async def close(self) -> None:
        """End watchers and background tasks, close the connection and the thread."""
        if self._closed:
            return
        self._closed = True
        self._stop_tasks()
        self._bump()
        if self._signal is not None:
            self._signal.release()
            self._signal = None

        def close_conn() -> None:
            for conn in (self._conn, self._inline):
                if conn is not None:
                    conn.close()
            self._conn = self._inline = None
            for fd in self._channel_fds.values():
                os.close(fd)
            self._channel_fds.clear()

        await self._loop.run_in_executor(self._executor, close_conn)
        self._executor.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"SqliteStore({self.url!r})"


def _store_error(url: str, result: Any) -> Any:
    """An op's result, with an SQLite error as the ``StoreError`` callers expect."""
    if isinstance(result, sqlite3.Error):
        error = StoreError(f"store {url}: {result}")
        error.__cause__ = result
        return error
    return result


def _current_revision(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])


def _earliest_expiry(conn: sqlite3.Connection) -> tuple[float | None, int]:
    """The earliest lease expiry (None: no lease) and the current revision."""
    row = conn.execute("SELECT min(expires_at) FROM leases").fetchone()
    return None if row[0] is None else float(row[0]), _current_revision(conn)


def _changes_after(
    conn: sqlite3.Connection, prefix: str, last: int, url: str
) -> tuple[list[Change], int]:
    """Up to ``WATCH_BATCH`` changes under ``prefix`` after ``last``, and the new position."""
    meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
    revision, compacted = int(meta["revision"]), int(meta["compacted"])
    if last < compacted:
        raise StoreError(
            f"store {url}: watch on {prefix!r} fell behind: changes up to revision "
            f"{compacted} were compacted; list again and watch from the current revision"
        )
    cond, params = _range(prefix)
    rows = conn.execute(
        f"SELECT revision, kind, key, value FROM changes WHERE revision > ? "
        f"AND revision <= ? AND {cond} ORDER BY revision LIMIT {WATCH_BATCH}",
        (last, revision, *params),
    ).fetchall()
    changes = [Change(k, key, None if v is None else bytes(v), r) for r, k, key, v in rows]
    if len(changes) == WATCH_BATCH:
        return changes, changes[-1].revision
    return changes, max(last, revision)
