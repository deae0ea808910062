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
