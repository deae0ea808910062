"""Slow figures, sampled: consumer lag per group and partition, instances by health state.

These are read from the broker, the Store and the registry, not counted on a hot path:
``sample_lag``/``sample_instances`` take one reading; ``Sampler`` takes them every
``interval`` seconds in the background (the control plane runs one; any process may).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from shoal.observability.metrics import Metrics

if TYPE_CHECKING:
    from shoal.events.bus import EventBus

log = logging.getLogger("shoal.observability")


async def sample_lag(bus: EventBus, metrics: Metrics) -> dict[tuple[str, str], dict[int, int]]:
    """Set ``shoal_consumer_lag`` for every group of every topic; returns the readings."""
    readings: dict[tuple[str, str], dict[int, int]] = {}
    for info in await bus.topics():
        topic = info.spec.name
        for group in await bus.groups(topic):
            lag = await bus.lag(topic, group)
            metrics.set_lag(topic, group, lag)
            readings[(topic, group)] = lag
    return readings


def sample_instances(instances: Iterable[Any], metrics: Metrics) -> dict[tuple[str, str], int]:
    """Set ``shoal_instances`` from registry records (anything with ``service``, ``state``)."""
    counts = Counter((i.service, str(getattr(i.state, "value", i.state))) for i in instances)
    metrics.set_instances(counts)
    return dict(counts)


class Sampler:
    """Takes the slow readings every ``interval`` seconds until closed."""

    def __init__(self, metrics: Metrics, *, bus: EventBus | None = None,
                 instances: Any = None, interval: float = 5.0) -> None:
        if interval <= 0:
            raise ValueError(f"sampler interval must be positive, got {interval!r}")
        self.metrics = metrics
        self.bus = bus
        self.instances = instances  # a callable returning registry records
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> None:
        """One reading of everything configured."""
        if self.bus is not None:
            await sample_lag(self.bus, self.metrics)
        if self.instances is not None:
            sample_instances(self.instances(), self.metrics)

    def start(self) -> Sampler:
        """Sample in the background."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception as exc:  # a failed reading is logged; the next one may work
                log.warning("metrics sampling failed: %r", exc)
            await asyncio.sleep(self.interval)

    async def aclose(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
