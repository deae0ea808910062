"""The Store contract, run unchanged against every adapter (memory, sqlite, nats, redis)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from shoal.errors import LeaseExpired, StoreError
from shoal.store import Change, Store, connect_store
from shoal.store.memory import MemoryStore
from shoal.store.redis import RedisStore
from shoal.store.sqlite import SqliteStore
from tests.redis_server import RedisServer

TTL = 0.3
SLACK = 0.5  # how late after its expiry a lease's deletes may be seen


class Backend:
    """Opens clients of one fresh store; every client opened is closed after the test."""

    def __init__(self, kind: str, tmp_path: Path, nats_base: str = "",
                 redis: RedisServer | None = None) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.nats_base = nats_base
        self.redis = redis
        self.url = {
            "memory": f"memory://conformance-{uuid.uuid4().hex}",
            "sqlite": f"sqlite:///{tmp_path}/store.db",
            "nats": f"{nats_base}/t{uuid.uuid4().hex[:12]}",
            "redis": redis.url() if redis is not None else "",
        }[kind]
        self.opened: list[Store] = []

    async def client(self) -> Store:
        """Another client of the same store (shared state)."""
        store = await connect_store(self.url)
        self.opened.append(store)
        return store

    async def private(self, history: int) -> Store:
        """A separate store keeping only ``history`` changes for watch replay."""
        if self.kind == "memory":
            store: Store = MemoryStore(history=history)
        elif self.kind == "nats":
            from shoal.store.nats import NatsStore

            store = await NatsStore.open(f"{self.nats_base}/t{uuid.uuid4().hex[:12]}",
                                         history=history)
        elif self.kind == "redis":
            assert self.redis is not None
            store = await RedisStore.open(self.redis.url(), history=history)
        else:
            store = await SqliteStore.open(f"sqlite:///{self.tmp_path}/small.db", history=history)
        self.opened.append(store)
        return store


@pytest.fixture(params=["memory", "sqlite", "nats", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    nats_base = request.getfixturevalue("nats_server").url if request.param == "nats" else ""
    redis = request.getfixturevalue("redis_server") if request.param == "redis" else None
    b = Backend(request.param, tmp_path, nats_base, redis)
    yield b
    for store in b.opened:
        await store.close()


@pytest.fixture
async def store(backend: Backend) -> Store:
    return await backend.client()


async def next_change(watch: AsyncIterator[Change], timeout: float = 2.0) -> Change:
    async with asyncio.timeout(timeout):
        return await anext(watch)


async def assert_quiet(watch: AsyncIterator[Change], for_seconds: float) -> None:
    """Nothing arrives on ``watch`` for ``for_seconds`` (a non-event needs a timeout)."""
    with pytest.raises(TimeoutError):
        got = await next_change(watch, for_seconds)
        pytest.fail(f"unexpected change {got}")


# -- key-value -------------------------------------------------------------------------
async def test_put_get_list_delete(store: Store) -> None:
    assert await store.get("a/1") is None
    r1 = await store.put("a/1", b"one")
    r2 = await store.put("a/2", b"two")
    await store.put("b/1", b"other")
    entry = await store.get("a/1")
    assert entry is not None
    assert (entry.key, entry.value, entry.revision, entry.lease) == ("a/1", b"one", r1, None)
    assert [(e.key, e.value, e.revision) for e in await store.list("a/")] == [
        ("a/1", b"one", r1),
        ("a/2", b"two", r2),
    ]
    assert [e.key for e in await store.list("")] == ["a/1", "a/2", "b/1"]
    assert await store.delete("a/1") is True
    assert await store.delete("a/1") is False
    assert await store.get("a/1") is None
    assert [e.key for e in await store.list("a/")] == ["a/2"]


async def test_list_is_sorted_and_prefix_exact(store: Store) -> None:
    for key in ["p/b", "p/a", "p0", "p/\u00e9", "p/\U0010ffff", "q", "p/a/x"]:
        await store.put(key, key.encode())
    expected = ["p/a", "p/a/x", "p/b", "p/\u00e9", "p/\U0010ffff"]
    assert [e.key for e in await store.list("p/")] == expected
    assert [e.key for e in await store.list("p/\U0010ffff")] == ["p/\U0010ffff"]
    assert await store.list("zzz") == []


async def test_empty_and_max_size_values_round_trip(store: Store) -> None:
    await store.put("k/empty", b"")
    big = bytes(range(256)) * 4096  # exactly 1 MiB
    await store.put("k/big", bytearray(big))
    assert (await store.get("k/empty")).value == b""  # type: ignore[union-attr]
    assert (await store.get("k/big")).value == big  # type: ignore[union-attr]
    await store.put("x" * 1024, b"longest key")
    assert (await store.get("x" * 1024)) is not None


async def test_revisions_monotonic_and_only_writes_bump_them(store: Store) -> None:
    start = await store.revision()
    revs = [await store.put(f"r/{i % 3}", b"v") for i in range(6)]
    assert revs == list(range(start + 1, start + 7))
    assert await store.revision() == revs[-1]
    assert await store.cas("r/0", b"x", expected_revision=1_000_000) is None
    assert await store.delete("r/none") is False
    assert await store.delete("r/0", expected_revision=1_000_000) is False
    assert await store.revision() == revs[-1]
    assert await store.delete("r/0") is True
    assert await store.revision() == revs[-1] + 1


async def test_cas_absent_and_stale(store: Store) -> None:
    r1 = await store.cas("c/k", b"first", expected_revision=0)
    assert r1 is not None
    assert await store.cas("c/k", b"again", expected_revision=0) is None
    r2 = await store.cas("c/k", b"second", expected_revision=r1)
    assert r2 is not None and r2 > r1
    assert await store.cas("c/k", b"stale", expected_revision=r1) is None
    assert (await store.get("c/k")).value == b"second"  # type: ignore[union-attr]
    assert await store.delete("c/k", expected_revision=r1) is False
    assert await store.delete("c/k", expected_revision=r2) is True
    assert await store.cas("c/k", b"reborn", expected_revision=0) is not None


async def test_concurrent_cas_exactly_one_wins(backend: Backend) -> None:
    clients = [await backend.client() for _ in range(3)]
    for round_ in range(5):
        key = f"lock/{round_}"
        base = 0
        if round_ % 2:
            base = await clients[0].put(key, b"base")
        results = await asyncio.gather(
            *(c.cas(key, f"{i}".encode(), expected_revision=base) for i, c in enumerate(clients))
        )
        winners = [i for i, r in enumerate(results) if r is not None]
        assert len(winners) == 1, results
        entry = await clients[1].get(key)
        assert entry is not None
        assert entry.value == f"{winners[0]}".encode()
        assert entry.revision == results[winners[0]]


# -- leases ----------------------------------------------------------------------------
async def test_lease_keepalive_keeps_keys(store: Store) -> None:
    lease = await store.lease(TTL)
    await store.put("l/k", b"held", lease=lease)
    assert (await store.get("l/k")).lease == lease.id  # type: ignore[union-attr]
    deadline = time.monotonic() + 3 * TTL
    while time.monotonic() < deadline:
        await asyncio.sleep(TTL / 3)
        await lease.keepalive()
    assert (await store.get("l/k")) is not None


async def test_lease_expiry_deletes_keys_and_watchers_see_it(backend: Backend) -> None:
    holder, watcher = await backend.client(), await backend.client()
    changes = watcher.watch("l/")
    lease = await holder.lease(TTL)
    granted = time.monotonic()
    await holder.put("l/a", b"1", lease=lease)
    await holder.put("l/b", b"2", lease=lease)
    await holder.put("l/free", b"3")
    assert [c.kind for c in [await next_change(changes) for _ in range(3)]] == ["put"] * 3
    deletes = [await next_change(changes, TTL + SLACK) for _ in range(2)]
    assert time.monotonic() - granted < TTL + SLACK
    assert [(c.kind, c.key) for c in deletes] == [("delete", "l/a"), ("delete", "l/b")]
    assert deletes[0].revision < deletes[1].revision
    assert [e.key for e in await holder.list("l/")] == ["l/free"]
    with pytest.raises(LeaseExpired):
        await lease.keepalive()
    before = await holder.revision()
    with pytest.raises(LeaseExpired):
        await holder.put("l/late", b"x", lease=lease)
    assert await holder.get("l/late") is None
    assert await holder.revision() == before


async def test_expired_lease_is_swept_without_watchers(store: Store) -> None:
    lease = await store.lease(0.05)
    await store.put("s/k", b"v", lease=lease)
    await asyncio.sleep(0.1)  # the passage of time is what is under test
    assert await store.get("s/k") is None


async def test_revoke_deletes_keys_now(backend: Backend) -> None:
    store, watcher = await backend.client(), await backend.client()
    changes = watcher.watch("v/")
    lease = await store.lease(60)
    await store.put("v/a", b"1", lease=lease)
    await store.put("v/b", b"2", lease=lease)
    await store.put("v/b", b"2 unleased")  # a put without the lease detaches the key
    for _ in range(3):
        await next_change(changes)
    await lease.revoke()
    change = await next_change(changes)
    assert (change.kind, change.key, change.value) == ("delete", "v/a", None)
    assert [e.key for e in await store.list("v/")] == ["v/b"]
    await lease.revoke()  # idempotent
    with pytest.raises(LeaseExpired):
        await lease.keepalive()
    await assert_quiet(changes, 0.1)


async def test_lease_moves_with_the_last_put(store: Store) -> None:
    first, second = await store.lease(60), await store.lease(60)
    await store.put("m/k", b"1", lease=first)
    await store.put("m/k", b"2", lease=second)
    await first.revoke()
    assert (await store.get("m/k")).value == b"2"  # type: ignore[union-attr]
    await second.revoke()
    assert await store.get("m/k") is None


# -- watch -----------------------------------------------------------------------------
async def test_watch_from_now(backend: Backend) -> None:
    writer, reader = await backend.client(), await backend.client()
    await writer.put("w/old", b"before")
    changes = reader.watch("w/")
    r1 = await writer.put("w/1", b"a")
    await writer.delete("w/1")
    r3 = await writer.put("w/2", b"b")
    got = [await next_change(changes) for _ in range(3)]
    assert got == [
        Change("put", "w/1", b"a", r1),
        Change("delete", "w/1", None, r1 + 1),
        Change("put", "w/2", b"b", r3),
    ]


async def test_watch_after_revision_replays_then_follows(store: Store) -> None:
    r0 = await store.revision()
    revs = [await store.put(f"h/{i}", str(i).encode()) for i in range(5)]
    changes = store.watch("h/", after_revision=revs[1])
    assert [c.revision for c in [await next_change(changes) for _ in range(3)]] == revs[2:]
    live = await store.put("h/live", b"x")
    assert (await next_change(changes)).revision == live
    everything = store.watch("h/", after_revision=r0)
    assert [(await next_change(everything)).key for _ in range(6)] == [
        "h/0", "h/1", "h/2", "h/3", "h/4", "h/live"
    ]


async def test_watch_filters_by_prefix(store: Store) -> None:
    changes = store.watch("svc/a/")
    await store.put("svc/b/1", b"no")
    await store.put("svc/a", b"no: not under the prefix")
    await store.put("svc/a/1", b"yes")
    await store.put("svc/ab/1", b"no")
    await store.delete("svc/b/1")
    await store.put("svc/a/2", b"yes")
    assert [(await next_change(changes)).key for _ in range(2)] == ["svc/a/1", "svc/a/2"]
    await assert_quiet(changes, 0.1)


async def test_timeout_around_anext_keeps_the_watch(store: Store) -> None:
    changes = store.watch("t/")
    for _ in range(3):
        await assert_quiet(changes, 0.02)  # each cancels a pending anext()
    revision = await store.put("t/1", b"x")
    assert (await next_change(changes)) == Change("put", "t/1", b"x", revision)


async def test_aclose_ends_a_watch(store: Store) -> None:
    changes = store.watch("e/")
    await store.put("e/1", b"x")
    await changes.aclose()  # type: ignore[attr-defined]
    with pytest.raises(StopAsyncIteration):
        await next_change(changes)


async def test_many_watchers_and_close_ends_them(backend: Backend) -> None:
    writer, reader = await backend.client(), await backend.client()
    watches = [reader.watch("n/") for _ in range(5)]
    await writer.put("n/1", b"x")
    for w in watches:
        assert (await next_change(w)).key == "n/1"
    pending = asyncio.ensure_future(anext(watches[0]))
    await asyncio.sleep(0)
    await reader.close()
    with pytest.raises(StopAsyncIteration):
        async with asyncio.timeout(2):
            await pending
    with pytest.raises(StoreError, match="closed"):
        await reader.get("n/1")
    assert (await writer.get("n/1")) is not None  # other clients keep working
    await writer.put("n/2", b"y")


async def test_watcher_behind_compaction_gets_store_error(backend: Backend) -> None:
    store = await backend.private(history=5)
    for i in range(30):
        await store.put("c/k", str(i).encode())
    with pytest.raises(StoreError, match="fell behind"):
        await next_change(store.watch("c/", after_revision=1))
    recent = store.watch("c/", after_revision=await store.revision() - 3)
    assert (await next_change(recent)).value == b"27"


# -- bad input -------------------------------------------------------------------------
BAD_INPUT: list[tuple[str, Callable[[Store], Awaitable[object]], str]] = [
    ("empty key", lambda s: s.put("", b"v"), "empty"),
    ("NUL in key", lambda s: s.put("a\0b", b"v"), "NUL"),
    ("oversized key", lambda s: s.put("k" * 1025, b"v"), "1025 chars"),
    ("non-str key", lambda s: s.put(b"k", b"v"), "must be a str"),  # type: ignore[arg-type]
    ("lone surrogate", lambda s: s.put("k\ud800", b"v"), "surrogate"),
    ("oversized value", lambda s: s.put("k", b"x" * (1024 * 1024 + 1)), "1 MiB"),
    ("str value", lambda s: s.put("k", "text"), "must be bytes"),  # type: ignore[arg-type]
    ("None value", lambda s: s.cas("k", None, expected_revision=0), "must be bytes"),  # type: ignore[arg-type]
    ("negative cas revision", lambda s: s.cas("k", b"v", expected_revision=-1), ">= 0"),
    ("zero ttl", lambda s: s.lease(0), "> 0"),
    ("negative ttl", lambda s: s.lease(-1), "> 0"),
    ("nan ttl", lambda s: s.lease(float("nan")), "> 0"),
    ("str ttl", lambda s: s.lease("1s"), "number"),  # type: ignore[arg-type]
    ("empty key in get", lambda s: s.get(""), "empty"),
    ("NUL in delete", lambda s: s.delete("\0"), "NUL"),
    ("NUL in list prefix", lambda s: s.list("a\0"), "prefix"),
]


@pytest.mark.parametrize("call,match", [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT])
async def test_bad_input_is_refused_and_changes_nothing(
    store: Store, call: Callable[[Store], Awaitable[object]], match: str
) -> None:
    await store.put("k", b"original")
    before = await store.revision()
    with pytest.raises(StoreError, match=match):
        await call(store)
    assert await store.revision() == before
    assert [(e.key, e.value) for e in await store.list("")] == [("k", b"original")]


async def test_bad_watch_arguments_raise_at_call(store: Store) -> None:
    with pytest.raises(StoreError, match="NUL"):
        store.watch("a\0")
    with pytest.raises(StoreError, match=">= 0"):
        store.watch("a/", after_revision=-5)


async def test_lease_from_another_store_is_refused(backend: Backend, tmp_path: Path) -> None:
    store = await backend.client()
    other = await backend.private(history=10)
    lease = await other.lease(60)
    with pytest.raises(StoreError, match="another store"):
        await store.put("k", b"v", lease=lease)
    assert await store.get("k") is None
