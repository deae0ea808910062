"""A consumer-group member under store faults: it must never stop rejoining or delivering.

The faults are those a replicated store shows while it elects a leader (a NATS node
killed with -9): a lease lost while unreachable, then writes failing with ``StoreError``
for a while, including the very writes that rejoin the group. The store is the memory
store behind a wrapper that fails chosen operations; the broker is the memory broker.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shoal.errors import LeaseExpired, StoreError
from shoal.events import EventBus
from shoal.events.consumer import Subscription
from shoal.events.group import group_prefix
from shoal.store.base import Change, Entry, Lease, Store
from shoal.store.memory import MemoryStore
from tests.helpers import eventually

PARTITIONS = 4


class FlakyLease(Lease):
    """A memory lease whose next keepalive can be made to answer ``LeaseExpired`` while
    the lease lives on in the store (the client gave up on it before the store did)."""

    def __init__(self, inner: Lease) -> None:
        self.inner = inner
        self.id = inner.id
        self.ttl = inner.ttl
        self.presumed_expired = False
        self.failures = 0  # keepalives still to fail with StoreError
        self.renewed = 0

    async def keepalive(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreError(f"lease {self.id}: keepalive failed: no response (test)")
        if self.presumed_expired:
            raise LeaseExpired(f"lease {self.id}: presumed expired by the test")
        await self.inner.keepalive()
        self.renewed += 1

    async def revoke(self) -> None:
        await self.inner.revoke()


class FlakyStore(Store):
    """A ``MemoryStore`` whose operations named in ``failures`` fail that many more times."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.url = "flaky+memory://"
        self.failures: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.leases: list[FlakyLease] = []

    def _maybe_fail(self, op: str) -> None:
        if self.failures.get(op, 0) > 0:
            self.failures[op] -= 1
            self.failed[op] = self.failed.get(op, 0) + 1
            raise StoreError(f"store {self.url}: {op} failed: no response from stream (test)")

    @staticmethod
    def _unwrap(lease: Lease | None) -> Lease | None:
        return lease.inner if isinstance(lease, FlakyLease) else lease

    async def get(self, key: str) -> Entry | None:
        self._maybe_fail("get")
        return await self.inner.get(key)

    async def list(self, prefix: str) -> list[Entry]:
        self._maybe_fail("list")
        return await self.inner.list(prefix)

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        self._maybe_fail("put")
        return await self.inner.put(key, value, lease=self._unwrap(lease))

    async def cas(self, key: str, value: bytes, *, expected_revision: int,
                  lease: Lease | None = None) -> int | None:
        self._maybe_fail("cas")
        return await self.inner.cas(key, value, expected_revision=expected_revision,
                                    lease=self._unwrap(lease))

    async def delete(self, key: str, *, expected_revision: int | None = None) -> bool:
        self._maybe_fail("delete")
        return await self.inner.delete(key, expected_revision=expected_revision)

    async def lease(self, ttl: float) -> Lease:
        self._maybe_fail("lease")
        lease = FlakyLease(await self.inner.lease(ttl))
        self.leases.append(lease)
        return lease

    def watch(self, prefix: str, *, after_revision: int | None = None) -> AsyncIterator[Change]:
        return self.inner.watch(prefix, after_revision=after_revision)

    async def revision(self) -> int:
        return await self.inner.revision()

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[EventBus, FlakyStore]]:
    store = FlakyStore()
    async with EventBus.connect(f"memory://{uuid.uuid4().hex}", store=store,
                                source="/tests/group-faults") as bus:
        await bus.create_topic("t", partitions=PARTITIONS)
        yield bus, store
    await store.close()


async def subscribe(bus: EventBus, seen: set[str], session_timeout: float) -> Subscription:
    return await bus.subscribe("t", "g", lambda e: seen.add(e.id),
                               session_timeout=session_timeout)


async def publish_and_see(bus: EventBus, seen: set[str], ids: list[Any],
                          timeout: float = 5.0) -> None:
    for i in ids:
        await bus.publish("t", {"i": i}, key=f"k{i}", id=f"e{i}")
    await eventually(lambda: {f"e{i}" for i in ids} <= seen, timeout=timeout,
                     what="every event published after the fault to be delivered")


async def members(store: FlakyStore) -> list[str]:
    return [e.key for e in await store.inner.list(group_prefix("t", "g") + "members/")]


@pytest.mark.parametrize("failing", ["lease", "put"])
async def test_member_rejoins_when_the_rejoin_itself_fails(
    flaky: tuple[EventBus, FlakyStore], failing: str,
) -> None:
    """Lease lost, then the rejoin's own store writes fail a few times: the member keeps
    trying, rejoins, reclaims every partition and delivery resumes."""
    bus, store = flaky
    seen: set[str] = set()
    sub = await subscribe(bus, seen, session_timeout=0.3)
    await publish_and_see(bus, seen, range(8))
    store.failures[failing] = 3
    await store.leases[-1].inner.revoke()  # what the store does to a member presumed dead
    await eventually(lambda: store.failed.get(failing, 0) == 3, timeout=5,
                     what=f"the rejoin's {failing} to fail three times")
    await publish_and_see(bus, seen, range(8, 40))
    assert sub.member.owned == set(range(PARTITIONS))
    assert len(await members(store)) == 1
    assert len(store.leases) >= 2  # a new lease: the member rejoined


async def test_member_keeps_renewing_through_failing_keepalives(
    flaky: tuple[EventBus, FlakyStore],
) -> None:
    """Keepalives failing until the lease ran out (3 x ttl/3): the member notices, rejoins
    and goes on."""
    bus, store = flaky
    seen: set[str] = set()
    sub = await subscribe(bus, seen, session_timeout=0.3)
    store.leases[-1].failures = 3
    await eventually(lambda: len(store.leases) >= 2, timeout=5, what="a rejoin")
    await publish_and_see(bus, seen, range(20))
    assert sub.member.owned == set(range(PARTITIONS))


async def test_a_failed_keepalive_is_retried_before_the_lease_runs_out(
    flaky: tuple[EventBus, FlakyStore],
) -> None:
    """Two keepalives failing (a leader election): the third try comes soon enough to keep
    the lease (a 3 s session renews at 1 s; waiting another 1 s after each failure would
    renew at 3 s, when the lease is gone), so the member keeps its partitions."""
    bus, store = flaky
    seen: set[str] = set()
    sub = await subscribe(bus, seen, session_timeout=3.0)
    lease = store.leases[-1]
    lease.failures = 2
    await eventually(lambda: lease.renewed >= 1, timeout=2.5, what="a renewal")
    assert store.leases == [lease]  # no rejoin was needed
    assert sub.member.owned == set(range(PARTITIONS))


async def test_member_takes_back_its_own_claims_without_waiting_for_the_old_lease(
    flaky: tuple[EventBus, FlakyStore],
) -> None:
    """The client gave its lease up while the store still holds it (and our claims on it):
    after rejoining, the member takes its claims back at once instead of waiting for the
    old lease to run out."""
    bus, store = flaky
    seen: set[str] = set()
    sub = await subscribe(bus, seen, session_timeout=3.0)  # keepalive after 1 s
    old = store.leases[-1]
    old.presumed_expired = True
    await eventually(lambda: len(store.leases) >= 2, timeout=5, what="a rejoin")
    await eventually(lambda: sub.member.owned == set(range(PARTITIONS)), timeout=1.5,
                     what="every partition claimed again")
    assert old.id in store.inner._state.leases  # the old lease still lived meanwhile
    claims = await store.inner.list(group_prefix("t", "g") + "owners/")
    assert {e.lease for e in claims} == {store.leases[-1].id}
    await publish_and_see(bus, seen, range(20))


async def test_rebalance_failures_do_not_end_the_member(
    flaky: tuple[EventBus, FlakyStore],
) -> None:
    """Listing and claiming failing for a while after a lease loss: the member retries."""
    bus, store = flaky
    seen: set[str] = set()
    sub = await subscribe(bus, seen, session_timeout=0.3)
    store.failures.update(list=3, cas=2)
    await store.leases[-1].inner.revoke()
    await eventually(lambda: store.failed.get("list", 0) == 3, timeout=5,
                     what="the rebalance's list to fail three times")
    await publish_and_see(bus, seen, range(20))
    assert sub.member.owned == set(range(PARTITIONS))
