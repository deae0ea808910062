"""Run an HTTP handler (the gateway) in N worker processes on one address, each with its
own uvloop loop and its own ``SO_REUSEPORT`` listening socket.

``run_workers(app, host, port, workers=N)`` blocks until SIGTERM or SIGINT, then stops
every worker gracefully and returns the exit status. ``app`` is a zero-argument callable
returning an async context manager that yields the handler, entered once in each worker
(so each has its own store connection, endpoint cache and upstream pools)::

    @contextlib.asynccontextmanager
    async def app():
        store = await connect_store(url)
        async with EndpointCache(store) as cache:
            gateway = Gateway(routes, cache)
            try:
                yield gateway.handle
            finally:
                await gateway.aclose()

    run_workers(app, "0.0.0.0", 8080, workers=4)

Decisions, written down once:

* **One socket per worker, not one shared socket.** With ``SO_REUSEPORT`` the kernel
  spreads new connections over the workers' listening sockets by a hash of the address
  pair, so no worker wakes up for a connection another takes (a shared accept queue wakes
  them all, and the busiest loop tends to win). A connection stays on the worker that
  accepted it. The parent binds (and never listens on) one more ``SO_REUSEPORT`` socket to
  resolve port 0 and to hold the port while workers restart.
* **Workers are forked** (``start_method="fork"``) before the parent runs any event loop,
  so ``app`` may be a closure over config the parent already loaded and checked (errors
  are reported once, before any worker starts); the caller must not have threads or a
  running loop. (``start_method="spawn"`` needs a picklable ``app``, a module-level
  function; only fork is tested.) ``workers=1`` runs in the calling process, with no
  supervisor.
* **Supervision.** Every worker reports ready once it listens; if one fails to start, all
  are stopped and ``run_workers`` raises ``WorkerError`` with the worker's error. A worker
  that dies later is restarted (at most ``MAX_RESTARTS`` within ``RESTART_WINDOW``
  seconds, then the whole group stops with status 1: a crash loop is not hidden).
* **Graceful stop.** SIGTERM or SIGINT to the parent is passed on as SIGTERM to each
  worker, which stops accepting, lets requests in flight finish within ``grace`` seconds
  (their responses say ``connection: close``) and exits; a worker still alive
  ``grace + KILL_MARGIN`` seconds later is killed. On Linux a worker whose supervisor
  dies (even by SIGKILL) gets SIGTERM and stops the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from multiprocessing.connection import wait as wait_for_sentinels
from typing import Any

from shoal.errors import ConfigError, ShoalError
from shoal.gateway.server import Handler, HttpServer, ServerLimits

__all__ = ["KILL_MARGIN", "MAX_RESTARTS", "MAX_WORKERS", "RESTART_WINDOW", "AppFactory",
           "WorkerError", "bind_reserved", "run_workers", "serve"]

log = logging.getLogger("shoal.gateway")

AppFactory = Callable[[], AbstractAsyncContextManager[Handler]]
"""Makes the handler's context: entered once per worker, exited when it stops."""

MAX_WORKERS = 256
"""Most worker processes ``run_workers`` accepts."""
MAX_RESTARTS = 5
"""Worker restarts allowed within ``RESTART_WINDOW`` seconds before the group gives up."""
RESTART_WINDOW = 60.0
KILL_MARGIN = 5.0
"""Seconds past the grace period after which a worker that has not exited is killed."""
READY_TIMEOUT = 60.0
"""Seconds a worker may take to enter ``app`` and listen."""
_PR_SET_PDEATHSIG = 1  # prctl(2)


class WorkerError(ShoalError):
    """A worker failed to start (the message carries its error), or kept crashing."""


def _check_workers(workers: object) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or not \
            1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"workers: must be an integer from 1 to {MAX_WORKERS}, "
                          f"got {workers!r}")
    return workers


def _check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port: must be an integer from 0 to 65535, got {port!r}")
    return port


def bind_reserved(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with ``SO_REUSEPORT``: it resolves
    port 0 and holds the port for the workers' own sockets; ``ConfigError`` if it cannot."""
    _check_port(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"listen address {host!r}: cannot resolve it: {exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"listen address {host}:{port}: {exc.strerror or exc}") from None
    return sock


# -- one worker --------------------------------------------------------------------------
async def serve(app: AppFactory, host: str, port: int, *, limits: ServerLimits | None = None,
                grace: float = 10.0, reuse_port: bool = False,
                ready: Callable[[int], None] | None = None,
                stop_signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Serve ``app`` on ``host:port`` in this process until one of ``stop_signals``, then
    shut down gracefully; ``ready(port)`` is called once the server listens."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in stop_signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with app() as handler:
            server = HttpServer(handler, limits=limits)
            await server.start(host, port, reuse_port=reuse_port)
            # What exists now (modules, routes, config) lives as long as the process: keep
            # it out of the collector's full passes, which otherwise rescan it.
            gc.freeze()
            try:
                if ready is not None:
                    ready(server.port)
                await stop.wait()
            finally:
                await server.shutdown(grace)
    finally:
        for signum in stop_signals:
            loop.remove_signal_handler(signum)


def _run_loop(main: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


def _stop_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker when its supervisor dies, even by SIGKILL, so no worker
    is left serving alone; exit now if it is already gone."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(0)


def _worker_main(app: AppFactory, host: str, port: int, limits: ServerLimits | None,
                 grace: float, index: int, report: Any, reserved_fd: int, parent: int) -> None:
    """A worker process: serve until SIGTERM, telling the parent when it listens."""
    with contextlib.suppress(OSError):
        os.close(reserved_fd)  # the parent's reservation, inherited through fork
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (fork)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    _stop_with_parent(parent)

    def ready(_: int) -> None:
        report.put(("ready", index, os.getpid(), ""))

    try:
        _run_loop(serve(app, host, port, limits=limits, grace=grace, reuse_port=True,
                        ready=ready, stop_signals=(signal.SIGTERM,)))
    except BaseException as exc:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        report.put(("failed", index, os.getpid(), detail))
        raise SystemExit(1) from None


# -- the group ---------------------------------------------------------------------------
class _Group:
    """The parent's view of its workers."""

    def __init__(self, ctx: Any, target: Callable[[int], tuple[Any, ...]]) -> None:
        self.ctx = ctx
        self.args_for = target
        self.procs: dict[int, Any] = {}  # index -> Process
        self.stopping = False

    def start(self, index: int) -> None:
        proc = self.ctx.Process(target=_worker_main, args=self.args_for(index),
                                name=f"shoal-gateway-worker-{index}", daemon=False)
        proc.start()
        self.procs[index] = proc

    def terminate(self, grace: float) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace + KILL_MARGIN
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.is_alive():
                log.warning("gateway: worker %d did not stop within %gs: killing it", proc.pid,
                            grace + KILL_MARGIN)
                proc.kill()
                proc.join(5)


def run_workers(app: AppFactory, host: str, port: int, *, workers: int = 1,
                limits: ServerLimits | None = None, grace: float = 10.0,
                start_method: str = "fork",
                on_ready: Callable[[int, list[int]], None] | None = None) -> int:
    """Serve ``app`` on ``host:port`` with ``workers`` processes until SIGTERM or SIGINT;
    returns the exit status (0 after a graceful stop). ``on_ready(port, pids)`` is called
    once every worker listens. Must not be called from a running event loop."""
    workers = _check_workers(workers)
    _check_port(port)
    if workers == 1:
        pid = os.getpid()
        _run_loop(serve(app, host, port, limits=limits, grace=grace,
                        ready=None if on_ready is None else lambda p: on_ready(p, [pid])))
        return 0
    reserved = bind_reserved(host, port)
    port = reserved.getsockname()[1]
    ctx = multiprocessing.get_context(start_method)
    report = ctx.SimpleQueue()
    parent = os.getpid()
    group = _Group(ctx, lambda i: (app, host, port, limits, grace, i, report, reserved.fileno(),
                                   parent))
    stop_signal: list[int] = []

    def on_signal(signum: int, _: Any) -> None:
        stop_signal.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(workers):
            group.start(index)
        _await_ready(group, report, workers, stop_signal)
        if stop_signal:
            return 0
        if on_ready is not None:
            on_ready(port, [p.pid for p in group.procs.values()])
        return _supervise(group, report, stop_signal)
    finally:
        group.terminate(grace)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        reserved.close()
        report.close()


def _await_ready(group: _Group, report: Any, workers: int, stop_signal: list[int]) -> None:
    ready: set[int] = set()
    deadline = time.monotonic() + READY_TIMEOUT
    while len(ready) < workers and not stop_signal:
        while not report.empty():
            kind, index, pid, detail = report.get()
            if kind == "failed":
                raise WorkerError(f"gateway worker {index} (pid {pid}) failed to start: "
                                  f"{detail}")
            ready.add(index)
        for index, proc in group.procs.items():
            if index not in ready and proc.exitcode is not None and report.empty():
                raise WorkerError(f"gateway worker {index} (pid {proc.pid}) exited with "
                                  f"status {proc.exitcode} before it listened")
        if time.monotonic() > deadline:
            raise WorkerError(f"gateway workers not listening after {READY_TIMEOUT:g}s "
                              f"({len(ready)} of {workers} ready)")
        wait_for_sentinels([p.sentinel for p in group.procs.values()], timeout=0.05)


def _supervise(group: _Group, report: Any, stop_signal: list[int]) -> int:
    """Restart workers that die until a stop signal; 1 if they keep dying."""
    restarts: list[float] = []
    while not stop_signal:
        sentinels = [p.sentinel for p in group.procs.values()]
        wait_for_sentinels(sentinels, timeout=0.25)
        while not report.empty():
            kind, index, pid, detail = report.get()
            if kind == "failed":
                log.error("gateway: worker %d (pid %d) failed: %s", index, pid, detail)
        for index, proc in list(group.procs.items()):
            if proc.exitcode is None or stop_signal:
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
            if len(restarts) > MAX_RESTARTS:
                log.error("gateway: workers died %d times within %gs: stopping", len(restarts),
                          RESTART_WINDOW)
                return 1
            log.warning("gateway: worker %d (pid %d) exited with status %s: restarting it",
                        index, proc.pid, proc.exitcode)
            proc.join()
            group.start(index)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("shoal.gateway.workers is a library: use `shoal gateway --workers N`")
