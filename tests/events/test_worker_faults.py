"""A partition worker under broker faults: it must go on delivering and lose nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from shoal.errors import PublishError
from shoal.events import Event, EventBus
from shoal.events.dlq import dead_letters
from shoal.events.retry import RetryPolicy
from tests.helpers import eventually


async def test_a_worker_survives_an_unexpected_broker_error() -> None:
    """A read failing with something other than the contract's errors (an adapter bug)
    restarts the worker from the committed offset instead of ending it: every event is
    still delivered."""
    async with EventBus.connect(f"memory://{uuid.uuid4().hex}", source="/tests/w") as bus:
        await bus.create_topic("t", partitions=1)
        real_read = bus.broker.read
        failures = 2

        async def read(*args: Any) -> Any:
            nonlocal failures
            if failures:
                failures -= 1
                raise RuntimeError("an adapter bug (test)")
            return await real_read(*args)

        bus.broker.read = read  # type: ignore[method-assign]
        seen: list[str] = []
        await bus.subscribe("t", "g", lambda e: seen.append(e.id))
        for i in range(10):
            await bus.publish("t", i, id=f"e{i}")
        await eventually(lambda: len(seen) >= 10, timeout=5, what="every event")
        assert failures == 0
        assert seen == [f"e{i}" for i in range(10)]


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_a_failing_dead_letter_publish_is_retried_not_lost(concurrency: int) -> None:
    """The dead-letter topic refusing appends for a while (a leader election): the event
    is dead-lettered once it can be, exactly once, and the handler is not run again. (It
    was lost with ``concurrency > 1``: committed though never dead-lettered.)"""
    async with EventBus.connect(f"memory://{uuid.uuid4().hex}", source="/tests/w") as bus:
        await bus.create_topic("t", partitions=1)
        real_publish = bus.publish_event
        failures = 2

        async def publish_event(topic: str, *args: Any, **kwargs: Any) -> Any:
            nonlocal failures
            if topic.endswith(".dlq") and failures:
                failures -= 1
                raise PublishError(f"append to topic {topic!r} failed (test)")
            return await real_publish(topic, *args, **kwargs)

        bus.publish_event = publish_event  # type: ignore[method-assign]
        calls: list[str] = []

        def handler(e: Event) -> None:
            calls.append(e.id)
            if e.id == "bad":
                raise ValueError("cannot handle (test)")

        sub = await bus.subscribe("t", "g", handler, retry=RetryPolicy(attempts=1),
                                  concurrency=concurrency)
        await bus.publish("t", 1, id="bad")
        await bus.publish("t", 2, id="good")
        await eventually(lambda: sub.stats.dead_lettered == 1, timeout=5, what="a dead letter")
        await eventually(lambda: "good" in calls, timeout=5, what="the next event")
        await sub.close()
        assert failures == 0
        assert sorted(calls) == ["bad", "good"]  # nothing redelivered
        assert [e.id for _, _, e in await dead_letters(bus, "t.dlq")] == ["bad.dlq.g"]
        assert await bus.committed("t", "g") == {0: 2}


async def test_stopping_does_not_wait_out_a_hanging_read() -> None:
    """A read stuck in the broker (retrying through a leader election) is cut short by
    stop: closing a subscription (or losing a lease) does not wait for it."""
    async with EventBus.connect(f"memory://{uuid.uuid4().hex}", source="/tests/w") as bus:
        await bus.create_topic("t", partitions=2)
        await bus.publish("t", 0, id="e0")
        real_read = bus.broker.read
        hanging = asyncio.Event()

        async def read(*args: Any) -> Any:
            if hanging.is_set():
                await asyncio.sleep(60)
            return await real_read(*args)

        bus.broker.read = read  # type: ignore[method-assign]
        seen: list[str] = []
        sub = await bus.subscribe("t", "g", lambda e: seen.append(e.id))
        await eventually(lambda: seen == ["e0"], timeout=5, what="the first event")
        hanging.set()
        await bus.publish("t", 1, id="e1")  # wakes the workers into the hanging read
        started = time.monotonic()
        async with asyncio.timeout(5):
            await sub.close()
        assert time.monotonic() - started < 2
        assert seen == ["e0"]
        assert await bus.committed("t", "g") == {0: 1, 1: 0}  # e0 committed at the stop


async def test_a_close_cancelled_while_a_handler_runs_is_cancelled() -> None:
    """Cancelling a close (a timeout around it) while it waits for a handler to finish
    cancels it: the stop of the partition does not swallow the cancellation."""
    async with EventBus.connect(f"memory://{uuid.uuid4().hex}", source="/tests/w") as bus:
        await bus.create_topic("t", partitions=1)
        release, started = asyncio.Event(), asyncio.Event()

        async def handler(e: Event) -> None:
            started.set()
            await release.wait()

        sub = await bus.subscribe("t", "g", handler)
        await bus.publish("t", 0)
        await asyncio.wait_for(started.wait(), 5)
        asyncio.get_running_loop().call_later(3, release.set)  # bounds a swallowed cancel
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await sub.close()
        release.set()
