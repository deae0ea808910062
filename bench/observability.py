"""What metrics and tracing cost: gateway, mesh client and bus with them off and on, in one run.

    python bench/observability.py [--duration 3] [--connections 32] [--events 50000]
                                  [--requests 20000] [--rounds 3] [--only gateway|mesh|bus]

Modes, each measured in every round (interleaved, medians kept, because this 2-core
machine is shared):

* ``off``: nothing enabled (the default) - the peer every other mode is compared with;
* ``metrics``: ``enable_metrics()`` (hot-path series, nothing scraped meanwhile);
* ``traced-1%``: metrics, and tracing with ``sample_ratio=0.01`` into a batch processor
  whose exporter drops the spans (span creation and propagation are what is measured);
* ``traced-100%``: the same with every request traced.

Gateway: ``HttpServer`` + ``Gateway`` (one route, ``observe_gateway`` when a mode is on)
in a subprocess, forwarding to the raw asyncio responder of ``bench/balancers.py`` in
another; ``wrk -t1 -cN`` drives it. Figures: requests/s and the gateway process's CPU per
request (from /proc; the steadier figure on a shared box).
Mesh client: ``MeshClient.get`` (the whole call stack, client span when traced) in a
child process per mode against the same responder, ``--connections`` closed-loop workers
(``bench/_measure.py``, as ``bench/mesh_overhead.py``): requests/s and client CPU/request.
Bus: in a child process per mode, SQLite in a temporary directory: ``publish_many`` of 1,000-event
batches, then a subscription consuming them all (events/s).
Each figure is the median over the rounds, with the best round beside it (on a shared
machine the best round is the closest to what the code itself costs). The last line is
one JSON object with every figure and each mode's ratio to ``off``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import _wait_port, free_port
from balancers import BackendProcess
from http_server import WRK_SCRIPT, cpu_seconds, ensure_wrk, run_wrk

MODES = ("off", "metrics", "traced-1%", "traced-100%")
ROOT = str(Path(__file__).resolve().parent.parent)
PAYLOAD = "x" * 175
BATCH = 1000


def switch_on(mode: str) -> None:
    """Enable what ``mode`` says, in this process."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    from shoal.observability import enable_metrics, tracing

    if mode == "off":
        return
    enable_metrics()
    if mode.startswith("traced"):

        class Drop(tracing.SpanExporter):  # type: ignore[misc]
            def export(self, spans: Sequence[Any]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        ratio = 0.01 if mode == "traced-1%" else 1.0
        tracing.enable_tracing(Drop(), batch=True, sample_ratio=ratio)


# -- gateway (subprocess) -------------------------------------------------------------
def serve_gateway(mode: str, port: int, backend: int) -> None:
    from shoal.gateway import HttpServer
    from shoal.gateway.proxy import Gateway
    from shoal.gateway.routes import RouteTable
    from shoal.mesh.registry import EndpointCache, Instance, Registry
    from shoal.observability.http import observe_gateway
    from shoal.store import connect_store

    switch_on(mode)

    async def main() -> None:
        store = await connect_store("memory://bench")
        registry = Registry(store)
        await registry.register(Instance(id="echo-1", service="echo",
                                         address=f"127.0.0.1:{backend}"))
        cache = await EndpointCache(store).start()
        await cache.wait_for("echo", lambda eps: len(eps) >= 1, timeout=5)
        gateway = Gateway(RouteTable.from_config(
            [{"name": "echo", "match": {"path": {"prefix": "/"}}, "service": "echo"}]), cache)
        handler = gateway.handle if mode == "off" else observe_gateway(gateway)
        server = HttpServer(handler)
        await server.start("127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


def measure_gateway(mode: str, backend: int, wrk: str, script: str,
                    args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-gateway", mode, "--port",
                             str(port), "--backend", str(backend)],
                            env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        _wait_port(port, proc)
        run_wrk(wrk, script, port, args.connections, 1.0)  # warm-up
        cpu0 = cpu_seconds(proc.pid)
        r = run_wrk(wrk, script, port, args.connections, args.duration)
        cpu = cpu_seconds(proc.pid) - cpu0
        r["cpu_us_per_req"] = round(cpu / max(r["rps"] * args.duration, 1) * 1e6, 1)
        return r
    finally:
        proc.terminate()
        proc.wait()


# -- mesh client (a child process per mode) -------------------------------------------
async def mesh_round(backend: int, n: int, concurrency: int) -> dict[str, float]:
    from _measure import closed_loop

    from shoal.mesh.client import MeshClient
    from shoal.mesh.registry import EndpointCache, Instance, Registry
    from shoal.store import connect_store

    store = await connect_store("memory://mesh-bench")
    registry = Registry(store)
    await registry.register(Instance(id="echo-1", service="echo",
                                     address=f"127.0.0.1:{backend}"))
    cache = await EndpointCache(store).start()
    await cache.wait_for("echo", lambda eps: len(eps) >= 1, timeout=5)
    mesh = MeshClient(cache)
    first = await mesh.get("http://echo/")
    expect = await first.aread()

    async def get() -> bytes:
        resp = await mesh.get("http://echo/")
        return await resp.aread()

    try:
        await closed_loop(get, n // 4, concurrency, expect)  # warm-up
        return await closed_loop(get, n, concurrency, expect)
    finally:
        await mesh.aclose()
        await registry.close()
        await store.close()


def mesh_child(mode: str, backend: int, n: int, concurrency: int) -> None:
    switch_on(mode)
    print(json.dumps(uvloop.run(mesh_round(backend, n, concurrency))))


def measure_mesh(mode: str, backend: int, args: argparse.Namespace) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--mesh-child", mode, "--backend",
                          str(backend), "--requests", str(args.requests), "--connections",
                          str(args.connections)],
                         env=dict(os.environ, PYTHONPATH=ROOT), check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- bus (in process, one mode at a time) ---------------------------------------------
async def bus_round(directory: str, n: int) -> dict[str, float]:
    from shoal.events import EventBus, Message

    async with EventBus.connect(f"sqlite:///{directory}/events.db") as bus:
        topic = f"bench{time.monotonic_ns()}"
        await bus.create_topic(topic, partitions=8)
        msgs = [Message(PAYLOAD, key=f"k{i % 64}") for i in range(BATCH)]
        t = time.perf_counter()
        for _ in range(n // BATCH):
            await bus.publish_many(topic, msgs)
        publish = n / (time.perf_counter() - t)
        done, count = asyncio.Event(), 0

        async def handler(event: object) -> None:
            nonlocal count
            count += 1
            if count == n:
                done.set()

        t = time.perf_counter()
        sub = await bus.subscribe(topic, "g", handler)
        await done.wait()
        await sub.close()
        consume = n / (time.perf_counter() - t)
    return {"publish": round(publish), "consume": round(consume)}


def bus_child(mode: str, n: int) -> None:
    switch_on(mode)
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(uvloop.run(bus_round(d, n))))


def measure_bus(mode: str, n: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--bus-child", mode, "--events", str(n)],
                         env=dict(os.environ, PYTHONPATH=ROOT), check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def median(rounds: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--only", choices=("gateway", "mesh", "bus"))
    ap.add_argument("--mesh-child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--serve-gateway", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--bus-child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_gateway:
        serve_gateway(args.serve_gateway, args.port, args.backend)
        return
    if args.mesh_child:
        mesh_child(args.mesh_child, args.backend, args.requests, args.connections)
        return
    if args.bus_child:
        bus_child(args.bus_child, args.events)
        return

    result: dict[str, Any] = {"bench": "observability", "rounds": args.rounds}
    if args.only in (None, "gateway", "mesh"):
        wrk = ensure_wrk()
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(WRK_SCRIPT)
            script = f.name
        gw: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        ms: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}

        async def run_gateway() -> None:
            backends = await BackendProcess.start(1, 0.0, 0.0)
            try:
                for _ in range(args.rounds):
                    for mode in MODES:
                        r = await asyncio.to_thread(measure_gateway, mode, backends.ports[0],
                                                    wrk, script, args)
                        gw[mode].append(r)
                        print(f"  gateway {mode:12} {r}", file=sys.stderr)
                        if args.only is None or args.only == "mesh":
                            r = await asyncio.to_thread(measure_mesh, mode,
                                                        backends.ports[0], args)
                            ms[mode].append(r)
                            print(f"  mesh    {mode:12} {r}", file=sys.stderr)
            finally:
                await backends.stop()

        try:
            asyncio.run(run_gateway())
        finally:
            os.unlink(script)
        figures = {m: {"rps": median(v, "rps"), "cpu_us_per_req": median(v, "cpu_us_per_req"),
                       "best_cpu_us_per_req": min(r["cpu_us_per_req"] for r in v)}
                   for m, v in gw.items()}
        base = figures["off"]
        result["gateway"] = figures
        result["gateway_ratios"] = {
            m: {"rps": round(f["rps"] / base["rps"], 3),
                "cpu_per_req": round(f["cpu_us_per_req"] / base["cpu_us_per_req"], 3),
                "best_cpu_per_req": round(f["best_cpu_us_per_req"]
                                          / base["best_cpu_us_per_req"], 3)}
            for m, f in figures.items() if m != "off"}
        print(f"\ngateway, wrk -t1 -c{args.connections} -d{args.duration:g}s, median of "
              f"{args.rounds} rounds")
        for m, f in figures.items():
            print(f"  {m:12} {f['rps']:>9.0f} req/s {f['cpu_us_per_req']:>8} us CPU/req "
                  f"(best round {f['best_cpu_us_per_req']})")
        if ms["off"]:
            mfig = {m: {"rps": median(v, "rps"), "cpu_us": median(v, "cpu_us"),
                        "best_cpu_us": min(r["cpu_us"] for r in v)}
                    for m, v in ms.items()}
            result["mesh"] = mfig
            result["mesh_ratios"] = {
                m: {"rps": round(f["rps"] / mfig["off"]["rps"], 3),
                    "cpu_per_req": round(f["cpu_us"] / mfig["off"]["cpu_us"], 3),
                    "best_cpu_per_req": round(f["best_cpu_us"] / mfig["off"]["best_cpu_us"], 3)}
                for m, f in mfig.items() if m != "off"}
            print(f"\nmesh client, {args.requests} GETs by {args.connections} workers")
            for m, f in mfig.items():
                print(f"  {m:12} {f['rps']:>9.0f} req/s {f['cpu_us']:>8} us CPU/req "
                      f"(best round {f['best_cpu_us']})")
    if args.only in (None, "bus"):
        bus: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                r = measure_bus(mode, args.events)
                bus[mode].append(r)
                print(f"  bus {mode:12} {r}", file=sys.stderr)
        bfig = {m: {"publish": median(v, "publish"), "consume": median(v, "consume"),
                    "best_publish": max(r["publish"] for r in v),
                    "best_consume": max(r["consume"] for r in v)}
                for m, v in bus.items()}
        bbase = bfig["off"]
        result["bus"] = bfig
        result["bus_ratios"] = {
            m: {k: round(f[k] / bbase[k], 3) for k in ("publish", "consume", "best_publish",
                                                       "best_consume")}
            for m, f in bfig.items() if m != "off"}
        print(f"\nbus (sqlite), {args.events} events, median of {args.rounds} rounds")
        for m, f in bfig.items():
            print(f"  {m:12} publish {f['publish']:>9.0f}/s  consume {f['consume']:>9.0f}/s "
                  f"(best rounds {f['best_publish']:.0f}/s, {f['best_consume']:.0f}/s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
