"""Benchmark the gateway's HTTP/1.1 server core (shoal.gateway.server) against aiohttp.web.

    python bench/http_server.py [--duration 5] [--connections 32] [--rounds 1]

Each server runs alone in a subprocess on uvloop and answers ``GET /`` with the same small
JSON body (``{"message":"Hello, World!"}``, encoded per request with msgspec) from the same
``async def`` handler; ``wrk -t1 -c32 -d5s`` (Debian's ``wrk``, installed with apt-get when
missing) drives each in turn after a 1 s warm-up, on the same machine, in the same run.
Servers measured:

* ``shoal``: ``HttpServer`` with the async handler (one task per request);
* ``shoal-sync``: the same body from a plain function (the no-task fast path);
* ``aiohttp``: ``aiohttp.web`` with the async handler, access log off.

Figures per server: requests/s, p50 and p99 latency (from wrk's histogram), errors, and the
server process's CPU time per request (from /proc: robust when other work shares the
machine, which throughput on a shared box is not). The servers are measured in ``--rounds``
interleaved rounds and each one's median round (by requests/s) is kept.
The last line is one JSON object with every figure and the ratios shoal / aiohttp.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import _wait_port, free_port

SERVERS = ("shoal", "shoal-sync", "aiohttp")
MESSAGE = {"message": "Hello, World!"}

WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "errors": %d, "non2xx": %d, '
    .. '"p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


# -- the servers (subprocesses) --------------------------------------------------------------
def serve(kind: str, port: int) -> None:
    import asyncio

    import msgspec
    import uvloop

    encode = msgspec.json.encode
    if kind == "aiohttp":
        from aiohttp import web

        async def aio_hello(request: web.Request) -> web.Response:
            return web.Response(body=encode(MESSAGE), content_type="application/json")

        app = web.Application()
        app.router.add_get("/", aio_hello)
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                    handle_signals=True)
        return

    from shoal.gateway.server import HttpServer, Response

    headers = [(b"content-type", b"application/json")]

    async def hello(request: Any) -> Response:
        return Response(encode(MESSAGE), 200, headers)

    def hello_sync(request: Any) -> Response:
        return Response(encode(MESSAGE), 200, headers)

    async def main() -> None:
        server = HttpServer(hello if kind == "shoal" else hello_sync)
        await server.start("127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


# -- the driver --------------------------------------------------------------------------------
def ensure_wrk() -> str:
    exe = shutil.which("wrk")
    if exe is None:
        print("wrk not found: installing Debian's wrk with apt-get", file=sys.stderr)
        subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True,
                       stdout=subprocess.DEVNULL)
        exe = shutil.which("wrk")
        if exe is None:
            raise SystemExit("wrk is still missing after apt-get install")
    return exe


def run_wrk(wrk: str, script: str, port: int, connections: int, duration: float
            ) -> dict[str, float]:
    out = subprocess.run(
        [wrk, "-t1", f"-c{connections}", f"-d{duration:g}s", "-s", script,
         f"http://127.0.0.1:{port}/"],
        check=True, capture_output=True, text=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON "))
    raw = json.loads(line[len("WRKJSON "):])
    return {
        "rps": round(raw["requests"] / (raw["duration_us"] / 1e6)),
        "p50_ms": round(raw["p50_us"] / 1000, 3),
        "p99_ms": round(raw["p99_us"] / 1000, 3),
        "errors": raw["errors"] + raw["non2xx"],
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, wrk: str, script: str, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)],
                            env=env)
    try:
        _wait_port(port, proc)
        run_wrk(wrk, script, port, args.connections, 1.0)  # warm-up
        cpu0 = cpu_seconds(proc.pid)
        result = run_wrk(wrk, script, port, args.connections, args.duration)
        cpu = cpu_seconds(proc.pid) - cpu0
        result["server_cpu_us_per_req"] = round(
            cpu / max(result["rps"] * args.duration, 1) * 1e6, 1)
        return result
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return

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
                print(f"  {kind:12} {r}", file=sys.stderr)
    finally:
        os.unlink(script)

    def median_round(rounds: list[dict[str, float]]) -> dict[str, float]:
        rps = statistics.median_low([r["rps"] for r in rounds])
        return next(r for r in rounds if r["rps"] == rps)

    final = {k: median_round(v) for k, v in results.items()}
    print(f"\nHTTP/1.1 GET, small JSON body, wrk -t1 -c{args.connections} "
          f"-d{args.duration:g}s, one server process on uvloop, {os.cpu_count()} CPUs")
    print(f"{'server':12} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} "
          f"{'CPU us/req':>11}")
    for kind, r in final.items():
        print(f"{kind:12} {r['rps']:>10} {r['p50_ms']:>9} {r['p99_ms']:>9} {r['errors']:>7} "
              f"{r['server_cpu_us_per_req']:>11}")
    base = final["aiohttp"]
    ratios = {
        "shoal_vs_aiohttp_rps": round(final["shoal"]["rps"] / base["rps"], 2),
        "shoal_sync_vs_aiohttp_rps": round(final["shoal-sync"]["rps"] / base["rps"], 2),
        "shoal_vs_aiohttp_p99": round(final["shoal"]["p99_ms"] / base["p99_ms"], 2),
        "shoal_vs_aiohttp_cpu_per_req": round(
            final["shoal"]["server_cpu_us_per_req"] / base["server_cpu_us_per_req"], 2),
    }
    for name, value in ratios.items():
        print(f"{name:28} {value}")
    print(json.dumps({"bench": "http_server", "connections": args.connections,
                      "duration_s": args.duration, "rounds": args.rounds,
                      "servers": final, **ratios}))


if __name__ == "__main__":
    main()
