"""Passive outlier ejections, shared through the Store so the registry's state machine sees them.

Outlier detection runs inside each caller (every ``Upstream``, as in Envoy), so only the
caller knows that an instance answered five 5xx in a row. A caller that ejects an
instance writes a report; the ``HealthMonitor`` turns the first report on an instance into
``InstanceHealth.on_ejected`` (state EJECTED, published on ``shoal.instances``, and seen
by every client through the verdict) and the last report's end into ``on_unejected``.

Store layout, under ``shoal/ejections/``::

    <service>/<instance id>/<reporter id>    EjectionReport (msgspec JSON)

Each report is written under its own lease whose TTL is the ejection's remaining time, so
the store itself deletes it when the ejection ends, also when the reporter died: no
reporter has to come back to clear it, and no ejection outlives its ``until``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid

import msgspec

from shoal.errors import StoreError
from shoal.mesh.resilience import Ejection
from shoal.store.base import Store

log = logging.getLogger(__name__)

EJECTIONS_PREFIX = "shoal/ejections/"
MAX_REASON = 1024
MAX_PENDING = 64  # reports being written at most; more are dropped (ejection stays local)


class EjectionReport(msgspec.Struct, frozen=True):
    """One caller's ejection of one instance."""

    reason: str
    until: float  # wall-clock seconds
    reporter: str


_encode = msgspec.json.Encoder().encode
_decode_report = msgspec.json.Decoder(EjectionReport).decode


def ejection_key(service: str, instance_id: str, reporter: str,
                 prefix: str = EJECTIONS_PREFIX) -> str:
    """The store key of ``reporter``'s report on an instance."""
    return f"{prefix}{service}/{instance_id}/{reporter}"


def parse_ejection_key(key: str, prefix: str = EJECTIONS_PREFIX) -> tuple[str, str, str] | None:
    """``(service, instance id, reporter)`` of a report key, or None if it is not one."""
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix):].split("/")
    if len(parts) != 3 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


def decode_report(key: str, value: bytes | None) -> EjectionReport | None:
    """The report stored at ``key``, or None (with a warning) when it is malformed."""
    try:
        return _decode_report(value or b"")
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        log.warning("ejections: skipping malformed report %r: %s", key, e)
        return None


class EjectionReporter:
    """Writes this caller's ejections to the Store, without ever delaying a request."""

    def __init__(self, store: Store, *, reporter: str | None = None,
                 prefix: str = EJECTIONS_PREFIX) -> None:
        self.store = store
        self.reporter = reporter or uuid.uuid4().hex[:16]
        self.prefix = prefix
        self._pending: set[asyncio.Task[None]] = set()
        self.reported = 0  # reports written so far

    def report(self, service: str, ejection: Ejection, remaining: float) -> None:
        """Share ``ejection`` of an instance of ``service``, lasting ``remaining`` seconds."""
        if remaining <= 0 or len(self._pending) >= MAX_PENDING:
            return
        task = asyncio.get_running_loop().create_task(self._write(service, ejection, remaining))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, service: str, ejection: Ejection, remaining: float) -> None:
        report = EjectionReport(reason=ejection.reason[:MAX_REASON],
                                until=time.time() + remaining, reporter=self.reporter)
        key = ejection_key(service, ejection.instance_id, self.reporter, self.prefix)
        try:
            lease = await self.store.lease(max(0.001, math.ceil(remaining * 1000) / 1000))
            await self.store.put(key, _encode(report), lease=lease)
            self.reported += 1
        except StoreError as e:
            log.warning("ejections: sharing the ejection of %s/%s failed (it stays local): %s",
                        service, ejection.instance_id, e)

    async def aclose(self) -> None:
        """Finish the reports being written."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
