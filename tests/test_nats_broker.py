"""What is particular to the nats:// broker, beyond the conformance suite: names that must
not collide once escaped for NATS, and consumers woken by appends made by another process
(the server's republished notices, not the in-process shortcut); NATS failures surfacing
as the contracts' errors."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shoal.errors import StoreError, TopicError
from shoal.events import EventBus
from shoal.events.brokers.base import Append, TopicSpec
from shoal.events.brokers.nats import NatsBroker, escape_topic
from shoal.store.nats import NatsStore
from tests.helpers import eventually


def test_escaped_topic_names_never_collide() -> None:
    names = ["a.b", "a_b", "a_db", "a_d.b", "a__b", "a-b", "a.d", "a_dd", "A.b", "x" * 200]
    escaped = [escape_topic(n) for n in names]
    assert len(set(escaped)) == len(names)
    assert all(len(e) <= 120 and "." not in e for e in escaped)


async def test_similar_and_long_topic_names_are_separate_topics(nats_url: str) -> None:
    names = ["a.b", "a_b", "a_db", "x" * 200]
    async with EventBus.connect(nats_url) as bus:
        for i, name in enumerate(names):
            await bus.create_topic(name, partitions=1)
            for _ in range(i + 1):
                await bus.publish(name, i)
        topics = {t.spec.name: t.events for t in await bus.topics()}
    assert topics == {name: i + 1 for i, name in enumerate(names)}


PRODUCER = """
import asyncio, sys, time
from shoal.events import EventBus

async def main():
    async with EventBus.connect(sys.argv[1]) as bus:
        for i in range(int(sys.argv[2])):
            await bus.publish("remote", {"sent": time.time()}, key=f"k{i % 3}")
            await asyncio.sleep(0.05)

asyncio.run(main())
"""


async def test_appends_of_another_process_wake_a_waiting_consumer(nats_url: str) -> None:
    n = 30
    latency: list[float] = []
    async with EventBus.connect(nats_url) as bus:
        await bus.create_topic("remote", partitions=2)
        sub = await bus.subscribe("remote", "g",
                                  lambda e: latency.append(time.time() - e.data["sent"]))
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", PRODUCER,
                                                     nats_url, str(n))
        assert await child.wait() == 0
        await eventually(lambda: len(latency) == n, timeout=10, what="every remote event")
        await sub.close()
    # Each event came while the consumer waited; without notices it would wait for its
    # idle timeout (5 s) instead.
    assert sorted(latency)[n // 2] < 0.5, sorted(latency)


async def test_topics_are_listed_past_the_servers_first_page_of_streams(nats_url: str) -> None:
    """JetStream lists streams 256 a page; a server shared by many namespaces has more."""
    async with EventBus.connect(nats_url) as bus:
        names = [f"t{i:03d}" for i in range(260)]
        await asyncio.gather(*(bus.create_topic(n, partitions=1) for n in names))
        assert [t.spec.name for t in await bus.topics()] == names


async def test_a_failing_server_call_is_a_topic_error_naming_it(nats_url: str) -> None:
    """Every broker call that reaches the server answers a NATS failure (here: the
    connection closed under it) with the contract's TopicError, never a raw nats-py
    exception a partition worker would not expect."""
    broker = await NatsBroker.open(nats_url)
    try:
        await broker.create_topic(TopicSpec("t", 2, retention_seconds=60))
        await broker._conn.nc.close()
        calls = {
            "ranges": broker.ranges("t"),
            "offset_for_time": broker.offset_for_time("t", 1, 0),
            "get_topic": broker.get_topic("other"),
            "list_topics": broker.list_topics(),
            "apply_retention": broker.apply_retention("t"),
        }
        for name, call in calls.items():
            with pytest.raises(TopicError, match=f"on {nats_url}.* failed") as info:
                await call
            assert isinstance(info.value.__cause__, nats.errors.Error), name
    finally:
        await broker.close()


async def test_a_watch_that_cannot_start_is_a_store_error(nats_url: str) -> None:
    store = await NatsStore.open(nats_url)
    try:
        await store._conn.nc.close()
        with pytest.raises(StoreError, match="watch on 'a/' cannot start"):
            await anext(store.watch("a/", after_revision=0))
    finally:
        await store.close()


async def test_a_reader_does_not_believe_a_consumer_that_wrongly_says_nothing_more(
    nats_url: str,
) -> None:
    """A kept consumer answering "no messages" where the stream has some (what a consumer
    that lost track after a node died looks like; here one positioned past the end is
    swapped in) is checked against the stream and replaced: the read returns the records
    instead of nothing, for good."""
    broker = await NatsBroker.open(nats_url)
    try:
        await broker.create_topic(TopicSpec("t", 1))
        await broker.append("t", [Append(0, None, 0, b"r%d" % i, None) for i in range(5)])
        assert len(await broker.read("t", 0, 0, 10)) == 5
        (reader,) = broker._readers[("t", 0)]
        stuck = await broker._js.add_consumer(reader.stream, ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=1000,
            ack_policy=AckPolicy.NONE, inactive_threshold=60, mem_storage=True,
        ))
        reader.consumer, reader.next_seq = stuck.name, 1
        assert await broker.read("t", 0, 0, 10) == []  # believed at first
        reader.doubt_empty = 0.0  # (2 s by default)
        records = await broker.read("t", 0, 0, 10)
        assert [r.value for r in records] == [b"r%d" % i for i in range(5)]
        assert reader.consumer != stuck.name
        assert await broker.read("t", 0, 5, 10) == []  # the end, believed: nothing more
    finally:
        await broker.close()


async def test_a_reader_whose_consumer_creation_times_out_replicates_it(nats_url: str) -> None:
    """Creating an R1 reader that goes unanswered (placed on a node that died but is not
    known dead yet) makes the stream's readers replicated for a while: the read is served
    at the second attempt instead of timing out again and again."""
    broker = await NatsBroker.open(nats_url)
    try:
        await broker.create_topic(TopicSpec("t", 1))
        await broker.append("t", [Append(0, None, 0, b"r%d" % i, None) for i in range(3)])
        js = broker._conn.js
        real_add = js.add_consumer
        asked: list[int | None] = []

        async def add_consumer(stream: str, config: ConsumerConfig, **kw: object) -> object:
            asked.append(config.num_replicas)
            if config.num_replicas == 1:
                raise nats.errors.TimeoutError
            return await real_add(stream, config, **kw)

        js.add_consumer = add_consumer  # type: ignore[method-assign]
        records = await broker.read("t", 0, 0, 10)
        assert [r.value for r in records] == [b"r0", b"r1", b"r2"]
        assert asked == [1, 0]  # R1 timed out; then the stream's replication
        assert await broker.read("t", 0, 1, 10)  # a new position: replicated at once
        assert asked == [1, 0, 0]
    finally:
        await broker.close()


async def test_creating_a_topic_asks_again_when_a_stream_creation_times_out(
    nats_url: str,
) -> None:
    """A replicated stream's creation can outlast one request on a loaded cluster; asking
    again with the same config is idempotent, so a timeout is retried, not fatal."""
    broker = await NatsBroker.open(nats_url)
    try:
        js = broker._conn.js
        real_add = js.add_stream
        timeouts = {"t-0": 1, "t-1": 2}

        async def add_stream(config: Any, **kw: Any) -> Any:
            info = await real_add(config, **kw)  # created, but the answer comes too late
            key = f"t-{config.name[-1]}"
            if timeouts.get(key):
                timeouts[key] -= 1
                raise nats.errors.TimeoutError
            return info

        js.add_stream = add_stream  # type: ignore[method-assign]
        spec = await broker.create_topic(TopicSpec("t", 2))
        assert spec.partitions == 2 and timeouts == {"t-0": 0, "t-1": 0}
        timeouts["t-0"] = 3  # every attempt: the error names the partition
        with pytest.raises(TopicError, match="cannot create partition 0"):
            await broker.create_topic(TopicSpec("u", 1))
    finally:
        await broker.close()
