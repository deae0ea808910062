"""Golden metrics over an interval, from cumulative readings (sans-I/O, injected clock).

``GoldenWindow.update(now, readings)`` takes each service's cumulative figures (requests,
errors, duration bucket counts) and returns what happened since the previous call: requests
per second, success rate, p50/p95/p99. The dashboard reads once a second, so its charts show
the last second, not the life of the process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from shoal.observability.metrics import REQUEST_BUCKETS, LatencyHistogram, Metrics


@dataclass
class Reading:
    """One service's cumulative figures."""

    requests: int = 0
    errors: int = 0  # 5xx answers
    buckets: list[int] = field(default_factory=lambda: [0] * (len(REQUEST_BUCKETS) + 1))


@dataclass(frozen=True)
class Golden:
    """What one service did over the last interval."""

    rps: float
    success_rate: float | None  # None: no requests in the interval
    p50: float | None
    p95: float | None
    p99: float | None

    def as_dict(self) -> dict[str, float | None]:
        """JSON-ready, seconds rounded to microseconds."""
        r = lambda v: None if v is None else round(v, 6)  # noqa: E731
        return {"rps": round(self.rps, 2), "success_rate": r(self.success_rate),
                "p50": r(self.p50), "p95": r(self.p95), "p99": r(self.p99)}


class GoldenWindow:
    """Differences between successive readings, per key (a service, a topic, an edge)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, Reading]] = {}
        self._counters: dict[str, tuple[float, float]] = {}
        self._previous_update: float | None = None

    def update(self, now: float, readings: Mapping[str, Reading]) -> dict[str, Golden]:
        """The golden figures of each service since the previous update (first: zeros)."""
        out = {}
        since = self._previous_update
        self._previous_update = now
        for name, cur in readings.items():
            # a service first seen since the last update started from zero then
            prev_t, prev = self._last.get(name, (now, cur) if since is None else
                                          (since, Reading()))
            dt = now - prev_t
            n = cur.requests - prev.requests
            if n < 0 or dt <= 0:  # first reading, or a counter reset: start over
                n, dt = 0, 0.0
            errors = max(cur.errors - prev.errors, 0) if n else 0
            h = LatencyHistogram(REQUEST_BUCKETS)
            if n:
                h.counts = [max(a - b, 0) for a, b in zip(cur.buckets, prev.buckets,
                                                          strict=True)]
            out[name] = Golden(
                rps=n / dt if dt > 0 else 0.0,
                success_rate=(n - errors) / n if n else None,
                p50=h.quantile(0.5) if n else None,
                p95=h.quantile(0.95) if n else None,
                p99=h.quantile(0.99) if n else None,
            )
            self._last[name] = (now, cur)
        return out

    def rate(self, key: str, now: float, total: float) -> float:
        """Per-second rate of a cumulative counter since its previous reading (first: 0)."""
        prev = self._counters.get(key)
        if prev is None and self._previous_update is not None and \
                self._previous_update < now:
            prev = (self._previous_update, 0.0)  # first seen: counted from zero since then
        self._counters[key] = (now, total)
        if prev is None or now <= prev[0] or total < prev[1]:
            return 0.0
        return (total - prev[1]) / (now - prev[0])


def service_readings(metrics: Metrics) -> dict[str, Reading]:
    """Each service's cumulative figures from the process's request series: the gateway's
    view of a service when the gateway measured it here, else the service's own."""
    out: dict[str, Reading] = {}
    all_series = list(metrics.routes.values())
    via_gateway = {s.service for s in all_series if s.origin == "gateway"}
    for series in all_series:
        if series.service in via_gateway and series.origin != "gateway":
            continue
        r = out.setdefault(series.service, Reading())
        codes = series.codes.copy()
        r.requests += sum(codes.values())
        r.errors += sum(n for code, n in codes.items() if code >= 500)
        for i, n in enumerate(series.duration.counts):
            r.buckets[i] += n
    return out


def quantiles(counts: Sequence[int]) -> tuple[float | None, float | None, float | None]:
    """p50, p95, p99 of request-duration bucket counts."""
    h = LatencyHistogram(REQUEST_BUCKETS)
    h.counts = list(counts)
    return h.quantile(0.5), h.quantile(0.95), h.quantile(0.99)
