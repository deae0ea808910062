"""`ServiceHarness`: run a Service in-process for your unit tests, on ``memory://``.

::

    async def test_order_is_billed():
        async with ServiceHarness(billing) as h:
            await h.publish("orders", {"order": 1, "total": 30}, key="alice")  # and wait
            resp = await h.client.get("/invoices/1")
            assert resp.status_code == 200
            assert [e.type for e in await h.published("invoices")] == ["invoice.created"]

Each harness gets its own ``memory://`` broker and store, so tests never see each
other's events. ``client`` is an ``httpx.AsyncClient`` speaking to the service's ASGI app
directly (no socket); ``publish`` waits until every subscription of the service has
finished with the event (handled, dropped or dead-lettered). ``svc.call`` reaches
services registered in the harness's store: register fakes with ``serve``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping
from typing import Any

from shoal.errors import ShoalError
from shoal.events.bus import EventBus, PublishAck
from shoal.events.event import Event, decode_record
from shoal.mesh.resilience import TrafficPolicy
from shoal.service import Service

DEFAULT_WAIT = 5.0


class ServiceHarness:
    """``async with ServiceHarness(svc) as h``: ``svc`` started on a private ``memory://``."""

    def __init__(self, service: Service, *, serve_http: bool = False,
                 policies: Mapping[str, TrafficPolicy] | None = None) -> None:
        if not isinstance(service, Service):
            raise TypeError(f"ServiceHarness: expected a shoal.Service, got "
                            f"{type(service).__name__}")
        self.service = service
        self.url = f"memory://harness-{secrets.token_hex(6)}"
        self.serve_http = serve_http  # also listen on loopback and register in the mesh
        self.policies = policies  # traffic policies of the services it calls
        self.client: Any = None
        self._extra: list[Service] = []

    @property
    def bus(self) -> EventBus:
        """The service's bus (publish, consume, lag...)."""
        if self.service.bus is None:
            raise ShoalError("ServiceHarness: the service is not running")
        return self.service.bus

    async def __aenter__(self) -> ServiceHarness:
        try:
            import httpx
        except ImportError:  # pragma: no cover - httpx comes with shoal[httpx] / [test]
            raise ShoalError("ServiceHarness needs httpx: pip install 'shoal[httpx]'") from None
        await self.service.start(broker=self.url, store=self.url,
                                 listen="127.0.0.1:0" if self.serve_http else None,
                                 policies=self.policies)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.service),
                                        base_url=f"http://{self.service.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.client is not None:
            await self.client.aclose()
        await self.service.stop(grace=0)
        for other in reversed(self._extra):
            await other.stop(grace=0)

    async def serve(self, other: Service) -> Service:
        """Run another Service (a fake dependency) on loopback in the same mesh, so that
        ``svc.call(other.name, ...)`` reaches it; stopped with the harness."""
        await other.start(broker=self.url, store=self.url, listen="127.0.0.1:0")
        self._extra.append(other)
        await self.service.mesh.cache.wait_for(other.name)  # type: ignore[union-attr]
        return other

    async def publish(self, topic: str, data: Any = None, *, key: str | None = None,
                      type: str | None = None, wait: float | None = DEFAULT_WAIT,
                      **kw: Any) -> PublishAck:
        """Publish an event as another service would; unless ``wait`` is None, return once
        every subscription of this service to ``topic`` is done with it."""
        ack = await self.bus.publish(topic, data, key=key, type=type, **kw)
        if wait is not None:
            await self.wait_idle(topic, timeout=wait)
        return ack

    async def wait_idle(self, topic: str | None = None, *, timeout: float = DEFAULT_WAIT
                        ) -> None:
        """Wait until the service's groups have no lag on ``topic`` (or on every topic
        they consume) and no handler runs; ``TimeoutError`` naming what is behind."""
        deadline = time.monotonic() + timeout
        specs = [s for s in self.service.subscriptions if topic is None or s.topic == topic]
        while True:
            behind = []
            for spec in specs:
                lag = sum((await self.bus.lag(spec.topic, spec.group)).values())
                if lag:
                    behind.append(f"{spec.topic}/{spec.group}: {lag} event(s) behind")
            if not behind and self.service.load.inflight_events == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"ServiceHarness: not idle after {timeout:g}s: "
                                   f"{'; '.join(behind) or 'handlers still running'}")
            await asyncio.sleep(0.01)

    async def published(self, topic: str) -> list[Event]:
        """Every event in ``topic`` so far, in log order per partition."""
        events: list[Event] = []
        if await self.bus.broker.get_topic(topic) is None:
            return events
        for p, r in enumerate(await self.bus.broker.ranges(topic)):
            offset = r.start
            while offset < r.end:
                records = await self.bus.broker.read(topic, p, offset, 1024)
                if not records:
                    break
                events.extend(decode_record(rec.value) for rec in records)
                offset = records[-1].offset + 1
        return events
