"""Shoal's Prometheus metrics: the project's names, cheap counters on the hot paths.

``enable_metrics()`` turns metrics on for the process and returns the ``Metrics`` whose
``registry`` a ``/metrics`` endpoint renders (``shoal.observability.exposition``). Objects
made while metrics are on (a gateway's routes, an event topic's append queue, a consumer
group's subscription, a mesh ``Upstream``) take their *series* once, when they are built,
and count into it; when metrics are off they take ``None`` and pay one ``is None`` test.

Decision, written down once: **the hot paths count into plain Python objects, not into
prometheus-client's metric children.** A child's ``inc()`` takes a lock (measured ~0.7 us on
this machine) and ``Histogram.observe`` ~1.5 us, which is 5-10% of a consumed event on the
bus; ``series.success += 1`` is ~30 ns and our histogram's ``observe`` one ``bisect``. The
series are rendered into Prometheus families at scrape time by one collector, so the names,
types and text format are prometheus-client's own. Slow-moving figures (consumer lag,
instances by state, autoscaler decisions) are ordinary prometheus-client gauges and
counters on the same registry.

Names (labels of bounded cardinality: route names or templates, never raw paths):

* ``shoal_requests_total{service,route,code}``, ``shoal_request_duration_seconds{service,
  route}`` (histogram), ``shoal_requests_in_flight{service,route}``;
* ``shoal_upstream_requests_total{service}``, ``shoal_upstream_retries_total{service}``,
  ``shoal_upstream_failures_total{service}``, ``shoal_balancer_picks_total{service,
  instance}``, ``shoal_outlier_ejections_total{service}``, ``shoal_circuit_state{service,
  state}`` (how many call stacks to the service are in that state);
* ``shoal_events_published_total{topic}``, ``shoal_events_delivered_total{topic,group,
  outcome}`` (``success|retry|dead_letter|drop``), ``shoal_event_latency_seconds{topic,
  group}`` (append time to handled), ``shoal_consumer_lag{topic,group,partition}``;
* ``shoal_instances{service,state}``, ``shoal_autoscaler_decisions_total{service,
  direction}``, ``shoal_autoscaler_replicas{service}``;
* ``shoal_authz_denials_total{service,rule}`` (rules are the manifest's: bounded).
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from shoal.mesh.upstream import Upstream

__all__ = [
    "EVENT_BUCKETS",
    "OUTCOMES",
    "REQUEST_BUCKETS",
    "ConsumerSeries",
    "LatencyHistogram",
    "Metrics",
    "RouteSeries",
    "TopicSeries",
    "UpstreamSeries",
    "active",
    "disable_metrics",
    "enable_metrics",
]

REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
"""Upper bounds (seconds) of request duration buckets."""
EVENT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0, 60.0, 300.0)
"""Upper bounds (seconds) of publish-to-handled latency buckets (retries make them long)."""
OUTCOMES = ("success", "retry", "dead_letter", "drop")
"""What a consumer did with a delivery."""
MAX_SERIES = 10_000
"""Label sets per family at most; more are folded into one ``other`` series (and counted)."""
OTHER = "other"


class LatencyHistogram:
    """Bucket counts and a sum; ``observe`` is one bisect (buckets are ``le``, cumulative
    only when rendered)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation of ``value`` seconds."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_n(self, value: float, n: int) -> None:
        """Count ``n`` observations of ``value`` seconds."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, cumulative count)`` pairs as Prometheus wants them, ``+Inf`` last."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out

    def quantile(self, q: float) -> float | None:
        """An estimate of quantile ``q`` (linear within the bucket, as PromQL does)."""
        total = self.count
        if total == 0:
            return None
        rank, seen, lower = q * total, 0, 0.0
        for i, n in enumerate(self.counts):
            upper = self.bounds[i] if i < len(self.bounds) else self.bounds[-1]
            if n and seen + n >= rank:
                return lower + (upper - lower) * ((rank - seen) / n)
            seen += n
            lower = upper
        return self.bounds[-1]


class RouteSeries:
    """Requests of one (service, route): status counts, durations, in flight."""

    __slots__ = ("codes", "duration", "in_flight", "origin", "route", "service")

    def __init__(self, service: str, route: str, origin: str = "service") -> None:
        self.service = service
        self.route = route
        self.origin = origin  # who measured: "gateway" or "service" (not a label)
        self.codes: dict[int, int] = {}
        self.duration = LatencyHistogram(REQUEST_BUCKETS)
        self.in_flight = 0

    def finished(self, status: int, seconds: float) -> None:
        """Count one answered request (the histogram's ``observe``, inlined: once per
        request on the gateway's path)."""
        codes = self.codes
        codes[status] = codes.get(status, 0) + 1
        duration = self.duration
        duration.counts[bisect_left(duration.bounds, seconds)] += 1
        duration.sum += seconds


class TopicSeries:
    """Events appended to one topic (duplicates not counted)."""

    __slots__ = ("published", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.published = 0


class ConsumerSeries:
    """Deliveries of one (topic, group) by outcome, and their publish-to-handled latency."""

    __slots__ = ("dead_letter", "drop", "group", "latency", "retry", "success", "topic")

    def __init__(self, topic: str, group: str) -> None:
        self.topic = topic
        self.group = group
        self.success = self.retry = self.dead_letter = self.drop = 0
        self.latency = LatencyHistogram(EVENT_BUCKETS)

    def handled(self, records: Sequence[Any], n: int, failed: Sequence[int] | None,
                now: float) -> None:
        """Count the successes among the first ``n`` of ``records`` (a read batch handled in
        order; ``failed``: the indexes that did not succeed), each with its latency from its
        append (``timestamp_ms``) to ``now``, the batch's end. Records appended in the
        same millisecond (a ``publish_many``) are one bisect."""
        latency = self.latency
        now_ms = now * 1000
        last, run = None, 0
        for i in range(n):
            if failed is not None and i in failed:
                continue
            ts = records[i].timestamp_ms
            if ts == last:
                run += 1
                continue
            if run:
                latency.observe_n((now_ms - last) / 1000, run)  # type: ignore[operator]
            last, run = ts, 1
        if run:
            latency.observe_n((now_ms - last) / 1000, run)  # type: ignore[operator]
        self.success += n - (len(failed) if failed is not None else 0)


class UpstreamSeries:
    """Calls to one service: instance picks here; the rest is read from the live
    ``Upstream`` stacks (``stats``, breaker state) when scraped."""

    __slots__ = ("gone", "picks", "service", "upstreams")

    def __init__(self, service: str) -> None:
        self.service = service
        self.picks: dict[str, int] = {}
        self.upstreams: weakref.WeakSet[Upstream] = weakref.WeakSet()
        self.gone = [0, 0, 0, 0]  # requests, retries, failures, ejections of closed stacks

    def picked(self, instance: str) -> None:
        """Count one try sent to ``instance``."""
        picks = self.picks
        picks[instance] = picks.get(instance, 0) + 1


class Metrics:
    """Every Shoal metric of one process, on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()  # series are made from any thread; counting is not locked
        self.routes: dict[tuple[str, str], RouteSeries] = {}
        self.topics: dict[str, TopicSeries] = {}
        self.consumers: dict[tuple[str, str], ConsumerSeries] = {}
        self.upstreams: dict[str, UpstreamSeries] = {}
        self.folded = 0  # label sets folded into ``other`` (cardinality guard)
        r = self.registry
        self.consumer_lag = Gauge(
            "shoal_consumer_lag", "Events appended but not yet handled by a consumer group.",
            ["topic", "group", "partition"], registry=r)
        self.instances = Gauge(
            "shoal_instances", "Service instances by health state.", ["service", "state"],
            registry=r)
        self.autoscaler_decisions = Counter(
            "shoal_autoscaler_decisions", "Autoscaler decisions by direction (up, down, hold).",
            ["service", "direction"], registry=r)
        self.authz_denials = Counter(
            "shoal_authz_denials", "Calls an authorization policy denied, by deciding rule.",
            ["service", "rule"], registry=r)
        self.autoscaler_replicas = Gauge(
            "shoal_autoscaler_replicas", "Replicas the autoscaler last asked for.", ["service"],
            registry=r)
        r.register(_SeriesCollector(self))

    # -- series (taken once by the objects that count) ----------------------------------
    def _bounded(self, table: dict[Any, Any], key: Any, make: Any, other: Any) -> Any:
        with self._lock:
            series = table.get(key)
            if series is None:
                if len(table) >= MAX_SERIES:
                    self.folded += 1
                    key = other
                    series = table.get(key)
                if series is None:
                    series = table[key] = make(key)
            return series

    def route(self, service: str, route: str, origin: str = "service") -> RouteSeries:
        """The series of requests to ``service`` through ``route`` (a name or template),
        measured by ``origin`` (``gateway`` or ``service``)."""
        return self._bounded(self.routes, (service, route),
                             lambda k: RouteSeries(k[0], k[1], origin), (OTHER, OTHER))

    def topic(self, topic: str) -> TopicSeries:
        """The series of events published to ``topic``."""
        return self._bounded(self.topics, topic, TopicSeries, OTHER)

    def consumer(self, topic: str, group: str) -> ConsumerSeries:
        """The series of deliveries of ``topic`` to ``group``."""
        return self._bounded(self.consumers, (topic, group), lambda k: ConsumerSeries(*k),
                             (OTHER, OTHER))

    def upstream(self, upstream: Upstream) -> UpstreamSeries:
        """The series of calls to ``upstream.service``; the stack is read when scraped."""
        service = upstream.service
        series = self._bounded(self.upstreams, service, UpstreamSeries, OTHER)
        with self._lock:
            series.upstreams.add(upstream)
        weakref.finalize(upstream, _retire, series, upstream.stats)
        return series

    # -- slow figures ---------------------------------------------------------------------
    def set_lag(self, topic: str, group: str, lag: Mapping[int, int]) -> None:
        """Record ``group``'s lag per partition of ``topic``."""
        for partition, n in lag.items():
            self.consumer_lag.labels(topic, group, str(partition)).set(n)

    def set_instances(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Replace the instance counts: ``{(service, state): n}``."""
        self.instances.clear()
        for (service, state), n in counts.items():
            self.instances.labels(service, state).set(n)

    def autoscaler_decision(self, service: str, direction: str, replicas: int) -> None:
        """Count one autoscaler decision (``up``, ``down`` or ``hold``) and its target."""
        self.autoscaler_decisions.labels(service, direction).inc()
        self.autoscaler_replicas.labels(service).set(replicas)


def _retire(series: UpstreamSeries, stats: Any) -> None:
    """Keep a collected ``Upstream``'s counts so the service's counters never go back."""
    gone = series.gone
    gone[0] += stats.requests
    gone[1] += stats.retries
    gone[2] += stats.failures
    gone[3] += stats.ejections


class _SeriesCollector(Collector):
    """Renders the hot-path series as Prometheus families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        with m._lock:
            routes = list(m.routes.values())
            topics = list(m.topics.values())
            consumers = list(m.consumers.values())
            upstreams = list(m.upstreams.values())
        yield from _request_families(routes)
        yield from _event_families(topics, consumers)
        yield from _upstream_families(upstreams)


def _histogram(family: HistogramMetricFamily, labels: list[str], h: LatencyHistogram) -> None:
    counts = list(h.counts)  # one read: the figures may move while we render
    total, buckets = 0, []
    for bound, n in zip((*h.bounds, float("inf")), counts, strict=True):
        total += n
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
    family.add_metric(labels, buckets, h.sum)


def _request_families(routes: Iterable[RouteSeries]) -> Iterator[Metric]:
    total = CounterMetricFamily("shoal_requests", "Requests answered, by service, route and "
                                "status code.", labels=["service", "route", "code"])
    duration = HistogramMetricFamily("shoal_request_duration_seconds", "Time to answer a "
                                     "request (to the response head).",
                                     labels=["service", "route"])
    in_flight = GaugeMetricFamily("shoal_requests_in_flight", "Requests being answered.",
                                  labels=["service", "route"])
    for s in routes:
        for code, n in sorted(s.codes.copy().items()):
            total.add_metric([s.service, s.route, str(code)], n)
        _histogram(duration, [s.service, s.route], s.duration)
        in_flight.add_metric([s.service, s.route], s.in_flight)
    yield from (total, duration, in_flight)


def _event_families(topics: Iterable[TopicSeries], consumers: Iterable[ConsumerSeries]
                    ) -> Iterator[Metric]:
    published = CounterMetricFamily("shoal_events_published", "Events appended to a topic "
                                    "(duplicates not counted).", labels=["topic"])
    for t in topics:
        published.add_metric([t.topic], t.published)
    delivered = CounterMetricFamily("shoal_events_delivered", "Deliveries to a consumer group "
                                    "by outcome.", labels=["topic", "group", "outcome"])
    latency = HistogramMetricFamily("shoal_event_latency_seconds", "From an event's append to "
                                    "its successful handling.", labels=["topic", "group"])
    for c in consumers:
        for outcome, n in zip(OUTCOMES, (c.success, c.retry, c.dead_letter, c.drop),
                              strict=True):
            delivered.add_metric([c.topic, c.group, outcome], n)
        _histogram(latency, [c.topic, c.group], c.latency)
    yield from (published, delivered, latency)


def _upstream_families(upstreams: Iterable[UpstreamSeries]) -> Iterator[Metric]:
    requests = CounterMetricFamily("shoal_upstream_requests", "Calls sent through the mesh's "
                                   "call stack.", labels=["service"])
    retries = CounterMetricFamily("shoal_upstream_retries", "Tries after the first.",
                                  labels=["service"])
    failures = CounterMetricFamily("shoal_upstream_failures", "Calls the stack gave up on.",
                                   labels=["service"])
    ejections = CounterMetricFamily("shoal_outlier_ejections", "Instances ejected by outlier "
                                    "detection.", labels=["service"])
    picks = CounterMetricFamily("shoal_balancer_picks", "Tries sent to each instance by the "
                                "load balancer.", labels=["service", "instance"])
    circuits = GaugeMetricFamily("shoal_circuit_state", "Call stacks to the service in each "
                                 "circuit breaker state.", labels=["service", "state"])
    for u in upstreams:
        totals = list(u.gone)
        states = {"closed": 0, "open": 0, "half_open": 0}
        for stack in list(u.upstreams):
            st = stack.stats
            totals[0] += st.requests
            totals[1] += st.retries
            totals[2] += st.failures
            totals[3] += st.ejections
            state = str(stack.breaker.state.value).replace("-", "_")
            states[state] = states.get(state, 0) + 1
        for family, n in zip((requests, retries, failures, ejections), totals, strict=True):
            family.add_metric([u.service], n)
        for instance, n in sorted(u.picks.copy().items()):
            picks.add_metric([u.service, instance], n)
        for state, n in states.items():
            circuits.add_metric([u.service, state], n)
    yield from (requests, retries, failures, ejections, picks, circuits)


_active: Metrics | None = None


def enable_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Turn metrics on for this process (idempotent) and return them."""
    global _active
    if _active is None:
        _active = Metrics(registry)
    return _active


def disable_metrics() -> None:
    """Turn metrics off: objects made from now on count nothing (tests, benchmarks)."""
    global _active
    _active = None


def active() -> Metrics | None:
    """The process's metrics, or ``None`` when they are off."""
    return _active
