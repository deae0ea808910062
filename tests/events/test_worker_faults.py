"""A partition worker under broker faults it does not expect: it must go on delivering."""

from __future__ import annotations

import uuid
from typing import Any

from shoal.events import EventBus
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
