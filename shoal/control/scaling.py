"""The autoscaler's I/O: gathers figures, applies ``ServiceScaler`` decisions, publishes them.

Every ``interval`` (KEDA's polling interval), and at once when an instance changes state
(``wake``, fed from ``shoal.instances`` transitions by the control plane), it reads for
each autoscaled service: the consumer lag of the group named after the service on every
topic that group reads (the Service SDK's default group), and the in-flight requests its
instances report (``shoal.control.load``). A decision is applied through ``scale`` and
published on ``shoal.autoscaler`` as a ``shoal.autoscaler.scaled`` event keyed by service,
with data ``{service, from, to, direction, reason, lag, inflight, at}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from shoal.control.autoscaler import ScaleDecision, ScalePolicy, ServiceScaler
from shoal.control.load import read_inflight
from shoal.errors import ShoalError
from shoal.events.bus import EventBus
from shoal.observability import metrics as _metrics

log = logging.getLogger("shoal.control")

AUTOSCALER_TOPIC = "shoal.autoscaler"
SCALED = "shoal.autoscaler.scaled"

Scale = Callable[[str, int], Awaitable[Any]]
Replicas = Callable[[str], int]


async def service_lag(bus: EventBus, group: str) -> int | None:
    """Total lag of consumer group ``group`` over every topic it has state for (None: none)."""
    total, found = 0, False
    for info in await bus.topics():
        topic = info.spec.name
        if topic.startswith("shoal."):
            continue
        if group in await bus.groups(topic):
            found = True
            total += sum((await bus.lag(topic, group)).values())
    return total if found else None


class AutoscalerLoop:
    """Runs the autoscaler of every service that has an ``autoscale:`` section."""

    def __init__(self, bus: EventBus, policies: Mapping[str, ScalePolicy], *,
                 replicas: Replicas, scale: Scale, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.scalers = {name: ServiceScaler(name, p) for name, p in policies.items()}
        self.replicas = replicas
        self.scale = scale
        self.interval = interval
        self.decisions: list[ScaleDecision] = []  # every decision made, oldest first
        self.wake = asyncio.Event()
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> AutoscalerLoop:
        """Evaluate in the background."""
        if self.scalers and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="shoal-autoscaler")
        return self

    async def close(self) -> None:
        """Stop evaluating."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def evaluate(self) -> list[ScaleDecision]:
        """Read the figures once and apply what they call for."""
        inflight = await read_inflight(self.bus.store)
        made = []
        for name, scaler in self.scalers.items():
            lag = await service_lag(self.bus, name) if scaler.policy.target_lag else None
            load = None
            if scaler.policy.target_inflight is not None:
                load = inflight.get(name, 0) if self.replicas(name) else None
            decision = scaler.decide(self._clock(), self.replicas(name), inflight=load, lag=lag)
            if decision is None:
                continue
            await self.scale(name, decision.desired)
            self.decisions.append(decision)
            made.append(decision)
            if (m := _metrics.active()) is not None:
                m.autoscaler_decision(name, decision.direction, decision.desired)
            await self.bus.publish(AUTOSCALER_TOPIC, {
                "service": name, "from": decision.current, "to": decision.desired,
                "direction": decision.direction, "reason": decision.reason,
                "lag": lag, "inflight": load, "at": time.time(),
            }, key=name, type=SCALED)
        return made

    async def _run(self) -> None:
        while True:
            try:
                await self.evaluate()
            except (ShoalError, OSError) as e:
                log.warning("autoscaler: evaluation failed, retrying: %s", e)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self.wake.wait()
            self.wake.clear()
