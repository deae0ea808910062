"""Figures of the other processes: every instance's ``/metrics``, read and summed.

The control plane sees the gateway's requests itself; what the services do among
themselves (mesh calls, publishes, consumers) is counted in each instance's process. The
dashboard reads each instance's ``/metrics`` once per tick (concurrently, with a short
timeout, a size limit, and prometheus-client's parser) and sums the figures per service,
topic and group. An instance that cannot be read is counted in ``failures`` and skipped:
its figures return with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from shoal.control.dashboard.golden import Reading
from shoal.mesh.http1 import ConnectionPool
from shoal.mesh.security.tls import MeshTLS
from shoal.observability.metrics import REQUEST_BUCKETS

TIMEOUT = 0.5
MAX_BYTES = 4 * 1024 * 1024


@dataclass
class Scraped:
    """The sums over every instance read."""

    services: dict[str, Reading] = field(default_factory=dict)
    published: dict[str, float] = field(default_factory=dict)
    delivered: dict[tuple[str, str], float] = field(default_factory=dict)
    failures: int = 0


def add_exposition(text: str, into: Scraped) -> None:
    """Add one instance's exposition to the sums (``ValueError`` if it does not parse)."""
    bounds = {repr(float(b)): i for i, b in enumerate(REQUEST_BUCKETS)} | {
        "+Inf": len(REQUEST_BUCKETS)}
    cumulative: dict[tuple[str, str], list[float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if s.name == "shoal_requests_total":
                r = into.services.setdefault(labels.get("service", "?"), Reading())
                r.requests += int(s.value)
                if labels.get("code", "").startswith("5"):
                    r.errors += int(s.value)
            elif s.name == "shoal_request_duration_seconds_bucket":
                i = bounds.get(labels.get("le", ""))
                if i is not None:
                    key = (labels.get("service", "?"), labels.get("route", "?"))
                    cumulative.setdefault(key, [0.0] * (len(REQUEST_BUCKETS) + 1))[i] = s.value
            elif s.name == "shoal_events_published_total":
                topic = labels.get("topic", "?")
                into.published[topic] = into.published.get(topic, 0) + s.value
            elif s.name == "shoal_events_delivered_total" and labels.get("outcome") != "retry":
                key2 = (labels.get("topic", "?"), labels.get("group", "?"))
                into.delivered[key2] = into.delivered.get(key2, 0) + s.value
    for (service, _), counts in cumulative.items():
        r = into.services.setdefault(service, Reading())
        previous = 0.0
        for i, total in enumerate(counts):
            r.buckets[i] += int(max(total - previous, 0))
            previous = max(previous, total)


class InstanceScraper:
    """Reads ``/metrics`` of instances by address, keeping one small pool per address;
    with ``tls`` (the control plane's identity under mTLS), over mutual TLS."""

    def __init__(self, tls: MeshTLS | None = None) -> None:
        self._pools: dict[str, ConnectionPool] = {}
        self.tls = tls
        self._services: Mapping[str, str] = {}

    async def scrape(self, addresses: Iterable[str],
                     services: Mapping[str, str] | None = None) -> Scraped:
        """Every address read concurrently; the sums. ``services``: the service at each
        address (the identity mTLS expects there)."""
        out = Scraped()
        self._services = services or {}
        wanted = sorted(set(addresses))
        for gone in set(self._pools) - set(wanted):
            await self._pools.pop(gone).aclose()
        texts = await asyncio.gather(*(self._read(a) for a in wanted))
        for text in texts:
            if text is None:
                out.failures += 1
                continue
            try:
                add_exposition(text, out)
            except (ValueError, TypeError, KeyError):
                out.failures += 1
        return out

    async def _read(self, address: str) -> str | None:
        pool = self._pools.get(address)
        if pool is None:
            service = self._services.get(address)
            ssl = None if self.tls is None or service is None else self.tls.client_context(
                service)
            pool = self._pools[address] = ConnectionPool(address, max_connections=1, ssl=ssl)
        try:
            async with asyncio.timeout(TIMEOUT):
                resp = await pool.request("GET", "/metrics", [("host", address)])
                body = await resp.aread()
        except Exception:  # down, slow, refusing: skipped this tick
            return None
        if resp.status != 200 or len(body) > MAX_BYTES:
            return None
        return body.decode("utf-8", "replace")

    async def aclose(self) -> None:
        """Close every pool."""
        for pool in self._pools.values():
            with contextlib.suppress(Exception):
                await pool.aclose()
        self._pools.clear()
