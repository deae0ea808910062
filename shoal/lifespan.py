"""Run a mounted ASGI app's lifespan (startup/shutdown), as an ASGI server would.

FastAPI and Starlette apps open their resources in lifespan handlers; mounted inside a
``Service`` they would never see those events, since only the outermost app gets them
from the server. ``Service.start`` runs them for each mounted app, and ``stop`` shuts
them down. An app that does not speak lifespan (it raises, or returns, before answering
the startup event) is skipped, as uvicorn's ``lifespan="auto"`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from shoal.errors import ShoalError

log = logging.getLogger("shoal.lifespan")


class LifespanFailed(ShoalError):
    """A mounted app's lifespan startup or shutdown failed; the message says which and why."""


class Lifespan:
    """The lifespan protocol against one ASGI app: ``await startup()``, ``await shutdown()``."""

    def __init__(self, app: Any, name: str) -> None:
        self.app = app
        self.name = name
        self.state: dict[str, Any] = {}
        self.supported = False
        self._to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self.state}
        await self.app(scope, self._to_app.get, self._from_app.put)

    async def _answer(self) -> dict[str, Any] | None:
        """The app's next message, or None if it ended without one (no lifespan support)."""
        assert self._task is not None
        getting = asyncio.ensure_future(self._from_app.get())
        await asyncio.wait({getting, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if getting.done():
            return getting.result()
        getting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await getting
        return None

    async def startup(self) -> None:
        """Send ``lifespan.startup``; ``LifespanFailed`` if the app says it failed."""
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"shoal-lifespan {self.name}")
        await self._to_app.put({"type": "lifespan.startup"})
        message = await self._answer()
        if message is None:  # the app ended: it does not do lifespan
            with contextlib.suppress(Exception):
                self._task.result()
            self._task = None
            return
        if message["type"] == "lifespan.startup.failed":
            await self._forget()
            raise LifespanFailed(f"{self.name}: lifespan startup failed: "
                                 f"{_last_line(message)}".rstrip(": "))
        self.supported = True

    async def shutdown(self) -> None:
        """Send ``lifespan.shutdown`` and wait for the app's answer."""
        if not self.supported or self._task is None:
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        message = await self._answer()
        await self._forget()
        if message is not None and message["type"] == "lifespan.shutdown.failed":
            raise LifespanFailed(f"{self.name}: lifespan shutdown failed: "
                                 f"{_last_line(message)}".rstrip(": "))

    async def _forget(self) -> None:
        task, self._task = self._task, None
        self.supported = False
        if task is not None and not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5)
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved: the message already said why


def _last_line(message: dict[str, Any]) -> str:
    """The gist of a failure message (servers send a whole traceback: its last line)."""
    text = str(message.get("message", ""))
    if "\n" in text.strip():
        log.error("lifespan failure:\n%s", text)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
