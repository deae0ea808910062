"""The health state machine of one service instance, and when to check it next.

``InstanceHealth`` is pure: each input (heartbeat, heartbeat TTL missed, active check
result, outlier ejection / un-ejection, drain, deregistration) returns the list of
``Transition``\\ s it caused, so an adapter can publish them as events. States:

=============  ======================================================================
``STARTING``   registered, not ready yet: no traffic
``SERVING``    healthy: gets traffic
``UNHEALTHY``  ``unhealthy_threshold`` active checks failed in a row: traffic only in panic
``EJECTED``    taken out by outlier detection: traffic only in panic
``DRAINING``   finishing in-flight work before stopping: no new traffic
``GONE``       deregistered or heartbeat TTL missed; terminal (a comeback is a new instance)
=============  ======================================================================

The state is derived from independent facts (started, checks passing, ejected, draining,
gone) with that precedence, read bottom-up: GONE > DRAINING > STARTING > UNHEALTHY >
EJECTED > SERVING. So an instance ejected and failing checks is UNHEALTHY, and becomes
EJECTED, not SERVING, when its checks recover while the ejection lasts.

Readiness: with active checks, one passing check makes a starting instance SERVING (Envoy's
startup rule) and ``healthy_threshold`` passing checks in a row bring an unhealthy one back.
Without active checks, the first heartbeat makes it SERVING. Outlier ejection is the
outlier detector's decision alone: passing checks do not end it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from shoal.errors import ConfigError
from shoal.units import parse_duration


class HealthState(StrEnum):
    """Where an instance is in its life."""

    STARTING = "starting"
    SERVING = "serving"
    EJECTED = "ejected"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"
    GONE = "gone"

    @property
    def healthy(self) -> bool:
        """True for SERVING: the balancer's ``is_healthy``."""
        return self is HealthState.SERVING

    @property
    def in_pool(self) -> bool:
        """True if the balancer may see it: SERVING, or EJECTED/UNHEALTHY (panic only)."""
        return self in _IN_POOL


_IN_POOL = frozenset({HealthState.SERVING, HealthState.EJECTED, HealthState.UNHEALTHY})


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of state of an instance, and why."""

    instance_id: str
    from_state: HealthState
    to_state: HealthState
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """``health_check:`` config of a service (Envoy's names; durations as strings)."""

    active_checks: bool = True
    path: str = "/healthz"
    interval: float | str = "10s"
    unhealthy_interval: float | str | None = None  # checks of a non-serving instance
    timeout: float | str = "2s"
    jitter: float | str = "1s"  # uniform extra delay added to every interval
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    heartbeat_ttl: float | str = "15s"

    def __post_init__(self) -> None:
        if not isinstance(self.active_checks, bool):
            raise ConfigError(f"active_checks: must be true or false, got {self.active_checks!r}")
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise ConfigError(f"path: must be an HTTP path starting with '/', got {self.path!r}")
        for name, positive in (("interval", True), ("timeout", True), ("jitter", False),
                               ("heartbeat_ttl", True), ("unhealthy_interval", True)):
            value = getattr(self, name)
            if value is None and name == "unhealthy_interval":
                object.__setattr__(self, name, self.interval)
                continue
            seconds = parse_duration(value, name=name)
            if seconds is None or (positive and seconds <= 0):
                raise ConfigError(f"{name}: must be a duration greater than zero, got {value!r}")
            object.__setattr__(self, name, seconds)
        for name in ("healthy_threshold", "unhealthy_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")


class InstanceHealth:
    """The health state machine of one instance; every input returns its transitions."""

    def __init__(self, instance_id: str, config: HealthCheckConfig | None = None, *,
                 now: float) -> None:
        self.instance_id = instance_id
        self.config = config if config is not None else HealthCheckConfig()
        self.last_heartbeat = now  # registering counts as a heartbeat
        self._started = False
        self._checks_pass = True
        self._ejected = False
        self._draining = False
        self._gone = False
        self._successes = 0  # consecutive passing active checks
        self._failures = 0  # consecutive failing active checks

    @property
    def state(self) -> HealthState:
        """The current state."""
        if self._gone:
            return HealthState.GONE
        if self._draining:
            return HealthState.DRAINING
        if not self._started:
            return HealthState.STARTING
        if not self._checks_pass:
            return HealthState.UNHEALTHY
        if self._ejected:
            return HealthState.EJECTED
        return HealthState.SERVING

    @property
    def heartbeat_deadline(self) -> float:
        """When the instance is GONE unless another heartbeat arrives."""
        return self.last_heartbeat + self.config.heartbeat_ttl  # type: ignore[operator]

    def on_heartbeat(self, now: float) -> list[Transition]:
        """The instance said it is alive."""
        def apply() -> None:
            self.last_heartbeat = max(self.last_heartbeat, now)
            if not self.config.active_checks:
                self._started = True
        return self._change(now, "first heartbeat (no active checks)", apply)

    def on_tick(self, now: float) -> list[Transition]:
        """Time passed: GONE if the heartbeat TTL ran out."""
        if now < self.heartbeat_deadline:
            return []
        age = now - self.last_heartbeat
        return self.on_heartbeat_expired(
            now, f"heartbeat TTL {self.config.heartbeat_ttl:g}s missed "  # type: ignore[str-format]
                 f"(last heartbeat {age:.1f}s ago)")

    def on_heartbeat_expired(self, now: float,
                             reason: str = "heartbeat lease expired") -> list[Transition]:
        """The instance's registration lease ran out (seen by the store)."""
        return self._change(now, reason, lambda: setattr(self, "_gone", True))

    def on_check(self, ok: bool, now: float, detail: str = "") -> list[Transition]:
        """An active health check passed (``ok``) or failed; ``detail`` says how."""
        config = self.config
        suffix = f": {detail}" if detail else ""
        if ok:
            self._successes += 1
            self._failures = 0
            if not self._started:
                return self._change(now, f"first passing health check{suffix}",
                                    lambda: setattr(self, "_started", True))
            if not self._checks_pass and self._successes >= config.healthy_threshold:
                return self._change(now, f"{self._successes} passing health checks in a "
                                         f"row{suffix}",
                                    lambda: setattr(self, "_checks_pass", True))
            return []
        self._failures += 1
        self._successes = 0
        if self._started and self._checks_pass and self._failures >= config.unhealthy_threshold:
            return self._change(now, f"{self._failures} failed health checks in a row{suffix}",
                                lambda: setattr(self, "_checks_pass", False))
        return []

    def on_ejected(self, now: float, reason: str = "") -> list[Transition]:
        """Outlier detection ejected the instance (``reason``: why)."""
        why = f"outlier ejection: {reason}" if reason else "outlier ejection"
        return self._change(now, why, lambda: setattr(self, "_ejected", True))

    def on_unejected(self, now: float) -> list[Transition]:
        """The outlier ejection ended."""
        return self._change(now, "outlier ejection ended",
                            lambda: setattr(self, "_ejected", False))

    def on_drain(self, now: float, reason: str = "drain requested") -> list[Transition]:
        """The instance is to finish in-flight work and take no new requests."""
        return self._change(now, reason, lambda: setattr(self, "_draining", True))

    def on_deregistered(self, now: float, reason: str = "deregistered") -> list[Transition]:
        """The instance left the registry."""
        return self._change(now, reason, lambda: setattr(self, "_gone", True))

    def _change(self, now: float, reason: str, apply: Callable[[], object]) -> list[Transition]:
        before = self.state
        if before is HealthState.GONE:
            return []
        apply()
        after = self.state
        if after is before:
            return []
        return [Transition(self.instance_id, before, after, reason, now)]


class ActiveCheckSchedule:
    """When to run the next active check: interval plus random jitter (injected ``rng``).

    The first check of an instance lands uniformly within one interval, so instances
    registered together (a fleet restart) are not all checked in the same instant.
    """

    def __init__(self, interval: float | str, *, jitter: float | str = 0.0,
                 unhealthy_interval: float | str | None = None,
                 rng: random.Random | None = None) -> None:
        self.interval = _positive(interval, "interval")
        self.jitter = parse_duration(jitter, name="jitter") or 0.0
        self.unhealthy_interval = (self.interval if unhealthy_interval is None
                                   else _positive(unhealthy_interval, "unhealthy_interval"))
        self._rng = rng if rng is not None else random.Random()

    @classmethod
    def from_config(cls, config: HealthCheckConfig,
                    rng: random.Random | None = None) -> ActiveCheckSchedule:
        """The schedule ``config`` asks for."""
        return cls(config.interval, jitter=config.jitter,
                   unhealthy_interval=config.unhealthy_interval, rng=rng)

    def first_check_at(self, now: float) -> float:
        """When to check an instance first seen at ``now``."""
        return now + self._rng.uniform(0.0, self.interval)

    def next_check_at(self, now: float, *, healthy: bool = True) -> float:
        """When to check again after a check finished at ``now``."""
        base = self.interval if healthy else self.unhealthy_interval
        return now + base + self._rng.uniform(0.0, self.jitter)


def _positive(value: float | str, name: str) -> float:
    seconds = parse_duration(value, name=name)
    if seconds is None or seconds <= 0:
        raise ConfigError(f"{name}: must be a duration greater than zero, got {value!r}")
    return seconds
