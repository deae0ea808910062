"""How many instances a service should run: KEDA's and the HPA's rule, pure, clock injected.

``desired = ceil(metric / target)`` where the metric is the service's total in-flight
requests (``target_inflight`` per instance) or its consumer groups' total lag
(``target_lag`` per instance, as KEDA's Kafka scaler does), clamped to ``min..max``.

Decisions, written down once:

* **Up at once, down slowly.** A recommendation above the current count is applied
  immediately. Going down takes the *highest* recommendation of the last
  ``stabilization`` window (the HPA's downscale stabilization, so a metric that flaps does
  not make replicas flap), and only once ``cooldown`` has passed since the last change
  (KEDA's cooldown period).
* **Both metrics**: when a service has both targets, the larger recommendation wins (the
  HPA's rule for several metrics).
* **Unknown is not zero.** With no figure for a metric (no instance reported yet), that
  metric recommends nothing; with no figure at all the count stays where it is.
* Every decision carries its reason, e.g. ``"lag 950 / target 100 per instance -> 10,
  clamped to max 4"``; that reason is what the ``shoal.autoscaler`` event says.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from shoal.errors import ConfigError
from shoal.units import parse_duration


@dataclass(frozen=True, slots=True)
class ScalePolicy:
    """A service's ``autoscale:`` section."""

    min: int = 1
    max: int = 1
    target_inflight: float | None = None  # in-flight requests per instance
    target_lag: float | None = None  # consumer lag (events) per instance
    cooldown: float | str = "30s"  # since the last change, before scaling down
    stabilization: float | str | None = None  # downscale window; default: the cooldown

    def __post_init__(self) -> None:
        for name in ("min", "max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"autoscale: {name} must be an integer >= 0, got {value!r}")
        if self.max < max(self.min, 1):
            raise ConfigError(f"autoscale: max ({self.max}) must be at least min ({self.min}) "
                              "and at least 1")
        for name in ("target_inflight", "target_lag"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"autoscale: {name} must be a number > 0, got {value!r}")
        if self.target_inflight is None and self.target_lag is None:
            raise ConfigError("autoscale: give target_inflight or target_lag (or both)")
        cooldown = parse_duration(self.cooldown, name="autoscale: cooldown")
        object.__setattr__(self, "cooldown", cooldown)
        window = parse_duration(self.stabilization, name="autoscale: stabilization")
        object.__setattr__(self, "stabilization", cooldown if window is None else window)


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """Change ``service`` from ``current`` to ``desired`` instances, because ``reason``."""

    service: str
    current: int
    desired: int
    reason: str
    at: float

    @property
    def direction(self) -> str:
        """``"up"`` or ``"down"``."""
        return "up" if self.desired > self.current else "down"


@dataclass(slots=True)
class ServiceScaler:
    """The autoscaler of one service: feed it figures, it answers with decisions."""

    service: str
    policy: ScalePolicy
    last_change: float = -math.inf
    _history: deque[tuple[float, int, str]] = field(default_factory=deque)

    def recommend(self, inflight: float | None, lag: float | None) -> tuple[int, str] | None:
        """The raw recommendation for these figures (before stabilization), and why."""
        policy = self.policy
        options: list[tuple[int, str]] = []
        for figure, target, name in ((inflight, policy.target_inflight, "in-flight"),
                                     (lag, policy.target_lag, "lag")):
            if figure is None or target is None:
                continue
            raw = math.ceil(max(figure, 0) / target - 1e-9)
            clamped = min(max(raw, policy.min), policy.max)
            why = f"{name} {figure:g} / target {target:g} per instance -> {raw}"
            if clamped != raw:
                why += f", clamped to {'max' if clamped < raw else 'min'} {clamped}"
            options.append((clamped, why))
        if not options:
            return None
        return max(options, key=lambda o: o[0])

    def decide(self, now: float, current: int, *, inflight: float | None = None,
               lag: float | None = None) -> ScaleDecision | None:
        """A decision if the count should change now, else None."""
        policy = self.policy
        recommendation = self.recommend(inflight, lag)
        if recommendation is None:
            if current < policy.min or current > policy.max:
                target = min(max(current, policy.min), policy.max)
                return self._apply(now, current, target,
                                   f"{current} outside min {policy.min}..max {policy.max}")
            return None
        desired, why = recommendation
        history = self._history
        history.append((now, desired, why))
        while history and history[0][0] < now - policy.stabilization:  # type: ignore[operator]
            history.popleft()
        if desired > current:
            return self._apply(now, current, desired, why)
        # Down (or stay): the highest recommendation of the window.
        top, top_why = desired, why
        for _, value, reason in history:
            if value > top:
                top, top_why = value, reason
        if top >= current:
            return None
        if now - self.last_change < policy.cooldown:  # type: ignore[operator]
            return None
        stable = f"{why}; highest in the last {policy.stabilization:g}s: {top}"
        return self._apply(now, current, top, stable if top_why != why else why)

    def _apply(self, now: float, current: int, desired: int, why: str) -> ScaleDecision | None:
        if desired == current:
            return None
        self.last_change = now
        return ScaleDecision(self.service, current, desired, why, now)
