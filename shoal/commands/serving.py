"""Running a long-lived server command (``shoal gateway``, ``shoal sidecar``): uvloop, logs on
stderr, one JSON ready line on stdout, SIGTERM/SIGINT for a graceful stop, exit 2 with one
line naming what is wrong for any error a user can fix."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import typer
import uvloop

from shoal.errors import ShoalError

EXIT_ERROR = 2


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print one line to stderr (``shoal: error: ...``) and exit."""
    sys.stderr.write("shoal: error: " + " ".join(str(message).split()) + "\n")
    sys.stderr.flush()
    raise typer.Exit(code)


def report_ready(**fields: Any) -> None:
    """The ready line: ``{"event": "ready", ...}`` on stdout, flushed."""
    sys.stdout.write(json.dumps({"event": "ready", **fields}) + "\n")
    sys.stdout.flush()


def configure_logs(name: str, level: int = logging.INFO) -> None:
    """Log records as ``shoal NAME: LEVEL message`` lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"shoal {name}: %(levelname)s %(message)s"))
    root = logging.getLogger("shoal")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` on uvloop; SIGTERM or SIGINT sets ``stop`` (a second one ends at
    once). A ``ShoalError`` exits 2 with its message."""

    async def guarded() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.current_task()
        assert task is not None

        def on_signal() -> None:
            if stop.is_set():
                task.cancel()  # asked twice: do not wait for the drain
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            await main(stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        uvloop.run(guarded())
    except ShoalError as exc:
        fail(str(exc))
    except asyncio.CancelledError:
        raise typer.Exit(130) from None
