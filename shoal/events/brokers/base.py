"""The Broker contract: durable, partitioned, append-only logs with gapless offsets.

Records in flight are ``msgspec.Struct``s: they are made once per event on the hot path,
and a Struct is several times cheaper to create than a frozen dataclass.

A broker stores bytes; it knows nothing of handlers, groups or retries. Everything with
semantics (envelopes, partitioning, consumer groups, retries, dead letters) lives once in
``EventBus`` above it, so every backend behaves the same. What a broker must do natively
is what cannot be done above it atomically: assigning gapless offsets, the deduplication
window (a duplicate must be detected in the same atomic step that would append it), and
retention.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import msgspec


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic's shape: partition count and retention by age (seconds) and size (bytes)."""

    name: str
    partitions: int = 8
    retention_seconds: float | None = None
    retention_bytes: int | None = None  # per partition, as in Kafka


class Append(msgspec.Struct, frozen=True, gc=False):
    """One record to append: partition, key, timestamp (ms) and payload, and a dedup id."""

    partition: int
    key: str | None
    timestamp_ms: int
    value: bytes
    dedup_id: str | None = None


class Appended(msgspec.Struct, frozen=True, gc=False):
    """Where a record went; ``duplicate`` means it was already in the window and not added."""

    partition: int
    offset: int
    duplicate: bool = False


class Record(msgspec.Struct, frozen=True, gc=False):
    """A stored record."""

    partition: int
    offset: int
    timestamp_ms: int
    key: str | None
    value: bytes


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """The offsets a partition holds: ``start`` (earliest kept) to ``end`` (next to be written)."""

    start: int
    end: int
    size_bytes: int = 0


class Broker(abc.ABC):
    """A backend for the event log (memory, sqlite; nats and redis later)."""

    url: str
    dedup_window_seconds: float = 120.0

    @abc.abstractmethod
    async def create_topic(self, spec: TopicSpec) -> TopicSpec:
        """Create the topic, or return the existing one if its partition count matches."""

    @abc.abstractmethod
    async def get_topic(self, name: str) -> TopicSpec | None:
        """The topic's spec, or None if it does not exist."""

    @abc.abstractmethod
    async def list_topics(self) -> list[TopicSpec]:
        """Every topic, by name."""

    @abc.abstractmethod
    async def append(self, topic: str, records: list[Append]) -> list[Appended]:
        """Append atomically and durably, in order; the answer lines up with ``records``."""

    @abc.abstractmethod
    async def read(self, topic: str, partition: int, offset: int, limit: int) -> list[Record]:
        """Up to ``limit`` records from ``offset`` on (from the earliest kept if it was trimmed)."""

    @abc.abstractmethod
    async def ranges(self, topic: str) -> list[PartitionRange]:
        """For each partition, the offsets it holds."""

    @abc.abstractmethod
    async def offset_for_time(self, topic: str, partition: int, timestamp_ms: int) -> int:
        """The first offset whose timestamp is at or after ``timestamp_ms`` (end if none)."""

    @abc.abstractmethod
    def append_generation(self, topic: str) -> int:
        """A counter that changes whenever ``topic`` may have been appended to.

        Read it *before* reading the log; pass it to ``wait_for_append`` so an append that
        lands between the read and the wait is never missed.
        """

    @abc.abstractmethod
    async def wait_for_append(self, topic: str, since: int, timeout: float) -> None:
        """Return once ``append_generation(topic) != since`` (or on timeout)."""

    @abc.abstractmethod
    async def apply_retention(self, topic: str) -> int:
        """Trim what retention no longer keeps; returns how many records went."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and background tasks."""
