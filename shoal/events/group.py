"""Consumer-group membership: who owns which partition, through leases in the Store.

Layout under ``shoal/groups/<topic>/<group>/``:

* ``members/<member>``: one key per live member, on the member's lease;
* ``owners/<partition>``: the member that owns a partition, on the same lease, claimed
  with compare-and-set so ownership is exclusive;
* ``offsets/<partition>``: the committed offset (ASCII), written with compare-and-set
  on the revision the owner last saw, which fences out a stale owner and notices seeks.

When a member dies (even by kill -9) its lease runs out after ``session_timeout``; the
Store deletes its keys, every watcher sees that, and live members claim the partitions,
resuming from the committed offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from shoal.errors import LeaseExpired, StoreError
from shoal.events.assignment import assigned_partitions
from shoal.store.base import Lease, Store

log = logging.getLogger("shoal.events.group")

GROUPS = "shoal/groups"
RETRY = 0.2  # seconds before retrying a failed rejoin or rebalance


def group_prefix(topic: str, group: str) -> str:
    """The Store prefix holding one group's state for one topic."""
    return f"{GROUPS}/{topic}/{group}/"


def offset_key(topic: str, group: str, partition: int) -> str:
    """The Store key of a group's committed offset for a partition."""
    return f"{group_prefix(topic, group)}offsets/{partition}"


class GroupMember:
    """One member of a consumer group; starts and stops partition workers as owned.

    ``start_partition(p)`` is called when this member gains partition ``p``;
    ``stop_partition(p)`` must finish in-flight work and commit before returning, after
    which the ownership is released for another member to claim.
    """

    def __init__(
        self,
        store: Store,
        topic: str,
        group: str,
        member: str,
        partitions: int,
        session_timeout: float,
        start_partition: Callable[[int], Awaitable[None]],
        stop_partition: Callable[[int], Awaitable[None]],
    ) -> None:
        self.store = store
        self.topic = topic
        self.group = group
        self.member = member
        self.partitions = partitions
        self.session_timeout = session_timeout
        self._start_partition = start_partition
        self._stop_partition = stop_partition
        self._prefix = group_prefix(topic, group)
        self.owned: set[int] = set()
        self.lease: Lease | None = None
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def join(self) -> None:
        """Register, claim what is free for us, and keep doing so in the background."""
        await self._register()
        watching = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._watch(watching)),
            asyncio.create_task(self._keepalive()),
        ]
        await watching.wait()
        await self.rebalance()
        self._tasks.append(asyncio.create_task(self._rebalance_loop()))

    async def _register(self) -> None:
        """Take a fresh lease and put our member key on it (joining and rejoining)."""
        lease = await self.store.lease(self.session_timeout)
        await self.store.put(
            f"{self._prefix}members/{self.member}", self.member.encode(), lease=lease
        )
        self.lease = lease

    async def _watch(self, ready: asyncio.Event) -> None:
        while not self._closing:
            try:
                watch = self.store.watch(self._prefix)
                ready.set()
                async for change in watch:
                    if "/offsets/" not in change.key:
                        self._changed.set()
            except Exception as exc:  # fell behind, or the store away: resync on a fresh watch
                log.warning("member %s: group watch restarted: %s", self.member, exc,
                            exc_info=not isinstance(exc, StoreError))
                self._changed.set()
                await asyncio.sleep(0.1)

    async def _keepalive(self) -> None:
        """Renew the lease every third of the session; after losing it, rejoin until that
        works. Never ends on an error: a member that stopped renewing or rejoining would
        leave its partitions unread for good (a delivery stall, not a crash anyone sees).
        """
        interval, pause = self.session_timeout / 3, self.session_timeout / 3
        while not self._closing:
            await asyncio.sleep(pause)
            try:
                await self._renew_or_rejoin()
                pause = interval
            except Exception as exc:  # StoreError: the store briefly away (a leader election)
                log.warning("member %s: keepalive failed, retrying: %s", self.member, exc,
                            exc_info=not isinstance(exc, StoreError))
                # Retried soon: a renewal may still land within the lease's time (a new
                # leader elected), and without a lease we own nothing until we rejoin.
                pause = min(interval, RETRY)

    async def _renew_or_rejoin(self) -> None:
        if self.lease is not None:
            try:
                await self.lease.keepalive()
                return
            except LeaseExpired:
                # We were presumed dead: our partitions may be someone else's now.
                log.warning("member %s lost its lease; rejoining", self.member)
                self.lease = None  # until rejoined: claim nothing (see rebalance)
                lost, self.owned = sorted(self.owned), set()
                await asyncio.gather(*(self._stop_partition(p) for p in lost))
        await self._register()
        log.info("member %s rejoined group %s of %s", self.member, self.group, self.topic)
        self._changed.set()

    async def _rebalance_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.session_timeout):
                    await self._changed.wait()
            self._changed.clear()
            if not self._closing:
                try:
                    await self.rebalance()
                except Exception as exc:  # StoreError: the store briefly away; else a bug
                    log.warning("member %s: rebalance failed, retrying: %s", self.member, exc,
                                exc_info=not isinstance(exc, StoreError))
                    await asyncio.sleep(RETRY)
                    self._changed.set()

    async def rebalance(self) -> None:
        """Release what is no longer ours, claim what is ours and free."""
        lease = self.lease  # this one: the keepalive task may drop it while we await
        if lease is None:  # lost and not yet rejoined: the keepalive task rejoins
            return
        entries = await self.store.list(self._prefix)
        members = [e.key.rsplit("/", 1)[1] for e in entries if "/members/" in e.key]
        claims = {int(e.key.rsplit("/", 1)[1]): e for e in entries if "/owners/" in e.key}
        owners = {p: e.value.decode() for p, e in claims.items()}
        wanted = assigned_partitions(self.member, members, self.partitions)
        for p in sorted(self.owned - wanted):
            await self._release(p)
        for p in sorted(self.owned):
            if owners.get(p) != self.member:  # our claim vanished (lease trouble)
                self.owned.discard(p)
                await self._stop_partition(p)
        for p in sorted(wanted - self.owned):
            claim = claims.get(p)
            if claim is not None and claim.value.decode() == self.member and (
                claim.lease != lease.id
            ):  # our claim from before a rejoin (its lease not yet swept): take it back
                if not await self.store.delete(claim.key, expected_revision=claim.revision):
                    continue
            elif claim is not None:
                continue  # still held; its owner releases it and we hear of it
            rev = await self.store.cas(
                f"{self._prefix}owners/{p}", self.member.encode(), expected_revision=0,
                lease=lease,
            )
            if rev is not None:
                self.owned.add(p)
                await self._start_partition(p)

    async def _release(self, p: int) -> None:
        await self._stop_partition(p)
        self.owned.discard(p)
        entry = await self.store.get(f"{self._prefix}owners/{p}")
        if entry is not None and entry.value.decode() == self.member:
            await self.store.delete(entry.key, expected_revision=entry.revision)

    async def leave(self) -> None:
        """Stop every partition (committing), release ownership and leave the group."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for p in sorted(self.owned):
            await self._stop_partition(p)
        self.owned.clear()
        if self.lease is not None:
            with contextlib.suppress(StoreError):
                await self.lease.revoke()
