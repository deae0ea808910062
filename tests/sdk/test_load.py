"""Load counters and the ``shoal.load`` reports instances publish."""

from __future__ import annotations

import asyncio

import httpx
import msgspec
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from shoal import Service
from shoal.load import LOAD_TOPIC, Load, LoadReport
from shoal.testing import ServiceHarness


def test_report_carries_peaks_since_the_previous_one_and_restarts_them() -> None:
    load = Load()
    first = load.report("s", "i", now=100.0, monotonic=10.0)
    assert first.interval == 0.0 and first.peak_inflight_requests == 0
    for _ in range(3):
        load.request_started()
    load.request_finished()
    load.request_finished()
    load.event_started()
    load.event_finished()
    second = load.report("s", "i", now=101.0, monotonic=11.5)
    assert (second.inflight_requests, second.peak_inflight_requests) == (1, 3)
    assert (second.inflight_events, second.peak_inflight_events, second.events) == (0, 1, 1)
    assert second.requests == 3 and second.interval == 1.5 and second.at == 101.0
    third = load.report("s", "i", now=102.0, monotonic=12.5)
    assert third.peak_inflight_requests == 1 and third.peak_inflight_events == 0


async def test_registered_instance_publishes_load_reports() -> None:
    svc = Service("loaded")
    release = asyncio.Event()

    @svc.get("/hold")
    async def hold(request: Request) -> PlainTextResponse:
        await release.wait()
        return PlainTextResponse("ok")

    harness = ServiceHarness(svc)
    await svc.start(broker=harness.url, store=harness.url, listen="127.0.0.1:0",
                    instance_id="loaded-1", load_interval="30ms")
    try:
        async with httpx.AsyncClient(base_url=f"http://{svc.address}") as client:
            held = [asyncio.create_task(client.get("/hold")) for _ in range(3)]
            while svc.load.inflight_requests < 3:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)
            release.set()
            assert all(r.status_code == 200 for r in await asyncio.gather(*held))
            await asyncio.sleep(0.1)
        reports = [msgspec.convert(e.data, LoadReport)
                   for e in await harness.published(LOAD_TOPIC)]
        events = await harness.published(LOAD_TOPIC)
        assert {e.type for e in events} == {"shoal.load"}
        assert {e.key for e in events} == {"loaded-1"}
        assert max(r.peak_inflight_requests for r in reports) == 3
        assert reports[-1].inflight_requests == 0 and reports[-1].requests == 3
        assert all(r.service == "loaded" and r.instance == "loaded-1" for r in reports)
    finally:
        await svc.stop(grace=0)
    assert svc._reporting is None
