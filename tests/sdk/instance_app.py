"""The service the instance-runner tests run with ``python -m shoal.instance``.

It records what it does as files under ``$SDK_TEST_DIR`` so the test (another process)
can see it: ``started-<id>`` and ``done-<id>`` for each event handled.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse

from shoal import Service
from shoal.context import current_traceparent
from shoal.events import Event

svc = Service("sdk-echo", version="7")
OUT = Path(os.environ.get("SDK_TEST_DIR", "."))


@svc.post("/echo")
async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"echo": await request.json(), "instance": svc.instance_id,
                         "trace": current_traceparent.get()})


@svc.get("/slow")
async def slow(request: Request) -> JSONResponse:
    (OUT / "slow-started").touch()
    await asyncio.sleep(float(request.query_params.get("s", "1")))
    return JSONResponse({"slow": "done"})


@svc.subscribe("sdk-jobs")
async def job(event: Event) -> None:
    (OUT / f"started-{event.id}").write_text(str(event.traceparent))
    await asyncio.sleep(float(event.data.get("sleep", 0)))
    await svc.publish("sdk-done", {"job": event.id}, key=event.key)
    (OUT / f"done-{event.id}").touch()


not_a_service = object()
