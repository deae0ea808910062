"""A gateway-like app run by ``shoal.gateway.workers.run_workers`` in a real process group,
for tests/gateway/test_workers.py: ``python -m tests.gateway.workers_child WORKERS [MODE]``.

Every answer names the worker's pid; ``/slow`` answers after 0.5 s (a request in flight at
SIGTERM). It prints ``READY <port> <pid,pid,...>`` once every worker listens, and
``EXIT <status>`` when ``run_workers`` returns. MODE ``fail`` makes worker startup fail;
``crash`` makes ``/crash`` kill the worker that serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from shoal.gateway.server import Response
from shoal.gateway.workers import run_workers


def main() -> None:
    workers = int(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else ""

    @contextlib.asynccontextmanager
    async def app() -> AsyncIterator[Any]:
        if mode == "fail":
            raise RuntimeError("this worker cannot start: no config")

        async def handle(request: Any) -> Response:
            if request.path == "/slow":
                await asyncio.sleep(0.5)
            elif request.path == "/crash":
                os._exit(3)
            return Response(str(os.getpid()).encode())

        yield handle

    def ready(port: int, pids: list[int]) -> None:
        print(f"READY {port} {','.join(map(str, pids))}", flush=True)

    try:
        status = run_workers(app, "127.0.0.1", 0, workers=workers, grace=5.0, on_ready=ready)
    except Exception as exc:
        print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
        status = 2
    print(f"EXIT {status}", flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
