"""The dashboard: a static page (no build step, nothing fetched from the network) and the
endpoints that feed it, mounted into the admin API's Starlette app.

``mount_dashboard(app, source)`` adds::

    GET  /dashboard                     the page (HTML, JS and CSS served from this package)
    GET  /api/stream                    server-sent events: one snapshot per second
    GET  /api/snapshot                  the latest snapshot as JSON (``shoal top`` polls it)
    POST /api/topics/{topic}/replay     replay the topic's dead letters

One ``SnapshotHub`` per app computes a snapshot each ``interval`` while anybody listens and
sends the same one to every listener (rates are per interval, so listeners must not each
advance the window); a listener that stops reading is dropped, not waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from shoal.control.dashboard.source import ControlSource, DashboardSource
from shoal.errors import ShoalError, TopicError

__all__ = ["ControlSource", "DashboardSource", "SnapshotHub", "mount_dashboard"]

STATIC = Path(__file__).resolve().parent / "static"
FILES = {"app.js": "text/javascript", "style.css": "text/css"}
MAX_LISTENERS = 64
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; style-src 'self'; script-src 'self'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


class SnapshotHub:
    """Computes snapshots while there are listeners and hands each to all of them."""

    def __init__(self, source: DashboardSource, interval: float = 1.0) -> None:
        self.source = source
        self.interval = interval
        self.latest: bytes | None = None
        self._listeners: set[asyncio.Queue[bytes | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    async def current(self) -> bytes:
        """The latest snapshot (computed now if nobody is listening)."""
        if self._task is None or self.latest is None:
            self.latest = msgspec.json.encode(await self.source.snapshot())
        return self.latest

    @contextlib.asynccontextmanager
    async def listen(self) -> AsyncIterator[asyncio.Queue[bytes | None]]:
        """A queue receiving each new snapshot while the block runs (``None``: the hub
        closed, stop)."""
        if self.closed:
            raise ShoalError("dashboard: shutting down")
        if len(self._listeners) >= MAX_LISTENERS:
            raise ShoalError(f"dashboard: at most {MAX_LISTENERS} live listeners")
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=2)
        self._listeners.add(queue)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            if self.latest is not None:
                queue.put_nowait(self.latest)
            yield queue
        finally:
            self._listeners.discard(queue)
            if not self._listeners and self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                self._task = None

    async def close(self) -> None:
        """End every live stream (a server shutting down must not wait for browsers), and
        close the source's connections."""
        self.closed = True
        for queue in list(self._listeners):
            while queue.full():
                queue.get_nowait()
            queue.put_nowait(None)
        closing = getattr(self.source, "aclose", None)
        if closing is not None:
            await closing()

    async def _run(self) -> None:
        while True:
            try:
                self.latest = msgspec.json.encode(await self.source.snapshot())
            except Exception as exc:  # shown on the page; the next tick may work
                self.latest = msgspec.json.encode({"errors": [f"snapshot: {exc!r}"[:300]]})
            for queue in list(self._listeners):
                if self.closed:
                    return
                if queue.full():  # a slow reader skips a frame rather than growing memory
                    with contextlib.suppress(asyncio.QueueEmpty):
                        queue.get_nowait()
                queue.put_nowait(self.latest)
            await asyncio.sleep(self.interval)


def mount_dashboard(app: Any, source: DashboardSource, *, interval: float = 1.0
                    ) -> SnapshotHub:
    """Add the dashboard's routes to the Starlette ``app``; returns its hub."""
    hub = SnapshotHub(source, interval)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers=SECURITY_HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in FILES:  # a fixed list: no path from the request reaches the disk
            return JSONResponse({"error": f"no dashboard file {name[:64]!r}"}, 404)
        return FileResponse(STATIC / name, media_type=FILES[name], headers=SECURITY_HEADERS)

    async def snapshot(request: Request) -> Response:
        return Response(await hub.current(), media_type="application/json",
                        headers={"cache-control": "no-store"})

    async def stream(request: Request) -> Response:
        try:
            listening = hub.listen()
            queue = await listening.__aenter__()
        except ShoalError as exc:
            return JSONResponse({"error": str(exc)}, 503)

        async def frames() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 2000\n\n"
                while True:
                    try:
                        data = await asyncio.wait_for(queue.get(), 15)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    if data is None:
                        return
                    yield b"event: snapshot\ndata: " + data + b"\n\n"
            finally:
                await listening.__aexit__(None, None, None)

        return StreamingResponse(frames(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store",
                                          "x-accel-buffering": "no"})

    async def replay(request: Request) -> Response:
        topic = request.path_params["topic"]
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            # a cross-site form cannot send JSON without the browser asking us first (CORS)
            return JSONResponse({"error": "replay: send content-type: application/json"}, 415)
        try:
            return JSONResponse(await source.replay(topic))
        except TopicError as exc:
            status = 404 if "does not exist" in str(exc) else 400
            return JSONResponse({"error": str(exc)}, status)
        except ShoalError as exc:
            return JSONResponse({"error": str(exc)}, 400)

    async def home(request: Request) -> Response:
        return RedirectResponse("/dashboard")

    app.router.routes.extend([
        Route("/dashboard", page),
        Route("/dashboard/{name}", asset),
        Route("/api/stream", stream),
        Route("/api/snapshot", snapshot),
        Route("/api/topics/{topic}/replay", replay, methods=["POST"]),
    ])
    if not any(getattr(r, "path", None) == "/" for r in app.router.routes):
        app.router.routes.append(Route("/", home))
    return hub
