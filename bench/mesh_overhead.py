"""What the proxyless mesh costs: ``MeshClient`` against plain aiohttp on the same backend.

    python bench/mesh_overhead.py [--requests 20000] [--concurrency 32] [--rounds 3]
                                  [--profile]

One backend (the raw asyncio responder of ``bench/balancers.py``, answering at once) runs
on uvloop in a subprocess; this process, also on uvloop, calls it with three clients in
turn, interleaved over ``--rounds`` rounds:

* ``mesh``: ``MeshClient.get("http://echo/")`` with the default traffic policy (service
  resolved through a ``memory://`` registry, least request balancing, 15 s timeout,
  retry budget, circuit breaker, outlier detection, keep-alive pool) - the whole stack;
* ``aiohttp``: ``aiohttp.ClientSession`` with a keep-alive ``TCPConnector`` to the
  backend's address - the peer;
* ``pool``: ``shoal.mesh.http1.ConnectionPool`` alone - the mesh minus its layers, so the
  cost of the layers themselves shows too.

Figures per client: sequential GETs one after another (p50/p99 latency, req/s),
``--concurrency`` closed-loop workers (req/s), and this process's CPU time per request.
Each is the median over the rounds. Headline: throughput ratio mesh/aiohttp (expected
>= 0.9) and the p50 the mesh adds over aiohttp, in microseconds (expected < 50). The last
line is one JSON object with every figure. ``--profile`` adds a cProfile of the mesh's
concurrent phase (top functions by own time) to stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import Get, closed_loop
from balancers import BackendProcess

from shoal.mesh.client import MeshClient
from shoal.mesh.http1 import ConnectionPool
from shoal.mesh.registry import Instance, Registry
from shoal.store import connect_store


async def measure(get: Get, n: int, concurrency: int) -> dict[str, float]:
    """``n`` GETs by ``concurrency`` closed-loop workers (see ``_measure.closed_loop``)."""
    return await closed_loop(get, n, concurrency, b"ok")


class Mesh:
    """The whole stack: registry lookup, balancer, resilience layers, pool."""

    name = "mesh"

    def __init__(self, mesh: MeshClient, registry: Registry) -> None:
        self.mesh = mesh
        self.registry = registry

    @classmethod
    async def start(cls, address: str) -> Mesh:
        store = await connect_store(f"memory://bench-mesh-overhead-{os.getpid()}")
        registry = Registry(store)
        await registry.register(Instance(id="echo-1", service="echo", address=address))
        mesh = await MeshClient.connect(store)
        await mesh.cache.wait_for("echo", timeout=5)
        return cls(mesh, registry)

    async def get(self) -> bytes:
        response = await self.mesh.get("http://echo/")
        return await response.aread()

    async def aclose(self) -> None:
        await self.mesh.aclose()
        await self.registry.close()
        await self.registry.store.close()


class Aiohttp:
    """The peer: one keep-alive ClientSession."""

    name = "aiohttp"

    def __init__(self, address: str, limit: int) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit))
        self.url = f"http://{address}/"

    async def get(self) -> bytes:
        async with self.session.get(self.url) as response:
            return await response.read()

    async def aclose(self) -> None:
        await self.session.close()


class Pool:
    """The mesh's HTTP/1.1 pool alone, without the layers."""

    name = "pool"

    def __init__(self, address: str, limit: int) -> None:
        self.pool = ConnectionPool(address, max_connections=limit, max_idle=limit)
        self.headers = [("host", "echo")]

    async def get(self) -> bytes:
        response = await self.pool.request("GET", "/", self.headers)
        return await response.aread()

    async def aclose(self) -> None:
        await self.pool.aclose()


def profile_report(profiler: cProfile.Profile, limit: int = 25) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(limit)
    return out.getvalue()


async def bench(address: str, args: argparse.Namespace) -> dict[str, Any]:
    clients = [await Mesh.start(address), Aiohttp(address, args.concurrency),
               Pool(address, args.concurrency)]
    runs: dict[str, dict[str, list[dict[str, float]]]] = {c.name: {} for c in clients}
    try:
        for client in clients:  # warm up: connections, code paths
            await measure(client.get, 2000, args.concurrency)
        for _ in range(args.rounds):
            for client in clients:
                for phase, conc, count in (("sequential", 1, args.requests // 2),
                                           ("concurrent", args.concurrency, args.requests)):
                    runs[client.name].setdefault(phase, []).append(
                        await measure(client.get, count, conc))
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            await measure(clients[0].get, args.requests, args.concurrency)
            profiler.disable()
            print(profile_report(profiler), file=sys.stderr)
    finally:
        for client in clients:
            await client.aclose()

    def median_run(samples: list[dict[str, float]]) -> dict[str, float]:
        return {k: statistics.median(s[k] for s in samples) for k in samples[0]}

    return {name: {phase: median_run(samples) for phase, samples in phases.items()}
            for name, phases in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    async def run() -> dict[str, Any]:
        backend = await BackendProcess.start(1, 0.0, 0.0)
        try:
            return await bench(f"127.0.0.1:{backend.ports[0]}", args)
        finally:
            await backend.stop()

    res = uvloop.run(run())
    mesh, peer, pool = res["mesh"], res["aiohttp"], res["pool"]
    headline = {
        "throughput_ratio_mesh_over_aiohttp": round(
            mesh["concurrent"]["rps"] / peer["concurrent"]["rps"], 3),
        "added_p50_us_over_aiohttp": round(
            mesh["sequential"]["p50_us"] - peer["sequential"]["p50_us"], 1),
        "throughput_ratio_mesh_over_pool": round(
            mesh["concurrent"]["rps"] / pool["concurrent"]["rps"], 3),
        "layers_p50_us_over_pool": round(
            mesh["sequential"]["p50_us"] - pool["sequential"]["p50_us"], 1),
        "layers_cpu_us_per_request": round(
            mesh["concurrent"]["cpu_us"] - pool["concurrent"]["cpu_us"], 1),
    }
    print(f"\nGET, 2-byte body, raw asyncio backend in a subprocess, uvloop, {os.cpu_count()} "
          f"CPUs, aiohttp {aiohttp.__version__}, median of {args.rounds} rounds")
    print(f"{'':34} {'mesh':>10} {'aiohttp':>10} {'pool':>10}")
    rows = [("sequential p50 us", "sequential", "p50_us"),
            ("sequential p99 us", "sequential", "p99_us"),
            ("sequential req/s", "sequential", "rps"),
            ("sequential client CPU us/req", "sequential", "cpu_us"),
            (f"concurrent({args.concurrency}) req/s", "concurrent", "rps"),
            (f"concurrent({args.concurrency}) p50 us", "concurrent", "p50_us"),
            (f"concurrent({args.concurrency}) client CPU us/req", "concurrent", "cpu_us")]
    for label, phase, key in rows:
        print(f"{label:34} {mesh[phase][key]:>10} {peer[phase][key]:>10} {pool[phase][key]:>10}")
    for key, value in headline.items():
        print(f"{key:34} {value:>10}")
    print(json.dumps({"bench": "mesh_overhead", "requests": args.requests,
                      "concurrency": args.concurrency, "rounds": args.rounds,
                      "cpus": os.cpu_count(), **headline, "mesh": mesh, "aiohttp": peer,
                      "pool": pool}))


if __name__ == "__main__":
    main()
