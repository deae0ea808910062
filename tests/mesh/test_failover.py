"""Failover under load: an instance killed with SIGKILL costs no request.

Three instance processes (aiohttp servers) register themselves in a shared SQLite store
with a 1 s lease. The test process drives a ``MeshClient`` with its default traffic policy
(least request, 2 retries on connect-failure/reset/gateway-error, outlier detection after
5 consecutive failures) at a steady open-loop rate, and SIGKILLs one instance mid-run.

How "the dead instance stops receiving traffic" is measured: the balancer's ``on_start``
is called by ``Upstream`` exactly once per try, just before the try is handed to the
endpoint's connection pool, whether or not it then connects. The test wraps that method
on the upstream's balancer (an instance attribute; nothing in ``shoal`` changes) and logs
``(monotonic time, endpoint address)`` per try. The last logged try to the killed
address, minus the time of the kill, is the figure: it counts the tries that failed to
connect (which leave no trace at any server) as well as the ones in flight at the kill.
Which instance *answered* each request is read from its ``x-instance`` response header.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from shoal.mesh.client import MeshClient
from shoal.mesh.endpoint import Endpoint

INSTANCE = """
import asyncio, sys
from aiohttp import web
from shoal.mesh.registry import Instance, Registry
from shoal.store import connect_store

async def main() -> None:
    url, name = sys.argv[1], sys.argv[2]

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"x-instance": name})

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    store = await connect_store(url)
    await Registry(store).register(
        Instance(id=name, service="echo", address=f"127.0.0.1:{port}"), ttl="1s")
    print("ready", port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

RATE = 250  # requests/s, started on a fixed schedule
SECONDS = 4.0
KILL_AT = 1.5  # seconds into the run


async def start_instance(url: str, name: str, procs: list[asyncio.subprocess.Process]
                         ) -> tuple[asyncio.subprocess.Process, str]:
    """Start one instance (added to ``procs`` at once, for the caller to reap whatever
    happens) and wait for its "ready" line; a failure says why, with its stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", INSTANCE, url, name,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    procs.append(proc)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(30):  # three at once, beside other tests, on 2 cores
            line = (await proc.stdout.readline()).decode().split()
    except TimeoutError:
        line = ["(no ready line within 30 s)"]
    if line[:1] != ["ready"]:
        if proc.returncode is None:
            proc.kill()
        err = await proc.stderr.read()
        raise AssertionError(f"instance {name} did not start: {line} {err.decode()}")
    return proc, f"127.0.0.1:{line[1]}"


@pytest.mark.slow
async def test_sigkill_of_an_instance_under_load_loses_no_request(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    procs: list[asyncio.subprocess.Process] = []
    try:
        async with asyncio.TaskGroup() as group:  # a failure stops the other starts too
            starting = [group.create_task(start_instance(url, f"echo-{i}", procs))
                        for i in range(3)]
        victim, dead = starting[0].result()
        async with await MeshClient.connect(url) as mesh:
            await mesh.cache.wait_for("echo", lambda eps: len(eps) == 3, timeout=5)
            upstream = mesh.upstream("echo")
            tries: list[tuple[float, str]] = []
            on_start = upstream.balancer.on_start

            def logged_start(endpoint: Endpoint) -> None:
                tries.append((time.monotonic(), endpoint.address))
                on_start(endpoint)

            upstream.balancer.on_start = logged_start  # type: ignore[method-assign]

            answered: Counter[str] = Counter()
            answered_after_kill: Counter[str] = Counter()
            failures: list[BaseException] = []
            killed: float | None = None

            async def one() -> None:
                try:
                    response = await mesh.get("http://echo/")
                    body = await response.aread()
                except Exception as exc:  # any failure fails the test below
                    failures.append(exc)
                    return
                instance = (response.header("x-instance") or b"?").decode()
                if response.status != 200 or body != b"ok":
                    failures.append(AssertionError(f"{response.status} {body!r}"))
                answered[instance] += 1
                if killed is not None:
                    answered_after_kill[instance] += 1

            async def left_registry() -> float:
                await mesh.cache.wait_for("echo", lambda eps: dead not in
                                          [e.address for e in eps], timeout=SECONDS + 5)
                return time.monotonic()

            loop = asyncio.get_running_loop()
            tasks: set[asyncio.Task[None]] = set()
            total = int(RATE * SECONDS)
            t0 = time.monotonic()
            gone: asyncio.Task[float] | None = None
            for i in range(total):
                scheduled = t0 + i / RATE
                await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
                if killed is None and scheduled >= t0 + KILL_AT:
                    victim.send_signal(signal.SIGKILL)
                    killed = time.monotonic()
                    gone = loop.create_task(left_registry())
                task = loop.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
            assert killed is not None and gone is not None
            removed = await gone
            stats = upstream.stats

    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    to_dead = [t for t, address in tries if address == dead]
    after_kill = [t for t in to_dead if t >= killed]
    last = max(to_dead) - killed
    print(f"\nfailover: {total} GETs at {RATE}/s, echo-0 SIGKILLed at {KILL_AT}s: "
          f"{len(failures)} failed; {len(after_kill)} tries sent to it after the kill, the "
          f"last {last * 1000:.1f} ms after; left the registry {removed - killed:.3f} s "
          f"after; retries {stats.retries}, ejections {stats.ejections}; answered by "
          f"{dict(sorted(answered.items()))}")
    assert not failures, f"{len(failures)} requests failed, e.g. {failures[:3]!r}"
    assert sum(answered.values()) == total
    assert answered["echo-0"] > 0  # it did serve before the kill
    assert answered_after_kill["echo-1"] > 0 and answered_after_kill["echo-2"] > 0
    assert last < 1.0, f"the killed instance still got a try {last:.3f} s after the kill"
    assert removed - killed < 2.5  # the 1 s lease ran out and every watcher saw it
