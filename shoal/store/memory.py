"""The in-process Store: for users' unit tests and single-process tools.

``MemoryStore.named("memory://NAME")`` gives a new client on the state shared by every
client of that URL in this process (two "services" in one test see each other); closing
one client ends only its own watchers. ``MemoryStore()`` is private state.

Every operation is synchronous under the hood (no awaits inside), so each is atomic in
the event loop; leases expire on ``time.monotonic()``, swept lazily by every operation
and by a timer in watchers set for the earliest expiry (no polling).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from shoal.errors import LeaseExpired, StoreError
from shoal.store.base import Change, Entry, Lease, Store
from shoal.store.validation import (
    DEFAULT_HISTORY,
    check_key,
    check_prefix,
    check_revision,
    check_ttl,
    check_value,
)
from shoal.store.watch import ChangeStream


@dataclass
class _LeaseRecord:
    ttl: float
    expires_at: float  # time.monotonic()
    keys: set[str] = field(default_factory=set)


class _MemoryState:
    """The data behind one ``memory://`` URL, shared by its clients."""

    def __init__(self, history: int) -> None:
        if history < 1:
            raise StoreError(f"store history: must be >= 1, got {history!r}")
        self.history = history
        self.entries: dict[str, Entry] = {}
        self.revision = 0
        self.leases: dict[int, _LeaseRecord] = {}
        self.next_lease_id = 1
        self.changes: list[Change] = []  # contiguous revisions compacted+1 .. revision
        self.compacted = 0
        self.waiters: set[asyncio.Event] = set()

    def record(self, kind: Literal["put", "delete"], key: str, value: bytes | None) -> int:
        """Append one change at the next revision and wake watchers."""
        self.revision += 1
        self.changes.append(Change(kind, key, value, self.revision))
        if len(self.changes) >= 2 * self.history:  # amortised trim, like the SQLite log
            cut = len(self.changes) - self.history
            self.compacted = self.changes[cut - 1].revision
            del self.changes[:cut]
        for ev in self.waiters:
            ev.set()
        return self.revision

    def since(self, revision: int) -> list[Change]:
        """Every change after ``revision`` (the caller checks compaction first)."""
        return self.changes[max(0, revision - self.compacted) :]

    def remove(self, key: str) -> None:
        """Delete ``key`` (present) and detach it from its lease, recording the change."""
        entry = self.entries.pop(key)
        if entry.lease is not None and entry.lease in self.leases:
            self.leases[entry.lease].keys.discard(key)
        self.record("delete", key, None)

    def drop_lease(self, lease_id: int) -> None:
        """End a lease, deleting its keys in key order."""
        rec = self.leases.pop(lease_id, None)
        if rec is not None:
            for key in sorted(rec.keys):
                self.remove(key)

    def sweep(self) -> None:
        """Drop every lease whose time ran out."""
        now = time.monotonic()
        for lease_id in [i for i, r in self.leases.items() if r.expires_at <= now]:
            self.drop_lease(lease_id)

    def next_expiry(self) -> float | None:
        """Seconds until the earliest lease expiry, or None without leases."""
        if not self.leases:
            return None
        return max(0.0, min(r.expires_at for r in self.leases.values()) - time.monotonic())


class MemoryLease(Lease):
    """A lease in a ``MemoryStore``."""

    def __init__(self, store: MemoryStore, lease_id: int, ttl: float) -> None:
        self._store = store
        self.id = lease_id
        self.ttl = ttl

    async def keepalive(self) -> None:
        state = self._store._open_state()
        rec = state.leases.get(self.id)
        if rec is None:
            raise LeaseExpired(f"lease {self.id} (ttl {self.ttl}s) expired or was revoked")
        rec.expires_at = time.monotonic() + self.ttl

    async def revoke(self) -> None:
        self._store._open_state().drop_lease(self.id)

    def __repr__(self) -> str:
        return f"MemoryLease(id={self.id}, ttl={self.ttl})"


class _MemoryChangeStream(ChangeStream):
    def __init__(self, store: MemoryStore, prefix: str, last: int) -> None:
        super().__init__(prefix, last)
        self._store = store

    async def _fetch(self) -> list[Change] | None:
        store, state = self._store, self._store._state
        while not store._closed:
            state.sweep()
            if self.last < state.compacted:
                raise StoreError(
                    f"store {store.url}: watch on {self.prefix!r} fell behind: changes up to "
                    f"revision {state.compacted} were compacted; list again and watch "
                    f"from the current revision"
                )
            batch = state.since(self.last)
            if batch:
                self.last = batch[-1].revision
                mine = [c for c in batch if c.key.startswith(self.prefix)]
                if mine:
                    return mine
                continue
            ev = asyncio.Event()
            state.waiters.add(ev)
            store._wakers.add(ev)
            try:
                async with asyncio.timeout(state.next_expiry()):
                    await ev.wait()
            except TimeoutError:
                pass  # a lease is due: the next sweep deletes its keys
            finally:
                state.waiters.discard(ev)
                store._wakers.discard(ev)
        return None


class MemoryStore(Store):
    """Store adapter holding everything in this process's memory."""

    _shared: ClassVar[dict[str, _MemoryState]] = {}

    def __init__(
        self,
        url: str = "memory://",
        *,
        history: int = DEFAULT_HISTORY,
        _state: _MemoryState | None = None,
    ) -> None:
        self.url = url
        self._state = _state if _state is not None else _MemoryState(history)
        self._closed = False
        self._wakers: set[asyncio.Event] = set()  # this client's waiting watchers

    @classmethod
    def named(cls, url: str) -> MemoryStore:
        """A client on the process-wide state of ``memory://NAME`` (created on first use)."""
        if not isinstance(url, str) or not url.startswith("memory://"):
            raise StoreError(f"store url: expected memory://NAME, got {url!r}")
        state = cls._shared.get(url)
        if state is None:
            state = cls._shared[url] = _MemoryState(DEFAULT_HISTORY)
        return cls(url, _state=state)

    def _open_state(self) -> _MemoryState:
        if self._closed:
            raise StoreError(f"store {self.url}: this client is closed")
        self._state.sweep()
        return self._state

    def _lease_id(self, lease: Lease | None) -> int | None:
        if lease is None:
            return None
        if not isinstance(lease, MemoryLease) or lease._store._state is not self._state:
            raise StoreError(f"store {self.url}: {lease!r} was granted by another store")
        if lease.id not in self._state.leases:
            raise LeaseExpired(f"lease {lease.id} (ttl {lease.ttl}s) expired or was revoked")
        return lease.id

    def _write(self, key: str, value: bytes, lease_id: int | None) -> int:
        state = self._state
        old = state.entries.get(key)
        if old is not None and old.lease is not None and old.lease in state.leases:
            state.leases[old.lease].keys.discard(key)
        revision = state.record("put", key, value)
        state.entries[key] = Entry(key, value, revision, lease_id)
        if lease_id is not None:
            state.leases[lease_id].keys.add(key)
        return revision

    async def get(self, key: str) -> Entry | None:
        key = check_key(key)
        return self._open_state().entries.get(key)

    async def list(self, prefix: str) -> list[Entry]:
        prefix = check_prefix(prefix)
        entries = self._open_state().entries
        return [entries[k] for k in sorted(k for k in entries if k.startswith(prefix))]

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        key = check_key(key)
        value = check_value(key, value)
        self._open_state()
        return self._write(key, value, self._lease_id(lease))

    async def cas(
        self, key: str, value: bytes, *, expected_revision: int, lease: Lease | None = None
    ) -> int | None:
        key = check_key(key)
        value = check_value(key, value)
        expected = check_revision(expected_revision, "cas expected_revision")
        state = self._open_state()
        lease_id = self._lease_id(lease)
        current = state.entries.get(key)
        if (current.revision if current else 0) != expected:
            return None
        return self._write(key, value, lease_id)

    async def delete(self, key: str, *, expected_revision: int | None = None) -> bool:
        key = check_key(key)
        if expected_revision is not None:
            check_revision(expected_revision, "delete expected_revision")
        state = self._open_state()
        current = state.entries.get(key)
        if current is None or expected_revision not in (None, current.revision):
            return False
        state.remove(key)
        return True

    async def lease(self, ttl: float) -> Lease:
        ttl = check_ttl(ttl)
        state = self._open_state()
        lease_id, state.next_lease_id = state.next_lease_id, state.next_lease_id + 1
        state.leases[lease_id] = _LeaseRecord(ttl, time.monotonic() + ttl)
        return MemoryLease(self, lease_id, ttl)

    def watch(self, prefix: str, *, after_revision: int | None = None) -> ChangeStream:
        """Changes under ``prefix``; "now" is the moment of this call, not the first ``anext``.

        A watcher further behind than the kept history (``history`` changes) gets a
        ``StoreError``: re-``list`` and watch again from ``revision()``.
        """
        prefix = check_prefix(prefix)
        state = self._open_state()
        if after_revision is None:
            start = state.revision
        else:
            start = check_revision(after_revision, "watch after_revision")
        return _MemoryChangeStream(self, prefix, start)

    async def revision(self) -> int:
        return self._open_state().revision

    async def close(self) -> None:
        """End this client's watchers; the shared state lives on for other clients."""
        self._closed = True
        for ev in self._wakers:
            ev.set()

    def __repr__(self) -> str:
        return f"MemoryStore({self.url!r})"
