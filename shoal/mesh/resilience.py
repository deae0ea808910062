"""Resilience policies of a call, as pure objects: retries, retry budget, circuit breaker,
outlier detection, and the config they are built from.

The proxyless client and the gateway build the same stack from one ``TrafficPolicy``
(timeout -> retry -> circuit breaker -> balancer -> endpoint); nothing here does I/O or
sleeps, and time comes only from ``now`` arguments or an injected ``clock``.

What happened to one try is an ``Outcome``: the HTTP status code of a response, or a
``Failure`` when no response came (``classify`` maps transport exceptions to one).

Config names follow Envoy and Istio in snake_case; durations are strings like ``"250ms"``
(or seconds as numbers), normalized to float seconds on construction. ``load_config`` and
``load_traffic_policy`` read a plain dict (parsed YAML) and reject unknown keys and bad
values with a ``ConfigError`` naming the key.
"""

from __future__ import annotations

import difflib
import functools
import math
import random
import re
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from typing import Any, TypeVar, get_type_hints

from shoal.errors import (
    CircuitOpen,
    ConfigError,
    ConnectError,
    ConnectionLost,
    TransportError,
)
from shoal.mesh.balancer import LoadBalancerConfig
from shoal.mesh.endpoint import Endpoint
from shoal.units import parse_duration, parse_size

Clock = Callable[[], float]
Duration = float | str  # accepted on construction; always float seconds afterwards


class Failure(StrEnum):
    """How a try failed when no HTTP response came back."""

    CONNECT_FAILURE = "connect-failure"  # no connection was made: nothing was sent
    RESET = "reset"  # the connection broke after the request may have reached the upstream
    TIMEOUT = "timeout"  # the per-try timeout expired before the response head


Outcome = int | Failure  # an HTTP status code, or a Failure

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
RETRY_ON = frozenset({"5xx", "gateway-error", "reset", "connect-failure",
                      "retriable-status-codes"})
GATEWAY_ERRORS = frozenset({502, 503, 504})


def classify(error: BaseException) -> Failure | None:
    """The ``Failure`` a transport exception stands for; None if it is not one (a bug)."""
    if isinstance(error, ConnectError | ConnectionRefusedError):
        return Failure.CONNECT_FAILURE
    if isinstance(error, ConnectionLost):
        return Failure.RESET if error.request_sent else Failure.CONNECT_FAILURE
    if isinstance(error, TimeoutError):
        return Failure.TIMEOUT
    if isinstance(error, TransportError | ConnectionError):
        return Failure.RESET
    return None


def status_of(outcome: Outcome) -> int:
    """The status an outcome counts as for outlier detection (Envoy: 503, timeouts 504)."""
    if isinstance(outcome, Failure):
        return 504 if outcome is Failure.TIMEOUT else 503
    return outcome


# -- config ---------------------------------------------------------------------------------


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _duration(obj: object, name: str, *, optional: bool = False, positive: bool = False) -> None:
    value = getattr(obj, name)
    if value is None and optional:
        return
    seconds = parse_duration(value, name=name) if value is not None else None
    if seconds is None or (positive and seconds <= 0):
        raise ConfigError(f"{name}: must be a duration greater than zero, got {value!r}")
    _set(obj, name, seconds)


def _integer(obj: object, name: str, *, low: int = 0) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}: must be an integer >= {low}, got {value!r}")


def _number(obj: object, name: str, *, low: float = 0.0, high: float = math.inf) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        bounds = f">= {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
        raise ConfigError(f"{name}: must be a number {bounds}, got {value!r}")
    _set(obj, name, float(value))


def _boolean(obj: object, name: str) -> None:
    if not isinstance(getattr(obj, name), bool):
        raise ConfigError(f"{name}: must be true or false, got {getattr(obj, name)!r}")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long a call may take: ``request`` bounds the whole call, retries included."""

    request: Duration | None = "15s"  # Envoy's route timeout default; None: no limit
    connect: Duration = "5s"  # opening one connection (Envoy's connect_timeout default)

    def __post_init__(self) -> None:
        _duration(self, "request", optional=True, positive=True)
        _duration(self, "connect", positive=True)


@dataclass(frozen=True, slots=True)
class Retries:
    """Istio's ``retries`` plus Linkerd's retry budget.

    ``attempts`` is the number of retries (Istio), so a call makes at most attempts + 1
    tries. ``retry_on`` takes Envoy's conditions, as a list or ``"5xx,reset"``:

    ===================== ==============================================================
    ``connect-failure``   no connection was made
    ``reset``             connect failure, connection reset, per-try timeout
    ``5xx``               any status >= 500, and everything ``reset`` retries
    ``gateway-error``     502, 503, 504, and everything ``reset`` retries
    ``retriable-status-codes`` the statuses in ``retriable_status_codes``
    ===================== ==============================================================

    Listing ``retriable_status_codes`` is enough to retry them (unlike Envoy, which also wants
    ``retriable-status-codes`` in ``retry_on``: a list nobody meant to be ignored should not
    be). Non-idempotent methods (POST, PATCH) are retried only after a connect failure, when
    the upstream provably saw nothing, unless ``retry_non_idempotent``. A request whose body
    is larger than ``request_buffer_limit`` (or of unknown length) is streamed, not buffered,
    so it cannot be replayed and is never retried. Backoff is Envoy's fully jittered
    exponential: uniform in ``[0, min(backoff_max_interval, (2**n - 1) * backoff_base_interval)]``
    before retry n.
    """

    attempts: int = 2
    per_try_timeout: Duration | None = None
    retry_on: tuple[str, ...] | str = ("connect-failure", "reset", "gateway-error")
    retriable_status_codes: tuple[int, ...] = ()
    retry_non_idempotent: bool = False
    backoff_base_interval: Duration = "25ms"
    backoff_max_interval: Duration = "250ms"
    request_buffer_limit: int | str = "64KiB"
    budget_percent: float = 20.0
    min_retries_per_second: float = 3.0
    budget_window: Duration = "10s"

    def __post_init__(self) -> None:
        _integer(self, "attempts")
        _duration(self, "per_try_timeout", optional=True, positive=True)
        retry_on = self.retry_on
        if isinstance(retry_on, str):
            retry_on = tuple(item.strip() for item in retry_on.split(",") if item.strip())
        if not isinstance(retry_on, list | tuple) or not all(isinstance(r, str) for r in retry_on):
            raise ConfigError(f"retry_on: must be a list of conditions, got {self.retry_on!r}")
        for condition in retry_on:
            if condition not in RETRY_ON:
                raise ConfigError(f"retry_on: unknown condition {condition!r}; expected some "
                                  f"of {', '.join(sorted(RETRY_ON))}")
        _set(self, "retry_on", tuple(retry_on))
        codes = self.retriable_status_codes
        if not isinstance(codes, list | tuple) or not all(
                isinstance(c, int) and not isinstance(c, bool) and 100 <= c <= 599 for c in codes):
            raise ConfigError(f"retriable_status_codes: must be a list of HTTP status codes, "
                              f"got {codes!r}")
        _set(self, "retriable_status_codes", tuple(codes))
        _boolean(self, "retry_non_idempotent")
        _duration(self, "backoff_base_interval", positive=True)
        _duration(self, "backoff_max_interval", positive=True)
        if self.backoff_max_interval < self.backoff_base_interval:  # type: ignore[operator]
            raise ConfigError("backoff_max_interval: must not be shorter than "
                              "backoff_base_interval")
        _set(self, "request_buffer_limit",
             parse_size(self.request_buffer_limit, name="request_buffer_limit"))
        _number(self, "budget_percent", high=100.0)
        _number(self, "min_retries_per_second")
        _duration(self, "budget_window", positive=True)


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    """Envoy's concurrency limits plus a consecutive-failure breaker (closed/open/half-open).

    ``consecutive_failures=0`` disables the open state (limits only). While open, calls are
    refused for ``open_interval``; then ``half_open_requests`` probes are let through, and
    that many successes close the circuit while one failure opens it again.
    """

    max_requests: int = 1024
    max_pending_requests: int = 1024
    consecutive_failures: int = 5
    open_interval: Duration = "10s"
    half_open_requests: int = 1

    def __post_init__(self) -> None:
        _integer(self, "max_requests", low=1)
        _integer(self, "max_pending_requests")
        _integer(self, "consecutive_failures")
        _duration(self, "open_interval", positive=True)
        _integer(self, "half_open_requests", low=1)


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Envoy's outlier detection: eject instances that keep failing, for a growing while.

    The n-th ejection in a row lasts ``base_ejection_time * n``, capped at
    ``max_ejection_time``; n drops by one per ``interval`` an instance spends un-ejected.
    At most ``max_ejection_percent`` of the instances are ejected at once, but one always may
    be (Envoy). ``consecutive_gateway_failure=0`` disables that check (Envoy does not
    enforce it by default either). Success-rate ejection is off unless ``success_rate``:
    every ``interval``, among instances with ``success_rate_request_volume`` requests (and
    only if there are ``success_rate_minimum_hosts`` of them), those whose success rate is
    below ``mean - success_rate_stdev_factor * stdev`` are ejected. Connect failures and
    resets count as 503, timeouts as 504.
    """

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 0
    interval: Duration = "10s"
    base_ejection_time: Duration = "30s"
    max_ejection_time: Duration = "300s"
    max_ejection_percent: float = 10.0
    success_rate: bool = False
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: float = 1.9

    def __post_init__(self) -> None:
        _integer(self, "consecutive_5xx")
        _integer(self, "consecutive_gateway_failure")
        _duration(self, "interval", positive=True)
        _duration(self, "base_ejection_time", positive=True)
        _duration(self, "max_ejection_time", positive=True)
        _number(self, "max_ejection_percent", high=100.0)
        _boolean(self, "success_rate")
        _integer(self, "success_rate_minimum_hosts", low=1)
        _integer(self, "success_rate_request_volume", low=1)
        _number(self, "success_rate_stdev_factor")


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """Everything the call stack to one upstream service is built from."""

    timeouts: Timeouts = field(default_factory=Timeouts)
    retries: Retries = field(default_factory=Retries)
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    outlier_detection: OutlierDetection = field(default_factory=OutlierDetection)
    load_balancer: LoadBalancerConfig = field(default_factory=LoadBalancerConfig)


T = TypeVar("T")


_type_hints = functools.cache(get_type_hints)  # evaluating string annotations compiles code


def load_config(cls: type[T], data: Any, *, where: str = "") -> T:
    """A config dataclass from a plain dict; errors name the key (``where.key: ...``)."""
    prefix = f"{where}." if where else ""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of settings, "
                          f"got {type(data).__name__} {data!r}")
    from_dict = getattr(cls, "from_dict", None)
    if from_dict is not None:
        try:
            return from_dict(data)  # type: ignore[no-any-return]
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    hints = _type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key{_suggestion(str(key), known)}; "
                              f"expected one of {', '.join(sorted(known))}")
        hint = hints.get(key)
        if isinstance(hint, type) and (is_dataclass(hint) or hasattr(hint, "from_dict")):
            kwargs[key] = load_config(hint, value, where=f"{prefix}{key}")
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None


def load_traffic_policy(data: Any, *, where: str = "traffic_policy") -> TrafficPolicy:
    """A ``TrafficPolicy`` from a plain dict, e.g. a service's section of ``shoal.yaml``."""
    return load_config(TrafficPolicy, data, where=where)


def _suggestion(key: str, known: set[str]) -> str:
    snake = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).replace("-", "_").lower()
    if snake in known:
        return f" (did you mean {snake!r}?)"
    close = difflib.get_close_matches(snake, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- retries --------------------------------------------------------------------------------


class RetryPolicy:
    """Whether, when and how long to retry a call, from ``Retries`` and ``Timeouts``."""

    def __init__(self, retries: Retries | None = None, timeouts: Timeouts | None = None, *,
                 rng: random.Random | None = None) -> None:
        self.retries = retries if retries is not None else Retries()
        self.timeouts = timeouts if timeouts is not None else Timeouts()
        self._rng = rng if rng is not None else random.Random()
        retry_on = set(self.retries.retry_on)
        self._on_reset = bool(retry_on & {"reset", "5xx", "gateway-error"})
        self._on_connect = self._on_reset or "connect-failure" in retry_on
        self._on_5xx = "5xx" in retry_on
        self._on_gateway = "gateway-error" in retry_on
        self._codes = frozenset(self.retries.retriable_status_codes)

    @property
    def max_tries(self) -> int:
        """The most tries a call makes, the first included."""
        return self.retries.attempts + 1

    def is_retriable(self, outcome: Outcome) -> bool:
        """Whether ``retry_on`` covers ``outcome`` (ignoring attempts, method and body)."""
        if outcome is Failure.CONNECT_FAILURE:
            return self._on_connect
        if isinstance(outcome, Failure):
            return self._on_reset
        return (outcome in self._codes or (self._on_5xx and outcome >= 500)
                or (self._on_gateway and outcome in GATEWAY_ERRORS))

    def refusal(self, attempt: int, method: str, outcome: Outcome,
                body_size: int | None) -> str | None:
        """Why try number ``attempt`` (1-based) must not be retried; None if it may be."""
        if attempt > self.retries.attempts:
            return f"all {self.max_tries} tries used"
        if not self.is_retriable(outcome):
            return f"{outcome} is not covered by retry_on={','.join(self.retries.retry_on)}"
        limit = self.retries.request_buffer_limit
        if body_size is None or body_size > limit:  # type: ignore[operator]
            return (f"the request body ({'unknown length' if body_size is None else body_size}"
                    f" bytes) was streamed beyond request_buffer_limit={limit} bytes")
        if (method.upper() not in IDEMPOTENT_METHODS and not self.retries.retry_non_idempotent
                and outcome is not Failure.CONNECT_FAILURE):
            return (f"{method.upper()} is not idempotent and the upstream may have seen it "
                    "(set retry_non_idempotent to retry anyway)")
        return None

    def should_retry(self, attempt: int, method: str, outcome: Outcome,
                     body_size: int | None) -> bool:
        """True if try number ``attempt`` (1-based), which ended in ``outcome``, is retried.

        ``body_size`` is the request body's length in bytes (0 without one, None if unknown).
        The retry budget is a separate check (``RetryBudget.can_retry``).
        """
        return self.refusal(attempt, method, outcome, body_size) is None

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retrying after try number ``attempt`` (1-based)."""
        base: float = self.retries.backoff_base_interval  # type: ignore[assignment]
        cap: float = self.retries.backoff_max_interval  # type: ignore[assignment]
        ceiling = min(cap, (2.0 ** min(max(attempt, 1), 32) - 1.0) * base)
        return self._rng.uniform(0.0, ceiling)

    def try_timeout(self, elapsed: float) -> float | None:
        """The timeout for the next try, ``elapsed`` seconds into the call (None: no limit).

        The per-try timeout, cut to what is left of the request timeout; zero or less means
        the call is out of time.
        """
        per_try: float | None = self.retries.per_try_timeout  # type: ignore[assignment]
        request: float | None = self.timeouts.request  # type: ignore[assignment]
        left = None if request is None else request - elapsed
        if per_try is None:
            return left
        return per_try if left is None else min(per_try, left)


class SlidingWindowCounter:
    """Events counted over the last ``window`` seconds, in ``buckets`` time slices."""

    def __init__(self, window: float, buckets: int = 20) -> None:
        if window <= 0 or buckets < 1:
            raise ConfigError(f"sliding window: window and buckets must be positive, "
                              f"got {window}, {buckets}")
        self.window = window
        self._width = window / buckets
        self._buckets = buckets
        self._counts: deque[list[int]] = deque()  # [slice index, count], oldest first
        self._total = 0
        self._slice = (math.inf, -math.inf)  # [start, end) of the newest slice

    def add(self, now: float, n: int = 1) -> None:
        """Count ``n`` events at ``now``."""
        start, end = self._slice
        if start <= now < end:  # the newest slice, as most events: nothing to expire
            self._counts[-1][1] += n
            self._total += n
            return
        index = math.floor(now / self._width)
        self._expire(index)
        if self._counts and self._counts[-1][0] >= index:
            self._counts[-1][1] += n  # same slice (or the clock stepped back)
        else:
            self._counts.append([index, n])
            self._slice = (index * self._width, (index + 1) * self._width)
        self._total += n

    def total(self, now: float) -> int:
        """Events counted in the window ending at ``now``."""
        self._expire(math.floor(now / self._width))
        return self._total

    def _expire(self, index: int) -> None:
        counts = self._counts
        while counts and counts[0][0] <= index - self._buckets:
            self._total -= counts.popleft()[1]
            if not counts:
                self._slice = (math.inf, -math.inf)


class RetryBudget:
    """Linkerd's retry budget: retries may add ``percent`` to the requests, plus a floor.

    A retry is allowed while the retries in the last ``window`` stay within
    ``percent`` % of the requests in it plus ``min_retries_per_second * window`` (Linkerd's
    ``retryRatio``, ``minRetriesPerSecond`` and ``ttl``; the floor is averaged over the
    window, so a quiet service can still retry a short burst). Record original requests
    with ``record_request`` and retries with ``record_retry`` (retries are not requests).
    One budget covers one upstream service, shared by all its calls.
    """

    def __init__(self, percent: float = 20.0, min_retries_per_second: float = 3.0,
                 window: Duration = "10s") -> None:
        seconds = parse_duration(window, name="budget_window")
        if seconds is None or seconds <= 0 or percent < 0 or min_retries_per_second < 0:
            raise ConfigError(f"retry budget: percent={percent}, min_retries_per_second="
                              f"{min_retries_per_second} and window={window!r} must be >= 0 "
                              "(window > 0)")
        self.percent = percent
        self.min_retries_per_second = min_retries_per_second
        self.window = seconds
        self._requests = SlidingWindowCounter(seconds)
        self._retries = SlidingWindowCounter(seconds)

    @classmethod
    def from_config(cls, retries: Retries) -> RetryBudget:
        """The budget configured in ``retries``."""
        return cls(retries.budget_percent, retries.min_retries_per_second,
                   retries.budget_window)

    def record_request(self, now: float) -> None:
        """An original request was sent."""
        self._requests.add(now)

    def record_retry(self, now: float) -> None:
        """A retry was sent."""
        self._retries.add(now)

    def allowance(self, now: float) -> float:
        """How many retries the window ending at ``now`` allows in total."""
        return (self._requests.total(now) * self.percent / 100.0
                + self.min_retries_per_second * self.window)

    def can_retry(self, now: float) -> bool:
        """True if one more retry fits in the budget."""
        return self._retries.total(now) + 1 <= self.allowance(now) + 1e-9

    def try_retry(self, now: float) -> bool:
        """``can_retry`` and, if so, ``record_retry`` in one step."""
        if not self.can_retry(now):
            return False
        self.record_retry(now)
        return True

    def explain(self, now: float) -> str:
        """Why the budget is spent, for ``RetryBudgetExhausted``."""
        return (f"{self._retries.total(now)} retries for {self._requests.total(now)} requests "
                f"in the last {self.window:g}s use up the budget of {self.percent:g}% + "
                f"{self.min_retries_per_second:g}/s")


# -- circuit breaker ------------------------------------------------------------------------


class CircuitState(StrEnum):
    """Where a circuit breaker is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Concurrency limits and a consecutive-failure breaker for one upstream service.

    Every ``allow()`` that returns True takes a request slot, and must be followed by exactly
    one of ``on_success()``, ``on_failure()`` (what counts as a failure is the caller's
    call: 5xx, connect failure, timeout) or ``on_cancel()``. A caller refused only because
    ``max_requests`` are in flight may wait in line: ``enqueue()`` (False when
    ``max_pending_requests`` already wait), then ``dequeue()`` once it stops waiting, and
    ``allow()`` again. Per-instance failures are the ``OutlierDetector``'s business.
    """

    def __init__(self, config: CircuitBreakerConfig | None = None, *,
                 clock: Clock = time.monotonic, service: str = "") -> None:
        self.config = config if config is not None else CircuitBreakerConfig()
        self.service = service
        self.active = 0
        self.pending = 0
        self.rejection: str | None = None  # why the last allow()/enqueue() said no
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        self._probe_successes = 0

    @property
    def state(self) -> CircuitState:
        """The current state (an open circuit turns half-open once ``open_interval`` passed)."""
        if (self._state is CircuitState.OPEN
                and self._clock() >= self._opened_at + self.config.open_interval):  # type: ignore[operator]
            self._state = CircuitState.HALF_OPEN
            self._probes = self._probe_successes = 0
        return self._state

    def retry_after(self) -> float | None:
        """Seconds until an open circuit lets a probe through; None unless open."""
        if self.state is not CircuitState.OPEN:
            return None
        return self._opened_at + self.config.open_interval - self._clock()  # type: ignore[operator]

    def allow(self) -> bool:
        """Take a request slot if the circuit and the limits allow it."""
        state = self.state
        self.rejection = None
        if state is CircuitState.OPEN:
            self.rejection = (f"circuit open after {self.config.consecutive_failures} "
                              "consecutive failures")
        elif state is CircuitState.HALF_OPEN and self._probes >= self.config.half_open_requests:
            self.rejection = (f"circuit half-open and its {self.config.half_open_requests} "
                              "probe request(s) are in flight")
        elif self.active >= self.config.max_requests:
            self.rejection = f"max_requests={self.config.max_requests} requests in flight"
        if self.rejection is not None:
            return False
        self.active += 1
        if state is CircuitState.HALF_OPEN:
            self._probes += 1
        return True

    def acquire(self) -> None:
        """``allow()``, raising ``CircuitOpen`` (naming why) instead of returning False."""
        if not self.allow():
            raise CircuitOpen(self.service or "<unknown>", self.rejection or "refused",
                              retry_after=self.retry_after())

    def on_success(self) -> None:
        """The request that took a slot succeeded."""
        self._release()
        if self._state is CircuitState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)
            self._probe_successes += 1
            if self._probe_successes >= self.config.half_open_requests:
                self._state = CircuitState.CLOSED
                self._failures = 0
        elif self._state is CircuitState.CLOSED:
            self._failures = 0

    def on_failure(self, *, counted: bool = True) -> None:
        """The request that took a slot failed (``counted=False``: a try whose request may
        still succeed on a retry; ``count_failure`` gives the request's verdict later)."""
        self._release()
        if self._state is CircuitState.HALF_OPEN:
            self._open()
        elif counted:
            self.count_failure()

    def count_failure(self) -> None:
        """One more consecutive failed request (opens the circuit at the threshold)."""
        if self._state is CircuitState.CLOSED:
            self._failures += 1
            if 0 < self.config.consecutive_failures <= self._failures:
                self._open()

    def on_cancel(self) -> None:
        """The request that took a slot ended without a verdict (cancelled by the caller)."""
        self._release()
        if self._state is CircuitState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)

    def enqueue(self) -> bool:
        """Join the line of requests waiting for a slot; False if the line is full."""
        if self.pending >= self.config.max_pending_requests:
            self.rejection = (f"max_pending_requests={self.config.max_pending_requests} "
                              "requests already waiting")
            return False
        self.pending += 1
        return True

    def dequeue(self) -> None:
        """Leave the line (a slot may be free now, or the caller gave up)."""
        self.pending = max(0, self.pending - 1)

    def _release(self) -> None:
        self.active = max(0, self.active - 1)

    def _open(self) -> None:
        self._state = CircuitState.OPEN
        self._opened_at = self._clock()
        self._failures = 0
        self._probes = self._probe_successes = 0


# -- outlier detection ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ejection:
    """An instance taken out of the pool by outlier detection, until ``until``."""

    instance_id: str
    reason: str
    at: float
    until: float
    times: int  # the ejection multiplier: 1 for the first ejection in a row


@dataclass(slots=True)
class _HostRecord:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    successes: int = 0  # this interval, for success-rate ejection
    failures: int = 0
    times: int = 0  # ejection multiplier
    ejected_until: float | None = None
    unejected_at: float = 0.0


class OutlierDetector:
    """Envoy's outlier detection over the instances of one upstream service.

    Feed every try's outcome to ``on_result``; ask ``is_ejected`` when balancing (pass
    ``lambda ep: not detector.is_ejected(ep, now)`` as the balancer's ``is_healthy``).
    Call ``evaluate(now)`` every ``interval`` for success-rate ejection, and ``expire(now)``
    to learn which instances came back. Tell it the membership with ``update_hosts``:
    ``max_ejection_percent`` is taken of that count.
    """

    def __init__(self, config: OutlierDetection | None = None) -> None:
        self.config = config if config is not None else OutlierDetection()
        self._hosts: dict[str, _HostRecord] = {}
        self._latest_until = -math.inf  # no instance is ejected at or after this time

    def none_ejected(self, now: float) -> bool:
        """True if no instance is ejected at ``now`` (O(1): the latest ejection's end)."""
        return now >= self._latest_until

    def update_hosts(self, endpoints: Iterable[Endpoint | str]) -> None:
        """The current instances; state of the others is dropped."""
        ids = [e if isinstance(e, str) else e.instance_id for e in endpoints]
        self._hosts = {i: self._hosts.get(i) or _HostRecord() for i in ids}

    def on_result(self, endpoint: Endpoint | str, outcome: Outcome,
                  now: float) -> Ejection | None:
        """Record one try's outcome; returns the ejection it caused, if any."""
        instance_id = endpoint if isinstance(endpoint, str) else endpoint.instance_id
        host = self._hosts.get(instance_id)
        if host is None:
            host = self._hosts[instance_id] = _HostRecord()
        if type(outcome) is int and outcome < 500 and host.ejected_until is None:
            host.successes += 1  # the usual case, in short: a success resets the runs
            host.consecutive_5xx = host.consecutive_gateway = 0
            return None
        if self._is_ejected(host, now):
            return None  # still ejected: results of tries sent before the ejection
        status = status_of(outcome)
        if status >= 500:
            host.failures += 1
            host.consecutive_5xx += 1
        else:
            host.successes += 1
            host.consecutive_5xx = 0
        host.consecutive_gateway = host.consecutive_gateway + 1 if status in GATEWAY_ERRORS else 0
        config = self.config
        if 0 < config.consecutive_5xx <= host.consecutive_5xx:
            return self._eject(instance_id, host, f"{host.consecutive_5xx} consecutive 5xx", now)
        if 0 < config.consecutive_gateway_failure <= host.consecutive_gateway:
            return self._eject(instance_id, host,
                               f"{host.consecutive_gateway} consecutive gateway errors", now)
        return None

    def is_ejected(self, endpoint: Endpoint | str, now: float) -> bool:
        """True while the ejection of ``endpoint`` lasts (a pure read; see ``expire``)."""
        instance_id = endpoint if isinstance(endpoint, str) else endpoint.instance_id
        host = self._hosts.get(instance_id)
        return host is not None and self._is_ejected(host, now)

    def ejected(self, now: float) -> set[str]:
        """The instance ids ejected at ``now``."""
        return {i for i, host in self._hosts.items() if self._is_ejected(host, now)}

    def expire(self, now: float) -> list[str]:
        """Un-eject the instances whose ejection ended; returns their ids."""
        back = [i for i, host in self._hosts.items()
                if host.ejected_until is not None and now >= host.ejected_until]
        for instance_id in back:
            self._clear(self._hosts[instance_id])
        return back

    def evaluate(self, now: float) -> list[Ejection]:
        """The periodic pass: success-rate ejection, then a fresh interval for the counts."""
        ejections: list[Ejection] = []
        config = self.config
        if config.success_rate:
            rates = {i: h.successes / (h.successes + h.failures)
                     for i, h in self._hosts.items()
                     if not self._is_ejected(h, now)
                     and h.successes + h.failures >= config.success_rate_request_volume}
            if len(rates) >= config.success_rate_minimum_hosts:
                mean = statistics.fmean(rates.values())
                threshold = mean - config.success_rate_stdev_factor * statistics.pstdev(
                    rates.values())
                for instance_id, rate in sorted(rates.items(), key=lambda item: item[1]):
                    if rate < threshold:
                        ejection = self._eject(
                            instance_id, self._hosts[instance_id],
                            f"success rate {rate:.1%} below {threshold:.1%} "
                            f"(mean {mean:.1%})", now)
                        if ejection is not None:
                            ejections.append(ejection)
        for host in self._hosts.values():
            host.successes = host.failures = 0
        return ejections

    def _eject(self, instance_id: str, host: _HostRecord, reason: str,
               now: float) -> Ejection | None:
        host.consecutive_5xx = host.consecutive_gateway = 0
        active = len(self.ejected(now))
        total = max(len(self._hosts), 1)
        if active and 100.0 * (active + 1) / total > self.config.max_ejection_percent:
            return None
        config = self.config
        interval: float = config.interval  # type: ignore[assignment]
        base: float = config.base_ejection_time  # type: ignore[assignment]
        cap: float = max(config.max_ejection_time, base)  # type: ignore[type-var]
        self._clear(host)
        if host.times:  # the multiplier decays by one per interval spent un-ejected
            host.times = max(0, host.times - math.floor((now - host.unejected_at) / interval))
        host.times += 1
        host.ejected_until = now + min(base * host.times, cap)
        if host.ejected_until > self._latest_until:
            self._latest_until = host.ejected_until
        return Ejection(instance_id, reason, now, host.ejected_until, host.times)

    @staticmethod
    def _is_ejected(host: _HostRecord, now: float) -> bool:
        return host.ejected_until is not None and now < host.ejected_until

    @staticmethod
    def _clear(host: _HostRecord) -> None:
        if host.ejected_until is not None:
            host.unejected_at = host.ejected_until
            host.ejected_until = None
