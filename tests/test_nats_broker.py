"""What is particular to the nats:// broker, beyond the conformance suite: names that must
not collide once escaped for NATS, and consumers woken by appends made by another process
(the server's republished notices, not the in-process shortcut)."""

from __future__ import annotations

import asyncio
import sys
import time

from shoal.events import EventBus
from shoal.events.brokers.nats import escape_topic
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
