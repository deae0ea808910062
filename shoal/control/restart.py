"""When to restart an instance that exited, and when to give up on it: pure, clock injected.

Kubernetes' rule, scaled down for one machine: every exit that was not asked for is
followed by a restart after an exponential backoff (``initial_backoff`` doubling up to
``max_backoff``, with jitter so that instances killed together do not return together).
A run that lasted ``stable_after`` counts as healthy and resets the backoff. An instance
that exits ``crash_loop_exits`` times in a row without one such stable run is crash
looping: it is marked FAILED with its last lines of output, and no longer restarted
(``shoal scale`` or a restart of ``shoal up`` starts it afresh).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from shoal.errors import ConfigError
from shoal.units import parse_duration


class LifeState(StrEnum):
    """Where a supervised instance's process is."""

    STARTING = "starting"  # spawned, not ready yet
    RUNNING = "running"  # said it is ready
    BACKOFF = "backoff"  # exited; waiting to be restarted
    FAILED = "failed"  # crash looping: given up
    STOPPING = "stopping"  # asked to stop (SIGTERM sent)
    STOPPED = "stopped"  # exited after being asked to


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How eagerly to restart (durations as strings or seconds)."""

    initial_backoff: float | str = "100ms"
    max_backoff: float | str = "10s"
    multiplier: float = 2.0
    jitter: float = 0.2  # +- this fraction of each backoff
    stable_after: float | str = "10s"
    crash_loop_exits: int = 5

    def __post_init__(self) -> None:
        for name in ("initial_backoff", "max_backoff", "stable_after"):
            seconds = parse_duration(getattr(self, name), name=name)
            if seconds is None or seconds <= 0:
                raise ConfigError(f"restart policy: {name} must be a duration greater than "
                                  f"zero, got {getattr(self, name)!r}")
            object.__setattr__(self, name, seconds)
        if self.max_backoff < self.initial_backoff:  # type: ignore[operator]
            raise ConfigError("restart policy: max_backoff must be at least initial_backoff")
        if not isinstance(self.multiplier, int | float) or self.multiplier < 1:
            raise ConfigError(f"restart policy: multiplier must be >= 1, got {self.multiplier!r}")
        if not isinstance(self.jitter, int | float) or not 0 <= self.jitter < 1:
            raise ConfigError(f"restart policy: jitter must be in [0, 1), got {self.jitter!r}")
        if (isinstance(self.crash_loop_exits, bool) or not isinstance(self.crash_loop_exits, int)
                or self.crash_loop_exits < 1):
            raise ConfigError("restart policy: crash_loop_exits must be an integer >= 1, "
                              f"got {self.crash_loop_exits!r}")


@dataclass(frozen=True, slots=True)
class ExitVerdict:
    """What to do after an exit: restart at ``restart_at``, or give up (``failed``)."""

    state: LifeState
    reason: str
    restart_at: float | None = None
    last_lines: tuple[str, ...] = ()


@dataclass(slots=True)
class InstanceLife:
    """The restart bookkeeping of one instance slot (one instance id over its restarts)."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    rng: random.Random = field(default_factory=random.Random)
    state: LifeState = LifeState.STARTING
    started_at: float = 0.0
    restarts: int = 0  # restarts so far (of any kind)
    unstable_exits: int = 0  # exits in a row that ended a run shorter than stable_after
    reason: str = ""

    def on_spawn(self, now: float) -> None:
        """A process was started for this slot."""
        self.state, self.started_at = LifeState.STARTING, now

    def on_ready(self, now: float) -> None:
        """The process said it is ready."""
        if self.state is LifeState.STARTING:
            self.state, self.reason = LifeState.RUNNING, "ready"

    def on_stop_requested(self) -> None:
        """We asked the process to stop: its exit is expected."""
        self.state, self.reason = LifeState.STOPPING, "stop requested"

    def on_exit(self, now: float, returncode: int | None,
                last_lines: Sequence[str] = ()) -> ExitVerdict:
        """The process exited: restart it after a backoff, or mark it FAILED."""
        how = _describe_exit(returncode)
        if self.state in (LifeState.STOPPING, LifeState.STOPPED):
            self.state, self.reason = LifeState.STOPPED, f"stopped ({how})"
            return ExitVerdict(LifeState.STOPPED, self.reason)
        policy = self.policy
        ran = now - self.started_at
        if ran >= policy.stable_after:  # type: ignore[operator]
            self.unstable_exits = 0
        self.unstable_exits += 1
        lines = tuple(last_lines)
        if self.unstable_exits >= policy.crash_loop_exits:
            self.state = LifeState.FAILED
            self.reason = (f"crash loop: {self.unstable_exits} exits in a row, each within "
                           f"{policy.stable_after:g}s of its start; last {how}")
            return ExitVerdict(LifeState.FAILED, self.reason, None, lines)
        backoff = min(policy.initial_backoff * policy.multiplier ** (self.unstable_exits - 1),  # type: ignore[operator]
                      policy.max_backoff)
        backoff *= 1 + self.rng.uniform(-policy.jitter, policy.jitter)
        self.state = LifeState.BACKOFF
        self.restarts += 1
        self.reason = f"{how} after {ran:.1f}s; restarting in {backoff:.2f}s"
        return ExitVerdict(LifeState.BACKOFF, self.reason, now + backoff, lines)

    def reset(self) -> None:
        """Forget past crashes (an operator asked for the instance again)."""
        self.unstable_exits = 0
        self.state, self.reason = LifeState.STARTING, "reset"


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "exit (status unknown)"
    if returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit status {returncode}"
