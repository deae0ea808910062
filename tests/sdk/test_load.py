"""The load counters a Service keeps (what the autoscaler's reporter reads)."""

from __future__ import annotations

import asyncio

import httpx
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from shoal import Service
from shoal.events import Event
from shoal.load import Load
from shoal.testing import ServiceHarness


def test_counters_and_peaks_since_last_look() -> None:
    load = Load()
    for _ in range(3):
        load.request_started()
    load.request_finished()
    load.request_finished()
    load.event_started()
    load.event_finished()
    assert (load.inflight_requests, load.requests, load.inflight_events, load.events) == (
        1, 3, 0, 1)
    assert load.take_peaks() == (3, 1)
    assert load.take_peaks() == (1, 0)  # restarted from the current level


async def test_service_counts_inflight_requests_over_real_http_and_events() -> None:
    svc = Service("loaded")
    release = asyncio.Event()

    @svc.get("/hold")
    async def hold(request: Request) -> PlainTextResponse:
        await release.wait()
        return PlainTextResponse("ok")

    @svc.subscribe("jobs")
    def job(event: Event) -> None:  # sync: counted from its thread
        pass

    async with ServiceHarness(svc, serve_http=True) as h:
        async with httpx.AsyncClient(base_url=f"http://{svc.address}") as client:
            held = [asyncio.create_task(client.get("/hold")) for _ in range(3)]
            while svc.load.inflight_requests < 3:
                await asyncio.sleep(0.005)
            release.set()
            assert all(r.status_code == 200 for r in await asyncio.gather(*held))
        assert svc.load.inflight_requests == 0 and svc.load.requests == 3
        assert svc.load.take_peaks()[0] == 3
        await h.publish("jobs", 1)
        assert (svc.load.events, svc.load.inflight_events) == (1, 0)
