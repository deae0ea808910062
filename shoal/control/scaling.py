"""The autoscaler's I/O: gathers figures, applies ``ServiceScaler`` decisions, publishes them.

Every ``interval`` (KEDA's polling interval), and at once when an instance changes state
(``wake``, fed from ``shoal.instances`` transitions by the control plane), it reads for
each autoscaled service: the consumer lag of the group named after the service on every
topic that group reads (the Service SDK's default group), and the in-flight requests its
instances report in ``shoal.load`` events (``shoal.load.LoadReport``, one per instance
per second), which it follows as the group ``shoal-autoscaler``. A service's in-flight
figure is the sum over its live instances of each one's *peak* since its previous report
(a burst between two samples counts); reports older than ``LoadFigures.max_age`` are
ignored. A decision is applied through ``scale`` and published on ``shoal.autoscaler``
as a ``shoal.autoscaler.scaled`` event keyed by service, with data ``{service, from, to,
direction, reason, lag, inflight, at}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec

from shoal.control.autoscaler import ScaleDecision, ScalePolicy, ServiceScaler
from shoal.errors import ShoalError
from shoal.events.bus import EventBus
from shoal.events.consumer import Subscription
from shoal.events.event import Event
from shoal.load import LOAD_TOPIC, LoadReport

log = logging.getLogger("shoal.control")

AUTOSCALER_TOPIC = "shoal.autoscaler"
SCALED = "shoal.autoscaler.scaled"
LOAD_GROUP = "shoal-autoscaler"

Scale = Callable[[str, int], Awaitable[Any]]
Replicas = Callable[[str], int]
Live = Callable[[str], set[str]]


class LoadFigures:
    """The latest ``LoadReport`` of each instance; pure (wall clock passed in)."""

    def __init__(self, max_age: float = 5.0) -> None:
        self.max_age = max_age
        self.latest: dict[str, LoadReport] = {}

    def observe(self, report: LoadReport) -> None:
        """Keep ``report`` if it is the instance's newest."""
        held = self.latest.get(report.instance)
        if held is None or report.at >= held.at:
            self.latest[report.instance] = report

    def forget(self, instance: str) -> None:
        """The instance died: its figure no longer counts."""
        self.latest.pop(instance, None)

    def inflight(self, service: str, live: set[str], now: float) -> int | None:
        """Sum of the peaks of ``service``'s live instances with a fresh report (None: none)."""
        fresh = [r for i, r in self.latest.items()
                 if i in live and r.service == service and now - r.at <= self.max_age]
        return sum(r.peak_inflight_requests for r in fresh) if fresh else None



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
                 replicas: Replicas, scale: Scale, live: Live | None = None,
                 interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.live = live if live is not None else (lambda service: set())
        self.figures = LoadFigures()
        self._load: Subscription | None = None
        self.scalers = {name: ServiceScaler(name, p) for name, p in policies.items()}
        self.replicas = replicas
        self.scale = scale
        self.interval = interval
        self.decisions: list[ScaleDecision] = []  # every decision made, oldest first
        self.wake = asyncio.Event()
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> AutoscalerLoop:
        """Follow the load reports and evaluate in the background."""
        if not self.scalers or self._task is not None:
            return self
        if any(s.policy.target_inflight is not None for s in self.scalers.values()):
            self._load = await self.bus.subscribe(LOAD_TOPIC, LOAD_GROUP, self._on_load,
                                                  start="latest")
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name="shoal-autoscaler")
        return self

    def _on_load(self, event: Event) -> None:
        try:
            self.figures.observe(msgspec.convert(event.data, LoadReport))
        except (msgspec.ValidationError, TypeError) as e:
            log.warning("autoscaler: skipping a malformed %s event %s: %s", LOAD_TOPIC,
                        event.id, e)

    async def close(self) -> None:
        """Stop evaluating and following the load reports."""
        if self._load is not None:
            await self._load.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def evaluate(self) -> list[ScaleDecision]:
        """Read the figures once and apply what they call for."""
        made = []
        for name, scaler in self.scalers.items():
            lag = await service_lag(self.bus, name) if scaler.policy.target_lag else None
            load = None
            if scaler.policy.target_inflight is not None:
                load = self.figures.inflight(name, self.live(name), time.time())
            decision = scaler.decide(self._clock(), self.replicas(name), inflight=load, lag=lag)
            if decision is None:
                continue
            await self.scale(name, decision.desired)
            self.decisions.append(decision)
            made.append(decision)
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
