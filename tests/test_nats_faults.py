"""The nats:// backend under faults, with real nats-server processes on loopback.

* A server killed with -9 and restarted on the same store directory in the middle of a
  publish/consume stream: no acknowledged event is lost and the consumer resumes alone.
* A three-node cluster, streams with three replicas: one node killed with -9 in the
  middle of the stream; every acknowledged event is still there and still delivered.

The producer does what a user of an at-least-once bus does: a publish that fails is
retried with the same event id (the broker's dedup window makes the retry idempotent).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import pytest

from shoal.errors import ShoalError
from shoal.events import EventBus
from tests.helpers import eventually
from tests.servers import NatsServer, free_port, require_binary

pytestmark = pytest.mark.slow
TOTAL = 300


async def publish_through_faults(bus: EventBus, topic: str, ids: list[str],
                                 acked: list[str], give_up: float = 30.0) -> None:
    """Publish every id, retrying one that fails (same id) until it is acknowledged."""
    for i, event_id in enumerate(ids):
        deadline = time.monotonic() + give_up
        while True:
            try:
                await bus.publish(topic, {"i": i}, key=f"k{i % 5}", id=event_id)
                acked.append(event_id)
                break
            except ShoalError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)


async def run_stream_with_fault(url: str, fault) -> None:  # type: ignore[no-untyped-def]
    """Publish TOTAL events while a group consumes them; call ``fault()`` midway."""
    ids = [f"e{i}" for i in range(TOTAL)]
    acked: list[str] = []
    seen: set[str] = set()
    async with EventBus.connect(url, source="/tests/faults") as bus:
        await bus.create_topic("faults", partitions=2)
        sub = await bus.subscribe("faults", "g", lambda e: seen.add(e.id),
                                  session_timeout="2s")
        producer = asyncio.create_task(publish_through_faults(bus, "faults", ids, acked))
        await eventually(lambda: len(acked) >= TOTAL // 3, what="a third acknowledged")
        await asyncio.get_running_loop().run_in_executor(None, fault)
        await producer
        await eventually(lambda: set(acked) <= seen, timeout=30,
                         what="the consumer to see every acknowledged event")
        await sub.close()
        ranges = await bus.broker.ranges("faults")
        assert sum(r.end - r.start for r in ranges) == TOTAL  # retries were deduplicated
    assert acked == ids


async def test_server_restart_loses_no_acknowledged_event(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats").start()
    try:
        def restart() -> None:
            server.stop(signal.SIGKILL)
            time.sleep(0.3)
            server.start()

        await run_stream_with_fault(f"{server.url}/restart", restart)
    finally:
        server.stop()


async def test_cluster_keeps_every_acknowledged_event_when_a_node_is_killed(
    tmp_path: Path,
) -> None:
    require_binary("nats-server")
    cluster_ports = [free_port() for _ in range(3)]
    nodes = [
        NatsServer(tmp_path / f"n{i}", name=f"n{i}", cluster_port=cluster_ports[i],
                   routes=[p for p in cluster_ports if p != cluster_ports[i]])
        for i in range(3)
    ]
    try:
        for node in nodes:
            node.start()
        servers = ",".join(f"127.0.0.1:{n.port}" for n in nodes)
        url = f"nats://{servers}/c{uuid.uuid4().hex[:8]}?replicas=3"
        await wait_for_jetstream_cluster(url)
        await run_stream_with_fault(url, lambda: nodes[0].stop(signal.SIGKILL))
    finally:
        for node in nodes:
            node.stop()


async def wait_for_jetstream_cluster(url: str, timeout: float = 30.0) -> None:
    """Until the cluster has a JetStream meta leader (a replicated stream can be made)."""
    from shoal.store.nats import NatsStore

    deadline = time.monotonic() + timeout
    while True:
        try:
            store = await NatsStore.open(url)
            await store.close()
            return
        except ShoalError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
