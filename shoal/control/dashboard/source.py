"""What the dashboard shows, gathered once per tick: ``ControlSource.snapshot()``.

A snapshot is one JSON-ready dict::

    {"time": 1732364400.0,
     "services":  [{"name", "replicas", "states": {state: n}, "instances": [...],
                    "rps", "success_rate", "p50", "p95", "p99"}],
     "edges":     [{"from", "to", "kind": "call" | "event", "rate"}],
     "topics":    [{"name", "partitions", "events", "dead_letters", "publish_rate",
                    "groups": [{"name", "lag", "rate"}]}],
     "events":    [{"topic", "id", "type", "key", "time"}],   newest first
     "autoscaler": [{"time", "service", "direction", ...}],   newest first
     "errors":    ["what could not be read, and why"]}

Services, instances and topics come from the control plane (the admin API's ``Control``)
when there is one, else from the bus and the metrics alone; golden figures and rates
from this process's metrics (the gateway's view of every service behind it); the event
tail and autoscaler decisions from the last records of each topic (``shoal.autoscaler``
is where the autoscaler publishes its decisions).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from shoal.control.dashboard.golden import GoldenWindow, Reading, service_readings
from shoal.control.dashboard.scrape import InstanceScraper, Scraped
from shoal.errors import ShoalError, TopicError
from shoal.events.bus import EventBus
from shoal.events.dlq import replay_dead_letters
from shoal.events.event import decode_record
from shoal.events.partitioning import check_topic_name
from shoal.observability.metrics import Metrics

AUTOSCALER_TOPIC = "shoal.autoscaler"
TAIL = 25  # recent events shown
TAIL_PER_PARTITION = 5


class DashboardSource(Protocol):
    """What ``mount_dashboard`` needs."""

    async def snapshot(self) -> dict[str, Any]: ...
    async def replay(self, topic: str) -> dict[str, Any]: ...


class ControlSource:
    """Snapshots from a control plane (optional), a bus (optional) and metrics."""

    def __init__(self, control: Any = None, *, bus: EventBus | None = None,
                 metrics: Metrics | None = None, scrape: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.control = control
        self.scraper = InstanceScraper() if scrape else None
        self.bus = bus if bus is not None else getattr(control, "bus", None)
        self.metrics = metrics
        self.clock = clock
        self.window = GoldenWindow()

    async def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, now."""
        now, errors = self.clock(), []
        services = await self._read("services", errors) or []
        instances = await self._read("instances", errors) or []
        topics = await self._read("topics", errors)
        if topics is None:
            topics = await self._bus_topics(errors)
        scraped = Scraped()
        if self.scraper is not None:
            live = {str(i["address"]): str(i.get("service")) for i in instances
                    if i.get("address")
                    and i.get("state") not in ("stopped", "unregistered", "crashed")}
            scraped = await self.scraper.scrape(live, live)
        golden = self.window.update(now, self._readings(scraped))
        by_service: dict[str, list[dict[str, Any]]] = {}
        for inst in instances:
            by_service.setdefault(str(inst.get("service", "?")), []).append(inst)
        names = [s["name"] for s in services]
        names += sorted(n for n in set(golden) | set(by_service) if n not in names
                        and n not in ("gateway", "other"))
        known = {s["name"]: s for s in services}
        out_services = []
        for name in names:
            base = known.get(name, {"name": name})
            g = golden.get(name)
            figures = g.as_dict() if g is not None else {
                "rps": 0.0, "success_rate": None, "p50": None, "p95": None, "p99": None}
            out_services.append({**base, "instances": by_service.get(name, []), **figures})
        via_gateway = {r.service for r in list(self.metrics.routes.values())
                       if r.origin == "gateway"} if self.metrics else set()
        edges = [{"from": "gateway", "to": name, "kind": "call", "rate": g.rps}
                 for name, g in golden.items()
                 if name in via_gateway and name not in ("gateway", "other")]
        out_topics = self._topics(topics, now, edges, scraped)
        events, decisions = await self._tail(errors)
        return {"time": time.time(), "services": out_services, "edges": edges,
                "topics": out_topics, "events": events, "autoscaler": decisions,
                "errors": errors, "scrape_failures": scraped.failures}

    def _readings(self, scraped: Scraped) -> dict[str, Reading]:
        """Per service: the gateway's view when it measured the service here, else the
        instances' own figures, else what this process measured itself."""
        local = service_readings(self.metrics) if self.metrics is not None else {}
        via_gateway = {r.service for r in list(self.metrics.routes.values())
                       if r.origin == "gateway"} if self.metrics is not None else set()
        out = dict(scraped.services)
        for name, reading in local.items():
            if name in via_gateway or name not in out:
                out[name] = reading
        return out

    async def aclose(self) -> None:
        """Close the scraper's connections."""
        if self.scraper is not None:
            await self.scraper.aclose()

    async def replay(self, topic: str) -> dict[str, Any]:
        """Replay ``topic``'s dead letters (``TopicError`` if it does not exist)."""
        check_topic_name(topic)
        if self.bus is None:
            raise TopicError("this dashboard has no event bus to replay on")
        if await self.bus.broker.get_topic(topic) is None:
            raise TopicError(f"topic {topic!r} does not exist")
        return {"topic": topic, **await replay_dead_letters(self.bus, topic)}

    # -- pieces ------------------------------------------------------------------------
    async def _read(self, what: str, errors: list[str]) -> Any:
        if self.control is None:
            return None
        try:
            return await getattr(self.control, what)()
        except Exception as exc:  # a part that cannot be read is reported, not fatal
            errors.append(f"{what}: {exc!r}"[:300])
            return None

    async def _bus_topics(self, errors: list[str]) -> list[dict[str, Any]]:
        if self.bus is None:
            return []
        try:
            infos = await self.bus.topics()
            sizes = {i.spec.name: i.events for i in infos}
            out = []
            for info in infos:
                name = info.spec.name
                if name.endswith(".dlq"):
                    continue
                lag = {g: sum((await self.bus.lag(name, g)).values())
                       for g in await self.bus.groups(name)}
                out.append({"name": name, "partitions": info.spec.partitions,
                            "events": info.events, "lag": lag,
                            "dead_letters": sizes.get(f"{name}.dlq", 0)})
            return out
        except (ShoalError, OSError) as exc:
            errors.append(f"topics: {exc!r}"[:300])
            return []

    def _topics(self, topics: list[dict[str, Any]], now: float,
                edges: list[dict[str, Any]], scraped: Scraped) -> list[dict[str, Any]]:
        m = self.metrics
        published = dict(scraped.published)
        delivered = dict(scraped.delivered)
        if m is not None:
            for t in list(m.topics.values()):
                published[t.topic] = published.get(t.topic, 0) + t.published
            for c in list(m.consumers.values()):
                key = (c.topic, c.group)
                delivered[key] = delivered.get(key, 0) + c.success + c.dead_letter + c.drop
        out = []
        for t in topics:
            name = t["name"]
            rate = self.window.rate(f"publish/{name}", now, published.get(name, 0))
            groups = []
            for group, lag in sorted((t.get("lag") or {}).items()):
                if group.startswith("shoal-"):  # the CLI's private groups, replay marks
                    continue
                grate = self.window.rate(f"deliver/{name}/{group}", now,
                                         delivered.get((name, group), 0))
                groups.append({"name": group, "lag": lag, "rate": grate})
                edges.append({"from": name, "to": group, "kind": "event", "rate": grate})
            out.append({"name": name, "partitions": t.get("partitions"),
                        "events": t.get("events"), "dead_letters": t.get("dead_letters", 0),
                        "publish_rate": rate, "groups": groups})
        return out

    async def _tail(self, errors: list[str]) -> tuple[list[dict[str, Any]],
                                                      list[dict[str, Any]]]:
        """The newest events over every topic, and the autoscaler's last decisions."""
        if self.bus is None:
            return [], []
        events: list[dict[str, Any]] = []
        decisions: list[dict[str, Any]] = []
        try:
            for info in await self.bus.topics():
                name = info.spec.name
                for p, rng in enumerate(info.ranges):
                    start = max(rng.start, rng.end - TAIL_PER_PARTITION)
                    if start >= rng.end:
                        continue
                    for record in await self.bus.broker.read(name, p, start, rng.end - start):
                        event = decode_record(record.value)
                        row = {"topic": name, "id": event.id, "type": event.type,
                               "key": event.key, "time": record.timestamp_ms / 1000,
                               "partition": p, "offset": record.offset}
                        if name == AUTOSCALER_TOPIC:
                            data = event.data if isinstance(event.data, dict) else {
                                "decision": event.data}
                            decisions.append({"time": row["time"], **data})
                        else:
                            events.append(row)
        except (ShoalError, OSError) as exc:
            errors.append(f"event tail: {exc!r}"[:300])
        events.sort(key=lambda e: e["time"], reverse=True)
        decisions.sort(key=lambda e: e["time"], reverse=True)
        return events[:TAIL], decisions[:TAIL]
