"""Benchmark a ``shoal.Service`` instance against the same app as bare Starlette on uvicorn.

    python bench/service.py [--duration 5] [--connections 32] [--rounds 3] [--starts 5]

Two figures, each next to its peer measured in the same run:

1. **HTTP overhead of the SDK.** The same ``async def`` handler answering ``GET /`` with a
   small JSON body (msgspec-encoded Starlette ``Response``) in a subprocess, driven by
   ``wrk -t1 -c32`` after a 1 s warm-up:

   * ``service``: a ``shoal.Service`` run by ``python -m shoal.instance`` (SQLite broker
     and store, registered, load reports on): trace context, load counters, readiness;
   * ``starlette``: a bare ``Starlette`` app under uvicorn with the same settings
     (uvloop, httptools, access log off): the peer.

   Per server: requests/s, p50/p99 latency, and server CPU time per request (from /proc;
   robust on a shared machine). Interleaved rounds, median round kept.

2. **Time to ready.** From spawning the process to ``python -m shoal.instance`` printing
   its ready line (connected, serving, registered, subscribed), against spawning bare
   uvicorn until its port accepts a connection. Median of ``--starts``.

The last line is one JSON object with every figure and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import _wait_port, free_port
from http_server import WRK_SCRIPT, cpu_seconds, ensure_wrk, run_wrk

SERVERS = ("service", "starlette")
ROOT = Path(__file__).resolve().parent.parent
MESSAGE = {"message": "Hello, World!"}


def _hello() -> Any:
    import msgspec
    from starlette.responses import Response

    encode = msgspec.json.encode

    async def hello(request: Any) -> Response:
        return Response(encode(MESSAGE), media_type="application/json")

    return hello


def _service() -> Any:
    from shoal import Service

    svc = Service("bench-hello")
    svc.get("/")(_hello())
    return svc


svc = _service() if os.environ.get("SHOAL_BENCH_APP") else None  # for python -m shoal.instance


def _starlette() -> Any:
    from starlette.applications import Starlette
    from starlette.routing import Route

    return Starlette(routes=[Route("/", _hello())])


starlette_app = _starlette() if os.environ.get("SHOAL_BENCH_APP") else None


def spawn(kind: str, port: int, state: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'bench'}", SHOAL_BENCH_APP="1")
    if kind == "service":
        cmd = [sys.executable, "-m", "shoal.instance", "--app", "service:svc",
               "--listen", f"127.0.0.1:{port}", "--broker", f"sqlite:///{state}/events.db",
               "--store", f"sqlite:///{state}/store.db"]
    else:
        cmd = [sys.executable, "-m", "uvicorn", "service:starlette_app", "--host", "127.0.0.1",
               "--port", str(port), "--loop", "uvloop", "--http", "httptools",
               "--no-access-log", "--log-level", "warning", "--lifespan", "off"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def measure(kind: str, wrk: str, script: str, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    with tempfile.TemporaryDirectory() as state:
        proc = spawn(kind, port, state)
        try:
            _wait_port(port, proc)  # type: ignore[arg-type]
            run_wrk(wrk, script, port, args.connections, 1.0)  # warm-up
            cpu0 = cpu_seconds(proc.pid)
            result = run_wrk(wrk, script, port, args.connections, args.duration)
            cpu = cpu_seconds(proc.pid) - cpu0
            result["server_cpu_us_per_req"] = round(
                cpu / max(result["rps"] * args.duration, 1) * 1e6, 1)
            return result
        finally:
            stop(proc)


def time_to_ready(kind: str) -> float:
    port = free_port()
    with tempfile.TemporaryDirectory() as state:
        started = time.monotonic()
        proc = spawn(kind, port, state)
        try:
            if kind == "service":
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if not line.startswith('{"event": "ready"'):
                    raise RuntimeError(f"instance did not get ready: {line!r}")
            else:
                _wait_port(port, proc, timeout=30)  # type: ignore[arg-type]
            return time.monotonic() - started
        finally:
            stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--starts", type=int, default=5)
    args = ap.parse_args()

    wrk = ensure_wrk()
    results: dict[str, list[dict[str, float]]] = {k: [] for k in SERVERS}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
        script = f.name
    try:
        for _ in range(args.rounds):
            for kind in SERVERS:
                r = measure(kind, wrk, script, args)
                results[kind].append(r)
                print(f"  {kind:10} {r}", file=sys.stderr)
    finally:
        os.unlink(script)
    starts: dict[str, list[float]] = {k: [] for k in SERVERS}
    for _ in range(args.starts):
        for kind in SERVERS:
            starts[kind].append(time_to_ready(kind))

    def median_round(rounds: list[dict[str, float]]) -> dict[str, float]:
        rps = statistics.median_low([r["rps"] for r in rounds])
        return next(r for r in rounds if r["rps"] == rps)

    final = {k: median_round(v) for k, v in results.items()}
    ready = {k: round(statistics.median(v), 3) for k, v in starts.items()}
    print(f"\nGET /, small JSON body, wrk -t1 -c{args.connections} -d{args.duration:g}s, "
          f"one process on uvloop + httptools, {os.cpu_count()} CPUs")
    print(f"{'server':10} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} "
          f"{'CPU us/req':>11} {'ready s':>8}")
    for kind, r in final.items():
        print(f"{kind:10} {r['rps']:>10} {r['p50_ms']:>9} {r['p99_ms']:>9} {r['errors']:>7} "
              f"{r['server_cpu_us_per_req']:>11} {ready[kind]:>8}")
    base = final["starlette"]
    ratios = {
        "service_vs_starlette_rps": round(final["service"]["rps"] / base["rps"], 2),
        "service_vs_starlette_cpu_per_req": round(
            final["service"]["server_cpu_us_per_req"] / base["server_cpu_us_per_req"], 2),
        "service_vs_starlette_p99": round(final["service"]["p99_ms"] / base["p99_ms"], 2),
        "service_vs_uvicorn_time_to_ready": round(ready["service"] / ready["starlette"], 2),
    }
    for name, value in ratios.items():
        print(f"{name:34} {value}")
    print(json.dumps({"bench": "service", "connections": args.connections,
                      "duration_s": args.duration, "rounds": args.rounds,
                      "servers": final, "time_to_ready_s": ready, **ratios}))


if __name__ == "__main__":
    main()
