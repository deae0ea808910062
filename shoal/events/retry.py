"""How a failing handler is retried: exponential backoff with full jitter, then dead letter."""

from __future__ import annotations

import random
from dataclasses import dataclass

from shoal.errors import ConfigError, ShoalError
from shoal.units import parse_duration


class Drop(ShoalError):
    """Raise from a handler to drop the event on purpose: no retry, no dead letter."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of one event by its handler, in place (so per-key order is kept).

    ``attempts`` counts every call, the first included; when they run out the event goes
    to ``<topic>.dlq``. Delays follow AWS's "full jitter": a uniform draw from
    ``[0, min(maximum, initial * multiplier ** (attempt - 1))]``. These are the only
    retries: redelivery after a crash restarts the count, nothing retries on top.
    """

    attempts: int = 5
    initial: float = 0.1
    maximum: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"retry.attempts: must be at least 1, got {self.attempts}")
        if self.initial < 0 or self.maximum < 0 or self.multiplier < 1:
            raise ConfigError("retry: initial and maximum must be >= 0 and multiplier >= 1")

    @classmethod
    def from_config(cls, raw: dict[str, object] | None) -> RetryPolicy:
        """From manifest values like ``{attempts: 5, initial: 100ms, maximum: 30s}``."""
        if not raw:
            return cls()
        unknown = set(raw) - {"attempts", "initial", "maximum", "multiplier"}
        if unknown:
            raise ConfigError(f"retry: unknown key(s) {sorted(unknown)}")
        return cls(
            attempts=int(raw.get("attempts", 5)),  # type: ignore[call-overload]
            initial=parse_duration(raw.get("initial", 0.1), name="retry.initial"),  # type: ignore[arg-type]
            maximum=parse_duration(raw.get("maximum", 30.0), name="retry.maximum"),  # type: ignore[arg-type]
            multiplier=float(raw.get("multiplier", 2.0)),  # type: ignore[arg-type]
        )

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        cap = min(self.maximum, self.initial * self.multiplier ** (attempt - 1))
        return (rng or random).uniform(0.0, cap)


NO_RETRY = RetryPolicy(attempts=1)
