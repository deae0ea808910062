"""Benchmark the mesh HTTP/1.1 client (shoal.mesh.http1) against aiohttp's ClientSession.

    python bench/http_client.py [--requests 10000] [--concurrency 32] [--rounds 3]

Both clients run in this process on uvloop, one after the other, against the same aiohttp
server running (on uvloop) in a subprocess. Figures, per client:
* sequential: GETs of a 13-byte body one after another on a keep-alive connection
  (requests/s and p50/p99 latency);
* concurrent: the same with ``--concurrency`` requests in flight (one pool / session);
* client CPU: this process's CPU time per request (the server's cost is not in it), the
  client overhead that the throughput figures hide once the server is the bottleneck;
* download: one 64 MiB response streamed in chunks (MiB/s).
Each figure is the median over ``--rounds`` interleaved rounds. The last line is one JSON
object with every figure and the ratios shoal / aiohttp (> 1 is better for throughput,
< 1 is better for latency and CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import Get, closed_loop
from _servers import _wait_port, free_port

from shoal.mesh.http1 import ConnectionPool

BLOCK = b"x" * (256 * 1024)
DOWNLOAD_MIB = 64


# -- the server (subprocess) ----------------------------------------------------------------
def serve(port: int) -> None:
    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=b"Hello, World!", content_type="text/plain")

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = DOWNLOAD_MIB * 1024 * 1024
        await resp.prepare(request)
        for _ in range(DOWNLOAD_MIB * 4):
            await resp.write(BLOCK)
        return resp

    app = web.Application()
    app.add_routes([web.get("/", hello), web.get("/big", big)])
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


# -- measurement ------------------------------------------------------------------------------
async def measure(get: Get, n: int, concurrency: int) -> dict[str, float]:
    """``n`` GETs by ``concurrency`` closed-loop workers (see ``_measure.closed_loop``)."""
    return await closed_loop(get, n, concurrency, b"Hello, World!")


async def download(stream: Callable[[], Awaitable[int]]) -> float:
    t = time.perf_counter()
    size = await stream()
    assert size == DOWNLOAD_MIB * 1024 * 1024
    return round(size / (1024 * 1024) / (time.perf_counter() - t), 1)


class ShoalClient:
    name = "shoal"

    def __init__(self, port: int, limit: int) -> None:
        self.pool = ConnectionPool(f"127.0.0.1:{port}", max_connections=limit, max_idle=limit)
        self.headers = [("Host", f"127.0.0.1:{port}")]

    async def get(self) -> bytes:
        r = await self.pool.request("GET", "/", self.headers)
        return await r.aread()

    async def stream(self) -> int:
        size = 0
        async with await self.pool.request("GET", "/big", self.headers) as r:
            async for chunk in r.aiter_bytes():
                size += len(chunk)
        return size

    async def aclose(self) -> None:
        await self.pool.aclose()


class AiohttpClient:
    name = "aiohttp"

    def __init__(self, port: int, limit: int) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit))
        self.url = f"http://127.0.0.1:{port}/"

    async def get(self) -> bytes:
        async with self.session.get(self.url) as r:
            return await r.read()

    async def stream(self) -> int:
        size = 0
        async with self.session.get(self.url + "big") as r:
            async for chunk in r.content.iter_any():
                size += len(chunk)
        return size

    async def aclose(self) -> None:
        await self.session.close()


async def bench(port: int, n: int, concurrency: int, rounds: int) -> dict[str, Any]:
    clients = [ShoalClient(port, concurrency), AiohttpClient(port, concurrency)]
    runs: dict[str, dict[str, list[Any]]] = {c.name: {} for c in clients}
    for client in clients:  # warm up: connections, code paths
        await measure(client.get, 2000, concurrency)
    for _ in range(rounds):
        for client in clients:
            for phase, conc, count in (("sequential", 1, n // 2), ("concurrent", concurrency, n)):
                runs[client.name].setdefault(phase, []).append(await measure(client.get, count,
                                                                             conc))
            runs[client.name].setdefault("download", []).append(await download(client.stream))
    for client in clients:
        await client.aclose()

    def median_run(samples: list[dict[str, float]]) -> dict[str, float]:
        return {k: statistics.median(s[k] for s in samples) for k in samples[0]}

    return {
        name: {"sequential": median_run(r["sequential"]),
               "concurrent": median_run(r["concurrent"]),
               "download_mib_s": statistics.median(r["download"])}
        for name, r in runs.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=env)
    try:
        _wait_port(port, server)
        res = uvloop.run(bench(port, args.requests, args.concurrency, args.rounds))
    finally:
        server.terminate()
        server.wait()

    ours, peer = res["shoal"], res["aiohttp"]
    rows = [
        ("sequential req/s", "sequential", "rps"),
        ("sequential p50 µs", "sequential", "p50_us"),
        ("sequential p99 µs", "sequential", "p99_us"),
        ("sequential client CPU us/req", "sequential", "cpu_us"),
        (f"concurrent({args.concurrency}) req/s", "concurrent", "rps"),
        (f"concurrent({args.concurrency}) p50 µs", "concurrent", "p50_us"),
        (f"concurrent({args.concurrency}) p99 µs", "concurrent", "p99_us"),
        (f"concurrent({args.concurrency}) client CPU us/req", "concurrent", "cpu_us"),
    ]
    print(f"\nHTTP/1.1 GET, 13-byte body, aiohttp {aiohttp.__version__} server in a subprocess, "
          f"uvloop, {os.cpu_count()} CPUs, median of {args.rounds} rounds")
    print(f"{'':36} {'shoal':>12} {'aiohttp':>12} {'shoal/aiohttp':>14}")
    ratios: dict[str, float] = {}
    for label, phase, key in rows:
        a, b = ours[phase][key], peer[phase][key]
        ratios[f"{phase}_{key}"] = round(a / b, 3)
        print(f"{label:36} {a:>12} {b:>12} {a / b:>14.2f}")
    a, b = ours["download_mib_s"], peer["download_mib_s"]
    ratios["download_mib_s"] = round(a / b, 3)
    print(f"{f'download {DOWNLOAD_MIB} MiB, MiB/s':36} {a:>12} {b:>12} {a / b:>14.2f}")
    print(json.dumps({"bench": "http_client", "requests": args.requests,
                      "concurrency": args.concurrency, "rounds": args.rounds,
                      "shoal": ours, "aiohttp": peer, "ratio_shoal_over_aiohttp": ratios}))


if __name__ == "__main__":
    main()
