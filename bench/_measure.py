"""Closed-loop request measurement shared by the HTTP benchmarks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

Get = Callable[[], Awaitable[bytes]]


async def closed_loop(get: Get, n: int, concurrency: int, expect: bytes) -> dict[str, float]:
    """``n`` requests by ``concurrency`` closed-loop workers: req/s, latency, client CPU."""
    latencies: list[float] = []
    per_worker = n // concurrency
    clock = time.perf_counter

    async def worker() -> None:
        append = latencies.append
        for _ in range(per_worker):
            t = clock()
            body = await get()
            append(clock() - t)
            if body != expect:
                raise AssertionError(f"unexpected body {body[:80]!r}")

    cpu, t0 = time.process_time(), clock()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed, cpu = clock() - t0, time.process_time() - cpu
    latencies.sort()
    done = len(latencies)
    return {
        "rps": round(done / elapsed),
        "p50_us": round(latencies[done // 2] * 1e6, 1),
        "p99_us": round(latencies[int(done * 0.99)] * 1e6, 1),
        "cpu_us": round(cpu / done * 1e6, 1),
    }


async def _self_check(n: int = 200_000, concurrency: int = 32) -> dict[str, object]:
    """What the harness itself adds per request: ``closed_loop`` over a ``get`` that answers
    at once, against the same workers awaiting the same ``get`` untimed (the peer)."""

    async def get() -> bytes:
        return b"ok"

    async def bare() -> None:
        for _ in range(n // concurrency):
            await get()

    timed: list[float] = []
    plain: list[float] = []
    for _ in range(3):  # interleaved rounds, medians
        timed.append(1e6 / (await closed_loop(get, n, concurrency, b"ok"))["rps"])
        t0 = time.perf_counter()
        await asyncio.gather(*(bare() for _ in range(concurrency)))
        plain.append((time.perf_counter() - t0) / n * 1e6)
    harness, peer = sorted(timed)[1], sorted(plain)[1]
    return {"bench": "_measure", "requests": n, "concurrency": concurrency,
            "harness_us_per_req": round(harness, 3), "bare_await_us_per_req": round(peer, 3),
            "harness_over_bare": round(harness / peer, 2),
            "added_us_per_req": round(harness - peer, 3)}


if __name__ == "__main__":  # the harness measured against bare awaits
    import json

    print(json.dumps(asyncio.run(_self_check())))
