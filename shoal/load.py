"""What an instance is doing: counters kept by ``Service``, and the reports it publishes.

Every registered instance publishes a ``LoadReport`` on the ``shoal.load`` topic every
``interval`` (1 s by default; ``SHOAL_LOAD_INTERVAL``), keyed by instance id, with type
``shoal.load``. The autoscaler scales on in-flight requests per instance from these
(and on consumer lag from the bus itself). A report carries the peak since the previous
one, so a burst between two samples is not missed. The topic keeps ten minutes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec

LOAD_TOPIC = "shoal.load"
LOAD_EVENT_TYPE = "shoal.load"
LOAD_RETENTION = "10m"
DEFAULT_LOAD_INTERVAL = 1.0


class LoadReport(msgspec.Struct, frozen=True, kw_only=True):
    """One instance's load over the last interval (the data of a ``shoal.load`` event)."""

    service: str
    instance: str
    inflight_requests: int  # now
    peak_inflight_requests: int  # the most at once since the previous report
    inflight_events: int
    peak_inflight_events: int
    requests: int  # since the instance started
    events: int
    interval: float  # seconds since the previous report
    at: float  # wall clock


@dataclass(slots=True)
class Load:
    """Live counters of one instance; ``report`` snapshots them and restarts the peaks."""

    inflight_requests: int = 0
    inflight_events: int = 0
    requests: int = 0
    events: int = 0
    peak_inflight_requests: int = 0
    peak_inflight_events: int = 0
    _last_report: float = 0.0

    def request_started(self) -> None:
        """A request came in."""
        self.inflight_requests += 1
        self.requests += 1
        if self.inflight_requests > self.peak_inflight_requests:
            self.peak_inflight_requests = self.inflight_requests

    def request_finished(self) -> None:
        """A request was answered (or failed)."""
        self.inflight_requests -= 1

    def event_started(self) -> None:
        """A handler started on an event (each retry counts again)."""
        self.inflight_events += 1
        if self.inflight_events > self.peak_inflight_events:
            self.peak_inflight_events = self.inflight_events

    def event_finished(self) -> None:
        """A handler returned or raised."""
        self.inflight_events -= 1
        self.events += 1

    def report(self, service: str, instance: str, *, now: float | None = None,
               monotonic: float | None = None) -> LoadReport:
        """A report of the interval that ends now; the peaks restart from the current level."""
        mono = time.monotonic() if monotonic is None else monotonic
        interval = mono - self._last_report if self._last_report else 0.0
        report = LoadReport(
            service=service, instance=instance,
            inflight_requests=self.inflight_requests,
            peak_inflight_requests=self.peak_inflight_requests,
            inflight_events=self.inflight_events,
            peak_inflight_events=self.peak_inflight_events,
            requests=self.requests, events=self.events, interval=interval,
            at=time.time() if now is None else now)
        self.peak_inflight_requests = self.inflight_requests
        self.peak_inflight_events = self.inflight_events
        self._last_report = mono
        return report
