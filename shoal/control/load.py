"""Load figures instances publish for the autoscaler: one leased Store key per instance.

``shoal/load/<service>/<instance id>`` holds ``LoadReport`` (msgspec JSON): the instance's
requests in flight and when it measured them, rewritten when the figure changes (checked
every ``interval``). The key carries the reporter's lease (``ttl``), so the figure of an
instance killed with -9 vanishes with it (at once when the supervisor saw it die:
``shoal.control.cleanup``) instead of inflating its service's load. A key rather than
an event: a gauge needs only its latest value, and the log would keep every sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import msgspec

from shoal.errors import ConfigError, StoreError
from shoal.mesh.registry import check_instance_id, check_service_name
from shoal.store.base import Lease, Store

log = logging.getLogger("shoal.control")

LOAD_PREFIX = "shoal/load/"


class LoadReport(msgspec.Struct, frozen=True, kw_only=True):
    """One instance's load at ``at`` (wall clock)."""

    service: str
    instance: str
    inflight: int = 0
    at: float = 0.0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LoadReport)


def load_key(service: str, instance_id: str) -> str:
    """The Store key of an instance's load report."""
    return f"{LOAD_PREFIX}{check_service_name(service)}/{check_instance_id(instance_id)}"


async def read_inflight(store: Store) -> dict[str, int]:
    """Requests in flight per service, over every instance reporting (malformed skipped)."""
    totals: dict[str, int] = {}
    for entry in await store.list(LOAD_PREFIX):
        try:
            report = _decoder.decode(entry.value)
        except msgspec.DecodeError as e:
            log.warning("load: skipping malformed report %r: %s", entry.key, e)
            continue
        if entry.key != f"{LOAD_PREFIX}{report.service}/{report.instance}" or report.inflight < 0:
            log.warning("load: skipping %r: it does not match its key", entry.key)
            continue
        totals[report.service] = totals.get(report.service, 0) + report.inflight
    return totals


class LoadReporter:
    """Writes an instance's in-flight count every ``interval`` seconds under its own lease."""

    def __init__(self, store: Store, service: str, instance_id: str,
                 inflight: Callable[[], int], *, interval: float = 1.0,
                 ttl: float = 10.0) -> None:
        if not interval > 0 or not ttl > interval:
            raise ConfigError(f"load reporter: interval must be > 0 and ttl above it, got "
                              f"interval={interval!r}, ttl={ttl!r}")
        self.store = store
        self.key = load_key(service, instance_id)
        self.service, self.instance_id = service, instance_id
        self.inflight = inflight
        self.interval = interval
        self.ttl = ttl
        self.writes = 0  # reports written (a figure that did not change is not rewritten)
        self._last: int | None = None
        self._renewed = 0.0
        self._lease: Lease | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> LoadReporter:
        """Write the first report and keep reporting in the background."""
        await self.report()
        self._task = asyncio.get_running_loop().create_task(self._loop(),
                                                            name=f"shoal-load {self.key}")
        return self

    async def report(self, *, force: bool = False) -> None:
        """Write the current figure if it changed (every write wakes the Store's watchers:
        an idle instance costs one lease renewal per ttl/3, not a write per interval)."""
        now = time.monotonic()
        if self._lease is None:
            self._lease, self._last, force = await self.store.lease(self.ttl), None, True
            self._renewed = now
        elif now - self._renewed >= self.ttl / 3:
            await self._lease.keepalive()
            self._renewed = now
        figure = int(self.inflight())
        if figure == self._last and not force:
            return
        report = LoadReport(service=self.service, instance=self.instance_id, inflight=figure,
                            at=time.time())
        await self.store.put(self.key, _encoder.encode(report), lease=self._lease)
        self._last = figure
        self.writes += 1

    async def close(self) -> None:
        """Stop reporting and remove the key."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._lease is not None:
            with contextlib.suppress(StoreError):
                await self._lease.revoke()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.report()
            except StoreError as e:
                self._lease = None  # expired or failed: take a new one next time
                log.warning("load: reporting %s failed: %s", self.key, e)
