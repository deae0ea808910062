"""The embedded, durable broker: every topic a set of partition logs in one SQLite file.

Why SQLite: one file, no server, crash-safe transactions, and many processes on one
machine can share it. How it stays fast and safe:

* WAL journal: readers never block the writer and the writer never blocks readers.
  ``synchronous=NORMAL`` (the default here) means a committed append survives kill -9 of
  any process; ``fsync=True`` (``?fsync=1`` in the URL) sets ``synchronous=FULL`` so it
  also survives power loss, at the price of one fsync per group commit (see README).
* Group commit: ``EventBus`` hands over whole batches; one ``BEGIN IMMEDIATE`` ..
  ``COMMIT`` per batch, offsets assigned inside the write lock, so they are gapless and
  consistent across processes.
* Record batches, as in Kafka: one row holds every record a commit appends to one
  partition (MessagePack ``[[ts, key, value], ...]``), keyed by its end offset. SQLite
  inserts about 150k small rows/s here; batching rows lifts the log well past that and
  makes reads one row per batch. Retention drops whole batches, like Kafka's segments.
* Blocking calls run on two dedicated threads (one writer, one reader connection), one
  hop per batch, never per event.
* Consumers in other processes learn of appends from ``shoal.filewatch`` (inotify on the
  database and its WAL), not by polling the table.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import msgspec

from shoal.errors import ConfigError, TopicError
from shoal.events.brokers.base import (
    Append,
    Appended,
    Broker,
    PartitionRange,
    Record,
    TopicSpec,
)
from shoal.filewatch import signal_for
from shoal.sqlitelock import begin_immediate, set_wal
from shoal.walcheckpoint import WalCheckpointer

log = logging.getLogger("shoal.events.sqlite")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS topics (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, partitions INTEGER NOT NULL,
    retention_seconds REAL, retention_bytes INTEGER);
CREATE TABLE IF NOT EXISTS partitions (
    topic_id INTEGER NOT NULL, partition INTEGER NOT NULL,
    start_offset INTEGER NOT NULL DEFAULT 0, next_offset INTEGER NOT NULL DEFAULT 0,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (topic_id, partition)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    topic_id INTEGER NOT NULL, partition INTEGER NOT NULL, end_offset INTEGER NOT NULL,
    base_offset INTEGER NOT NULL, max_ts INTEGER NOT NULL, size_bytes INTEGER NOT NULL,
    records BLOB NOT NULL,
    PRIMARY KEY (topic_id, partition, end_offset));
CREATE TABLE IF NOT EXISTS dedup (
    topic_id INTEGER NOT NULL, id TEXT NOT NULL, partition INTEGER NOT NULL,
    offset INTEGER NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (topic_id, id)) WITHOUT ROWID;
"""


INLINE_READ_LIMIT = 64
BUSY_TIMEOUT_MS = 30_000
_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(list[tuple[int, str | None, bytes]])


def _encode_batch(records: list[tuple[int, str | None, bytes]]) -> bytes:
    return _batch_encoder.encode(records)


def _decode_batch(blob: bytes) -> list[tuple[int, str | None, bytes]]:
    return _batch_decoder.decode(blob)


def sqlite_path(url: str) -> tuple[Path, dict[str, str]]:
    """The file path and query options of ``sqlite:///PATH?opt=v`` (relative PATH: to cwd)."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or parts.netloc not in ("", "localhost"):
        raise ConfigError(f"broker url: expected sqlite:///PATH, got {url!r}")
    raw = parts.path
    if not raw or raw == "/":
        raise ConfigError(f"broker url: no database path in {url!r}")
    path = Path(raw[1:])  # sqlite:///rel/path -> rel/path; sqlite:////abs/path -> /abs/path
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return path, options


def _connect(path: Path, synchronous: str, busy_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, timeout=busy_ms / 1000, isolation_level=None, check_same_thread=False
    )
    set_wal(conn, busy_ms / 1000)
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA busy_timeout={busy_ms}")
    return conn


class SqliteBroker(Broker):
    """Partitioned logs in one SQLite database file, shared by every process that opens it."""

    def __init__(self, url: str, path: Path, fsync: bool) -> None:
        self.url = url
        self.path = path
        self.fsync = fsync
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="shoal-sqlite-w")
        self._reader_pool = ThreadPoolExecutor(1, thread_name_prefix="shoal-sqlite-r")
        self._checkpointer = WalCheckpointer(
            lambda: _connect(self.path, "FULL" if self.fsync else "NORMAL"), "sqlite")
        self._w: sqlite3.Connection | None = None
        self._inline: sqlite3.Connection | None = None  # used on the event loop thread
        self._r: sqlite3.Connection | None = None
        self._topics: dict[str, tuple[int, TopicSpec]] = {}
        self._last_dedup_sweep = 0.0
        self._signal = signal_for(path)

    @classmethod
    async def open(cls, url: str) -> SqliteBroker:
        """Open (creating if needed) the database at ``sqlite:///PATH``."""
        path, options = sqlite_path(url)
        fsync = options.get("fsync", "0").lower() in ("1", "true", "yes", "on")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self = cls(url, path, fsync)
            await self._on_writer(self._init_writer)
            await self._on_reader(self._init_reader)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"broker url {url!r}: cannot open {path}: {exc}") from exc
        return self

    # -- threads ---------------------------------------------------------------------
    async def _on_writer(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._writer_pool, fn, *args)

    async def _on_reader(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, fn, *args)

    def _init_writer(self) -> None:
        self._w = _connect(self.path, "FULL" if self.fsync else "NORMAL")
        self._w.execute("PRAGMA wal_autocheckpoint=0")  # see shoal.walcheckpoint
        for attempt in range(50):
            try:
                self._w.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError:  # another process is creating it
                if attempt == 49:
                    raise
                time.sleep(0.05)

    def _init_reader(self) -> None:
        self._r = _connect(self.path, "NORMAL")
        self._r.execute("PRAGMA query_only=1")

    # -- topics ----------------------------------------------------------------------
    def _lookup(self, conn: sqlite3.Connection, name: str) -> tuple[int, TopicSpec] | None:
        cached = self._topics.get(name)
        if cached is not None:
            return cached
        row = conn.execute(
            "SELECT id, partitions, retention_seconds, retention_bytes FROM topics WHERE name=?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        found = (row[0], TopicSpec(name, row[1], row[2], row[3]))
        self._topics[name] = found
        return found

    def _create_topic(self, spec: TopicSpec) -> TopicSpec:
        w = self._w
        assert w is not None
        begin_immediate(w, BUSY_TIMEOUT_MS / 1000)
        try:
            self._topics.pop(spec.name, None)
            found = self._lookup(w, spec.name)
            if found is None:
                cur = w.execute(
                    "INSERT INTO topics (name, partitions, retention_seconds, retention_bytes)"
                    " VALUES (?,?,?,?)",
                    (spec.name, spec.partitions, spec.retention_seconds, spec.retention_bytes),
                )
                w.executemany(
                    "INSERT INTO partitions (topic_id, partition) VALUES (?,?)",
                    [(cur.lastrowid, p) for p in range(spec.partitions)],
                )
                found = (cur.lastrowid, spec)  # type: ignore[assignment]
            w.execute("COMMIT")
        except BaseException:
            w.execute("ROLLBACK")
            raise
        assert found is not None
        self._topics[spec.name] = found
        return found[1]

    async def create_topic(self, spec: TopicSpec) -> TopicSpec:
        existing = await self._on_writer(self._create_topic, spec)
        if existing.partitions != spec.partitions:
            raise TopicError(
                f"topic {spec.name!r} exists with {existing.partitions} partitions, "
                f"not {spec.partitions}"
            )
        return existing

    async def get_topic(self, name: str) -> TopicSpec | None:
        found = await self._on_reader(self._lookup, self._r, name)
        return None if found is None else found[1]

    async def list_topics(self) -> list[TopicSpec]:
        def run() -> list[TopicSpec]:
            assert self._r is not None
            rows = self._r.execute(
                "SELECT name, partitions, retention_seconds, retention_bytes FROM topics"
                " ORDER BY name"
            ).fetchall()
            return [TopicSpec(*row) for row in rows]

        return await self._on_reader(run)

    def _topic_id(self, conn: sqlite3.Connection, topic: str) -> int:
        found = self._lookup(conn, topic)
        if found is None:
            raise TopicError(f"topic {topic!r} does not exist")
        return found[0]

    # -- the write path --------------------------------------------------------------
    def _append(self, topic: str, records: list[Append]) -> list[Appended]:
        w = self._w
        assert w is not None
        tid = self._topic_id(w, topic)
        now = time.time()
        begin_immediate(w, BUSY_TIMEOUT_MS / 1000)
        try:
            next_offset = dict(
                w.execute("SELECT partition, next_offset FROM partitions WHERE topic_id=?", (tid,))
            )
            out: list[Appended] = []
            per_partition: dict[int, list[tuple[int, str | None, bytes]]] = {}
            dedup_rows: list[tuple[int, str, int, int, float]] = []
            batch_ids: dict[str, Appended] = {}
            for r in records:
                if r.dedup_id is not None:
                    seen = batch_ids.get(r.dedup_id) or self._seen(w, tid, r.dedup_id, now)
                    if seen is not None:
                        out.append(Appended(seen.partition, seen.offset, True))
                        continue
                off = next_offset[r.partition]
                next_offset[r.partition] = off + 1
                per_partition.setdefault(r.partition, []).append((r.timestamp_ms, r.key, r.value))
                ack = Appended(r.partition, off)
                if r.dedup_id is not None:
                    batch_ids[r.dedup_id] = ack
                    dedup_rows.append(
                        (tid, r.dedup_id, r.partition, off, now + self.dedup_window_seconds)
                    )
                out.append(ack)
            rows = []
            for p, recs in per_partition.items():
                end = next_offset[p]
                size = sum(len(v) for (_, _, v) in recs)
                max_ts = max(ts for (ts, _, _) in recs)
                rows.append((tid, p, end, end - len(recs), max_ts, size, _encode_batch(recs)))
            w.executemany(
                "INSERT INTO batches (topic_id, partition, end_offset, base_offset, max_ts,"
                " size_bytes, records) VALUES (?,?,?,?,?,?,?)",
                rows,
            )
            w.executemany(
                "UPDATE partitions SET next_offset=?, size_bytes=size_bytes+?"
                " WHERE topic_id=? AND partition=?",
                [(row[2], row[5], tid, row[1]) for row in rows],
            )
            if dedup_rows:
                w.executemany(
                    "INSERT OR REPLACE INTO dedup (topic_id, id, partition, offset, expires)"
                    " VALUES (?,?,?,?,?)",
                    dedup_rows,
                )
                if now - self._last_dedup_sweep > 10.0:
                    self._last_dedup_sweep = now
                    w.execute("DELETE FROM dedup WHERE expires<=?", (now,))
            w.execute("COMMIT")
        except BaseException:
            if w.in_transaction:
                w.execute("ROLLBACK")
            raise
        return out

    @staticmethod
    def _seen(w: sqlite3.Connection, tid: int, dedup_id: str, now: float) -> Appended | None:
        row = w.execute(
            "SELECT partition, offset FROM dedup WHERE topic_id=? AND id=? AND expires>?",
            (tid, dedup_id, now),
        ).fetchone()
        return None if row is None else Appended(row[0], row[1])

    async def append(self, topic: str, records: list[Append]) -> list[Appended]:
        out = await self._on_writer(self._append, topic, records)
        self._signal.notify()
        self._checkpointer.after_write()
        return out

    # -- the read path ---------------------------------------------------------------
    def _read(
        self, topic: str, partition: int, offset: int, limit: int,
        conn: sqlite3.Connection | None = None,
    ) -> list[Record]:
        r = conn or self._r
        assert r is not None
        tid = self._topic_id(r, topic)
        out: list[Record] = []
        cursor = r.execute(
            "SELECT base_offset, records FROM batches WHERE topic_id=? AND partition=?"
            " AND end_offset>? ORDER BY end_offset",
            (tid, partition, offset),
        )
        for base, blob in cursor:
            recs = _decode_batch(blob)
            skip = max(0, offset - base)
            for i in range(skip, len(recs)):
                ts, key, value = recs[i]
                out.append(Record(partition, base + i, ts, key, value))
            if len(out) >= limit:
                break
        cursor.close()
        return out[:limit]

    async def read(self, topic: str, partition: int, offset: int, limit: int) -> list[Record]:
        """Read; small reads (a consumer keeping up) run inline, big ones on the reader thread.

        A WAL reader takes no lock a writer holds, so a read of a few rows costs tens of
        microseconds, less than the thread hop; inline reads use their own connection
        with a short busy timeout and fall back to the thread if SQLite says busy.
        """
        if limit <= INLINE_READ_LIMIT:
            if self._inline is None:
                self._inline = _connect(self.path, "NORMAL", busy_ms=20)
                self._inline.execute("PRAGMA query_only=1")
            try:
                return self._read(topic, partition, offset, limit, self._inline)
            except sqlite3.OperationalError:
                pass
        return await self._on_reader(self._read, topic, partition, offset, limit)

    async def ranges(self, topic: str) -> list[PartitionRange]:
        def run() -> list[PartitionRange]:
            assert self._r is not None
            tid = self._topic_id(self._r, topic)
            rows = self._r.execute(
                "SELECT start_offset, next_offset, size_bytes FROM partitions"
                " WHERE topic_id=? ORDER BY partition",
                (tid,),
            ).fetchall()
            return [PartitionRange(*row) for row in rows]

        return await self._on_reader(run)

    async def offset_for_time(self, topic: str, partition: int, timestamp_ms: int) -> int:
        def run() -> int:
            assert self._r is not None
            tid = self._topic_id(self._r, topic)
            for base, blob in self._r.execute(
                "SELECT base_offset, records FROM batches WHERE topic_id=? AND partition=?"
                " AND max_ts>=? ORDER BY end_offset",
                (tid, partition, timestamp_ms),
            ):
                for i, (ts, _, _) in enumerate(_decode_batch(blob)):
                    if ts >= timestamp_ms:
                        return int(base + i)
            (end,) = self._r.execute(
                "SELECT next_offset FROM partitions WHERE topic_id=? AND partition=?",
                (tid, partition),
            ).fetchone()
            return int(end)

        return await self._on_reader(run)

    def append_generation(self, topic: str) -> int:
        return self._signal.generation

    async def wait_for_append(self, topic: str, since: int, timeout: float) -> None:
        await self._signal.wait(timeout, since=since)

    # -- retention -------------------------------------------------------------------
    def _apply_retention(self, topic: str) -> int:
        """Drop whole batches older than the age limit, then oldest-first above the size."""
        w = self._w
        assert w is not None
        found = self._lookup(w, topic)
        if found is None:
            raise TopicError(f"topic {topic!r} does not exist")
        tid, spec = found
        if spec.retention_seconds is None and spec.retention_bytes is None:
            return 0
        cutoff = -1
        if spec.retention_seconds is not None:
            cutoff = int((time.time() - spec.retention_seconds) * 1000)
        removed = 0
        begin_immediate(w, BUSY_TIMEOUT_MS / 1000)
        try:
            parts = w.execute(
                "SELECT partition, size_bytes FROM partitions WHERE topic_id=?", (tid,)
            ).fetchall()
            for p, size in parts:
                drop_to, gone_bytes, gone = None, 0, 0
                for end, base, max_ts, nbytes in w.execute(
                    "SELECT end_offset, base_offset, max_ts, size_bytes FROM batches"
                    " WHERE topic_id=? AND partition=? ORDER BY end_offset",
                    (tid, p),
                ):
                    too_old = max_ts < cutoff
                    too_big = (
                        spec.retention_bytes is not None
                        and size - gone_bytes > spec.retention_bytes
                    )
                    if not (too_old or too_big):
                        break
                    drop_to, gone_bytes, gone = end, gone_bytes + nbytes, gone + end - base
                if drop_to is not None:
                    w.execute(
                        "DELETE FROM batches WHERE topic_id=? AND partition=? AND end_offset<=?",
                        (tid, p, drop_to),
                    )
                    w.execute(
                        "UPDATE partitions SET start_offset=?, size_bytes=size_bytes-?"
                        " WHERE topic_id=? AND partition=?",
                        (drop_to, gone_bytes, tid, p),
                    )
                    removed += gone
            w.execute("COMMIT")
        except BaseException:
            if w.in_transaction:
                w.execute("ROLLBACK")
            raise
        return removed

    async def apply_retention(self, topic: str) -> int:
        return await self._on_writer(self._apply_retention, topic)

    async def close(self) -> None:
        def close_w() -> None:
            if self._w is not None:
                self._w.close()
                self._w = None

        def close_r() -> None:
            if self._r is not None:
                self._r.close()
                self._r = None

        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self._signal is not None:
            self._signal.release()
            self._signal = None
        await self._on_writer(close_w)
        await self._on_reader(close_r)
        await self._checkpointer.close()
        self._writer_pool.shutdown(wait=False)
        self._reader_pool.shutdown(wait=False)
