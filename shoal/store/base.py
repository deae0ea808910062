"""The Store contract: a small key-value store with revisions, watch and leases (etcd's shape).

Every piece of coordination state in Shoal (consumer-group leases and committed offsets,
the service registry, config) goes through this contract, so that one implementation of
each idea runs on every backend. Keys are ``/``-separated strings; values are bytes.

* Every write bumps one store-wide ``revision`` (monotonic, never reused).
* ``cas`` is the only primitive for coordination: ``expected_revision=0`` means "only if absent".
* A ``Lease`` has a TTL; keys written with it vanish (and watchers see a delete) when it
  is revoked or not kept alive in time, even if the process holding it was killed with -9.
* ``watch(prefix)`` yields every change under a prefix after the given revision, in order,
  without busy-polling.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Entry:
    """One key's current value."""

    key: str
    value: bytes
    revision: int  # the store revision of the write that produced this value
    lease: int | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """One change seen by a watcher: a put (with the new value) or a delete."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes | None
    revision: int


class Lease(abc.ABC):
    """A time-to-live that keys can be attached to; keep it alive or lose them."""

    id: int
    ttl: float

    @abc.abstractmethod
    async def keepalive(self) -> None:
        """Renew for another ``ttl``; raises ``LeaseExpired`` if it already ran out."""

    @abc.abstractmethod
    async def revoke(self) -> None:
        """End the lease now, deleting every key attached to it."""


class Store(abc.ABC):
    """The key-value-with-watch contract; adapters: memory, sqlite (later nats, redis)."""

    url: str

    @abc.abstractmethod
    async def get(self, key: str) -> Entry | None:
        """The current value of ``key``, or None."""

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[Entry]:
        """Every entry whose key starts with ``prefix``, sorted by key."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        """Write unconditionally; returns the new revision."""

    @abc.abstractmethod
    async def cas(
        self, key: str, value: bytes, *, expected_revision: int, lease: Lease | None = None
    ) -> int | None:
        """Write only if the key's revision is ``expected_revision`` (0: absent).

        Returns the new revision, or None when the condition did not hold.
        """

    @abc.abstractmethod
    async def delete(self, key: str, *, expected_revision: int | None = None) -> bool:
        """Delete (only at ``expected_revision`` when given); True if something was deleted."""

    @abc.abstractmethod
    async def lease(self, ttl: float) -> Lease:
        """Grant a new lease of ``ttl`` seconds."""

    @abc.abstractmethod
    def watch(self, prefix: str, *, after_revision: int | None = None) -> AsyncIterator[Change]:
        """Changes under ``prefix`` after ``after_revision`` (default: from now), in order."""

    @abc.abstractmethod
    async def revision(self) -> int:
        """The store's current revision."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and background tasks."""

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
