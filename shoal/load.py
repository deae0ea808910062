"""What an instance is doing right now: counters kept by ``Service`` as it works.

The control plane's load reporter (``shoal.control.load``) reads ``inflight_requests``
for the autoscaler; the peaks say how high it went since someone last looked
(``take_peaks``), so a burst between two samples is not missed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Load:
    """Live counters of one instance (single event loop; sync handlers report via it)."""

    inflight_requests: int = 0
    inflight_events: int = 0
    requests: int = 0  # since the instance started
    events: int = 0  # handler runs, retries included
    peak_inflight_requests: int = 0
    peak_inflight_events: int = 0

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

    def take_peaks(self) -> tuple[int, int]:
        """``(requests, events)`` peaks since the last call; they restart from now."""
        peaks = self.peak_inflight_requests, self.peak_inflight_events
        self.peak_inflight_requests = self.inflight_requests
        self.peak_inflight_events = self.inflight_events
        return peaks
