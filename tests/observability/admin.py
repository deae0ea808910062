"""An admin app (Starlette + the dashboard) on a real uvicorn socket, for the dashboard tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette

from shoal.control.dashboard import ControlSource, mount_dashboard


class FakeControl:
    """The admin API's ``Control`` protocol, answered from fixed services and instances
    (the real one is the control plane's; topics come from the bus)."""

    def __init__(self, services: list[str]) -> None:
        self.names = services

    async def services(self) -> list[dict[str, Any]]:
        return [{"name": n, "replicas": 1, "states": {"serving": 1}} for n in self.names]

    async def instances(self) -> list[dict[str, Any]]:
        return [{"id": f"{n}-1", "service": n, "state": "serving", "pid": 1,
                 "address": "127.0.0.1:1"} for n in self.names]

    async def topics(self) -> None:
        return None  # -> the source reads topics from the bus


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """``app`` on 127.0.0.1 (a free port) until the block ends; yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = True  # open event streams do not hold the shutdown
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


def dashboard_app(source: ControlSource, interval: float = 0.25) -> Starlette:
    """A bare admin app with the dashboard mounted."""
    app = Starlette()
    mount_dashboard(app, source, interval=interval)
    return app
