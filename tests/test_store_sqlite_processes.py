"""The SQLite store shared by real processes: watch latency, kill -9 and leases, idle cost."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shoal.store import Change
from shoal.store.sqlite import SqliteStore

pytestmark = pytest.mark.slow

PRELUDE = """
import asyncio, json, sys, time
from shoal.store.sqlite import SqliteStore
url = sys.argv[1]
"""

WRITER = PRELUDE + """
async def main():
    store = await SqliteStore.open(url)
    for i in range(int(sys.argv[2])):
        await store.put(f"lat/{i}", repr(time.time()).encode())
        await asyncio.sleep(0.01)
    await store.close()
asyncio.run(main())
"""

LEASE_HOLDER = PRELUDE + """
async def main():
    store = await SqliteStore.open(url)
    ttl = float(sys.argv[2])
    lease = await store.lease(ttl)
    await store.put("held/k", b"mine", lease=lease)
    while True:
        await asyncio.sleep(ttl / 4)
        await lease.keepalive()
asyncio.run(main())
"""

IDLE_WATCHER = PRELUDE + """
async def main():
    store = await SqliteStore.open(url)
    lease = await store.lease(60)  # arms the sweep timer, far in the future
    await store.put("idle/held", b"v", lease=lease)
    changes = store.watch("idle/")
    pending = asyncio.ensure_future(anext(changes))
    await asyncio.sleep(1.0)  # let the settle re-reads after our own writes pass
    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.sleep(2.0)
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    print(json.dumps({"cpu": cpu / wall, "pending": not pending.done(),
                      "native": store._signal.native}), flush=True)
    change = await asyncio.wait_for(pending, 5)
    print(json.dumps({"saw": change.key}), flush=True)
    await store.close()
asyncio.run(main())
"""

CAS_CONTENDER = PRELUDE + """
async def main():
    store = await SqliteStore.open(url)
    me = sys.argv[2].encode()
    wins = [i for i in range(50) if await store.cas(f"race/{i}", me, expected_revision=0)]
    print(json.dumps(wins), flush=True)
    await store.close()
asyncio.run(main())
"""


async def spawn(code: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process, timeout: float = 20) -> str:
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def next_change(changes: AsyncIterator[Change], timeout: float) -> Change:
    async with asyncio.timeout(timeout):
        return await anext(changes)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(f"sqlite:///{tmp_path}/shared.db")
    yield s
    await s.close()


async def test_watch_sees_another_process_writes_within_100ms(store: SqliteStore) -> None:
    n = 50
    changes = store.watch("lat/")
    writer = await spawn(WRITER, store.url, str(n))
    latencies = []
    for i in range(n):
        change = await next_change(changes, 10)
        latencies.append(time.time() - float(change.value or b"nan"))
        assert change.key == f"lat/{i}"
    await finish(writer)
    latencies.sort()
    p50, p99 = latencies[n // 2], latencies[math.ceil(0.99 * n) - 1]
    print(f"cross-process watch latency: p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")
    assert p99 < 0.100


async def test_killed_lease_holder_loses_its_keys(store: SqliteStore) -> None:
    ttl = 1.0
    changes = store.watch("held/")
    holder = await spawn(LEASE_HOLDER, store.url, str(ttl))
    try:
        put = await next_change(changes, 10)
        assert (put.kind, put.key, put.value) == ("put", "held/k", b"mine")
        with pytest.raises(TimeoutError):  # kept alive from the other process beyond its ttl
            await next_change(changes, 1.5 * ttl)
        holder.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        gone = await next_change(changes, ttl + 1)
        took = time.monotonic() - killed
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()
    print(f"leased key deleted {took:.3f} s after SIGKILL (ttl {ttl} s)")
    assert (gone.kind, gone.key) == ("delete", "held/k")
    assert took < ttl + 1
    assert await store.get("held/k") is None


async def test_idle_watcher_uses_under_2_percent_cpu(store: SqliteStore) -> None:
    watcher = await spawn(IDLE_WATCHER, store.url)
    assert watcher.stdout is not None
    async with asyncio.timeout(15):
        line = await watcher.stdout.readline()
    assert line, (await watcher.stderr.read()).decode()  # type: ignore[union-attr]
    report = json.loads(line)
    print(f"idle watcher CPU: {report['cpu'] * 100:.3f} % of one core")
    assert report["native"], "inotify is unavailable: the watcher would poll"
    assert report["pending"], "the watcher returned without a change"
    assert report["cpu"] < 0.02
    await store.put("idle/go", b"!")  # and it is still watching
    assert json.loads(await finish(watcher)) == {"saw": "idle/go"}


async def test_cas_across_processes_has_one_winner_per_key(store: SqliteStore) -> None:
    contenders = [await spawn(CAS_CONTENDER, store.url, f"p{i}") for i in range(4)]
    wins = [json.loads(await finish(p)) for p in contenders]
    assert sorted(k for w in wins for k in w) == list(range(50))
    for i, won in enumerate(wins):
        for k in won:
            assert (await store.get(f"race/{k}")).value == f"p{i}".encode()  # type: ignore[union-attr]
    assert await store.revision() == 50
