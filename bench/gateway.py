"""Benchmark the Shoal gateway as a reverse proxy against nginx, haproxy and aiohttp.

    python bench/gateway.py [--duration 10] [--connections 32] [--rounds 1]

One backend: nginx (one worker) answering ``GET /`` with a small JSON body on two ports.
In front of it, each proxy in turn balances round robin over the same two ports, with
keep-alive connections to them, and ``wrk -t1 -c32`` drives it for ``--duration`` seconds
after a warm-up. Proxies measured, all in the same run:

* ``shoal``: the gateway (``HttpServer`` + ``Gateway`` + ``Upstream``) in one process on
  uvloop, one route to one service whose two endpoints are registered in a memory store;
* ``shoal-coro``: the same with the fast path off (every request in a task through
  ``Gateway.handle``, the coroutine path), to show what the fast path buys;
* ``shoal-2w``: the same with ``--workers 2`` (``shoal.gateway.workers``, SO_REUSEPORT);
* ``shoal-obs``: ``shoal`` with metrics and tracing on, as ``shoal up`` runs its gateway
  (``enable_metrics()``, ``enable_tracing_from_env()``, ``observe_gateway``): tracing at
  the default sampling ratio, exporting OTLP/HTTP in batches to a local collector stub
  (the nginx backend answering ``POST /v1/traces`` with 200); measured only when asked
  (``--only`` or ``--observability``);
* ``nginx``: nginx as a proxy, one worker, upstream keepalive;
* ``haproxy``: haproxy, ``nbthread 1``, ``http-reuse always``;
* ``aiohttp``: a plain aiohttp.web reverse proxy on uvloop, one ``ClientSession``
  (keep-alive) in one process;
* ``py-floor`` (only with ``--only``): the least a Python proxy on uvloop + httptools does,
  GET only and no checks: parse the request, write a fixed head on a pre-opened upstream
  connection, parse the response and write its bytes back. What is above it in ``shoal``'s
  CPU per request is Shoal's own Python, not the runtime or the kernel.

Debian's nginx, haproxy and wrk are installed with apt-get when missing (as root). Configs
go to a temporary directory. Figures per proxy: requests/s, p50 and p99 latency (wrk's
histogram, through a Lua ``done()``), errors, and the proxy's CPU time per request (its
process and children, from /proc: the figure least distorted when other work shares the
machine, which the 1-minute load average before and after the run shows). With
``--rounds`` > 1 the proxies are measured in interleaved rounds and each one's median round
(by requests/s) is kept. The last line is one JSON object with every figure and the ratios
against shoal (requests/s, and CPU per request).

    python bench/gateway.py --observability [--rounds 3] [--duration 10] [--bursts 10]

measures ``shoal`` and ``shoal-obs`` only, side by side: each round starts both proxies,
warms both, then drives them in turn for ``--bursts`` bursts of ``duration / bursts``
seconds each (in a shuffled order per turn), so that a load change on this shared machine
falls on both alike; a round's figures are its bursts' totals (CPU per request: CPU time
over requests; requests/s: requests over time). It puts ``observability_rps_ratio``
(median of ``shoal-obs`` / median of ``shoal``, requests/s), ``observability_cpu_ratio``
(CPU per request, ``shoal`` / ``shoal-obs``: 1.0 means free) and the per-round ratios in
the JSON line. Why side by side: under a load average of 5-10 on this 2-core machine,
one proxy measured in three whole rounds one after the other gave 176, 226 and 178 us of
CPU per request; four identical proxies side by side, 8 bursts of 2 s each, gave
119-123 us (another run: 118-128 us, the spread left to process start-up, which the
rounds sample). Requests/s still swing by +-15% between identical proxies: CPU per
request is the figure to read. ``--taskset`` pins every proxy to those CPUs
(``taskset -c``), the same for both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import _wait_port, free_port
from http_server import WRK_SCRIPT, run_wrk  # the same wrk driver as the other benches

PROXIES = ("shoal", "shoal-coro", "shoal-2w", "nginx", "haproxy", "aiohttp")
OBSERVED = ("shoal", "shoal-obs")  # --observability: off against metrics + tracing
BODY = '{"message":"Hello, World!"}'


NGINX_COMMON = """
daemon off;
master_process on;
worker_processes 1;
pid {d}/{name}.pid;
error_log {d}/{name}.error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
"""

NGINX_TEMP = """
    access_log off;
    client_body_temp_path {d}/{name}-body;
    proxy_temp_path {d}/{name}-proxy;
    fastcgi_temp_path {d}/{name}-fastcgi;
    uwsgi_temp_path {d}/{name}-uwsgi;
    scgi_temp_path {d}/{name}-scgi;
    keepalive_requests 1000000;
"""

NGINX_BACKEND = NGINX_COMMON + """
http {{
""" + NGINX_TEMP + """
    server {{
        listen 127.0.0.1:{port_a};
        listen 127.0.0.1:{port_b};
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""

NGINX_PROXY = NGINX_COMMON + """
http {{
""" + NGINX_TEMP + """
    upstream backend {{
        server 127.0.0.1:{port_a};
        server 127.0.0.1:{port_b};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

HAPROXY = """
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    http-reuse always
frontend front
    bind 127.0.0.1:{port}
    default_backend back
backend back
    balance roundrobin
    server a 127.0.0.1:{port_a}
    server b 127.0.0.1:{port_b}
"""


# -- the proxies written in Python (subprocesses of this script) ------------------------------
def serve_aiohttp(port: int, backends: list[int]) -> None:
    import asyncio
    import itertools

    import aiohttp
    import uvloop
    from aiohttp import web

    urls = itertools.cycle([f"http://127.0.0.1:{p}" for p in backends])
    session: list[aiohttp.ClientSession] = []

    async def start(app: web.Application) -> None:
        session.append(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            auto_decompress=False))

    async def stop(app: web.Application) -> None:
        await session[0].close()

    async def proxy(request: web.Request) -> web.Response:
        async with session[0].request(request.method, next(urls) + request.path_qs,
                                      headers=request.headers,
                                      data=await request.read() or None) as up:
            body = await up.read()
            headers = {k: v for k, v in up.headers.items()
                       if k.lower() not in ("connection", "transfer-encoding",
                                            "content-length", "keep-alive")}
            return web.Response(body=body, status=up.status, headers=headers)

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", proxy)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def serve_floor(port: int, backends: list[int]) -> None:
    """``py-floor``: GET only, no validation, no limits, 64 upstream connections per port."""
    import asyncio
    import itertools

    import httptools
    import uvloop

    class Upstream(asyncio.Protocol):
        def __init__(self, idle: list[Upstream]) -> None:
            self.idle, self.client, self.pieces = idle, None, []
            self.parser = httptools.HttpResponseParser(self)

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.pieces.append(data)
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            client, self.client = self.client, None
            answer, self.pieces = b"".join(self.pieces), []
            self.idle.append(self)
            client.transport.write(answer)

    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_message_complete(self) -> None:
            up = next(pools[0]).pop()
            up.client = self
            up.transport.write(b"GET " + self.url + b" HTTP/1.1\r\nHost: backend\r\n"
                               b"X-Forwarded-For: 127.0.0.1\r\n\r\n")

    pools: list[Iterator[list[Upstream]]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        idles: list[list[Upstream]] = []
        for p in backends:
            idle: list[Upstream] = []
            for _ in range(64):
                _, up = await loop.create_connection(lambda idle=idle: Upstream(idle),
                                                     "127.0.0.1", p)
                idle.append(up)
            idles.append(idle)
        pools.append(itertools.cycle(idles))
        await loop.create_server(Client, "127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


def serve_shoal(port: int, backends: list[int], workers: int, fast: bool = True,
                observe: bool = False) -> None:
    """The bench-only launcher: one route to service ``hello`` (round robin), whose two
    endpoints each worker registers in its own memory store. ``observe``: metrics and
    tracing on (``OTEL_EXPORTER_OTLP_ENDPOINT`` set by the driver), as under ``shoal up``."""
    import contextlib as cl
    import functools
    import uuid

    from shoal.gateway.proxy import Gateway
    from shoal.gateway.routes import RouteTable
    from shoal.gateway.workers import run_workers
    from shoal.mesh.registry import EndpointCache, Instance, Registry
    from shoal.store import connect_store

    routes = RouteTable.from_config([{"name": "hello", "service": "hello"}])
    services = {"hello": {"load_balancer": {"policy": "round_robin"}}}

    @cl.asynccontextmanager
    async def app() -> Any:
        store = await connect_store(f"memory://{uuid.uuid4().hex}")
        registry = Registry(store)
        for i, p in enumerate(backends):
            await registry.register(Instance(id=f"hello-{i}", service="hello",
                                             address=f"127.0.0.1:{p}"))
        cache = await EndpointCache(store).start()
        await cache.wait_for("hello", lambda eps: len(eps) == len(backends))
        gateway = Gateway(routes, cache, services=services)
        handler = gateway.handle if fast else functools.partial(Gateway.handle, gateway)
        if observe:
            from shoal.observability import enable_metrics
            from shoal.observability.http import observe_gateway
            from shoal.observability.tracing import disable_tracing, enable_tracing_from_env

            enable_metrics()  # before the gateway's upstreams take their series
            if enable_tracing_from_env("gateway") is None:
                raise SystemExit("shoal-obs: OTEL_EXPORTER_OTLP_ENDPOINT is not set")
            handler = observe_gateway(gateway)
        try:  # a partial is not the bound ``handle``: the server then has no fast handler
            yield handler
        finally:
            await gateway.aclose()
            if observe:
                disable_tracing()
            await cache.close()
            await registry.close()
            await store.close()

    sys.exit(run_workers(app, "127.0.0.1", port, workers=workers))


# -- the driver --------------------------------------------------------------------------------
def ensure_tools() -> dict[str, str]:
    names = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk"}
    found = {k: shutil.which(k) or shutil.which(k, path="/usr/sbin") for k in names}
    missing = [names[k] for k, v in found.items() if v is None]
    if missing:
        print(f"installing Debian's {', '.join(missing)} with apt-get", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL, env=env)
        subprocess.run(["apt-get", "install", "-y", *missing], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        found = {k: shutil.which(k) or shutil.which(k, path="/usr/sbin") for k in names}
        if None in found.values():
            raise SystemExit(f"still missing after apt-get install: {found}")
    return found  # type: ignore[return-value]


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    kids = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                    todo.extend(int(k) for k in kids)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants so far."""
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running(cmd: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[int]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)  # type: ignore[arg-type]
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def proxy_command(kind: str, port: int, backends: list[int], d: str, tools: dict[str, str]
                  ) -> list[str]:
    if kind == "nginx":
        conf = Path(d, "proxy.conf")
        conf.write_text(NGINX_PROXY.format(d=d, name="proxy", port=port, port_a=backends[0],
                                           port_b=backends[1]))
        return [tools["nginx"], "-p", d, "-c", str(conf), "-e", f"{d}/proxy.stderr.log"]
    if kind == "haproxy":
        conf = Path(d, "haproxy.cfg")
        conf.write_text(HAPROXY.format(port=port, port_a=backends[0], port_b=backends[1]))
        return [tools["haproxy"], "-db", "-f", str(conf)]
    ports = ",".join(map(str, backends))
    if kind in ("aiohttp", "py-floor"):
        return [sys.executable, __file__, "--serve", kind, "--port", str(port),
                "--backends", ports]
    workers = 2 if kind == "shoal-2w" else 1
    observe = ["--observe"] if kind == "shoal-obs" else []
    return [sys.executable, __file__, "--serve", "shoal", "--port", str(port),
            "--backends", ports, "--workers", str(workers), *observe,
            *(["--coroutine-path"] if kind == "shoal-coro" else [])]


def measure(kind: str, tools: dict[str, str], script: str, backends: list[int], d: str,
            args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    if kind == "shoal-obs":  # the collector stub: the nginx backend answers any POST with 200
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{backends[0]}"
    cmd = proxy_command(kind, port, backends, d, tools)
    if args.taskset:
        cmd = ["taskset", "-c", args.taskset, *cmd]
    with running(cmd, port, env) as pid:
        warm = run_wrk(tools["wrk"], script, port, args.connections, args.warmup)
        if warm["errors"]:
            raise SystemExit(f"{kind}: {warm['errors']} errors during the warm-up")
        cpu0 = cpu_seconds(pid)
        result = run_wrk(tools["wrk"], script, port, args.connections, args.duration)
        cpu = cpu_seconds(pid) - cpu0
    result["proxy_cpu_us_per_req"] = round(cpu / max(result["rps"] * args.duration, 1) * 1e6, 1)
    return result


def measure_side_by_side(kinds: tuple[str, ...], tools: dict[str, str], script: str,
                         backends: list[int], d: str, args: argparse.Namespace
                         ) -> dict[str, dict[str, float]]:
    """One round of ``--observability``: every proxy of ``kinds`` running at once, driven in
    turn (a shuffled order per turn) for ``args.bursts`` bursts each; figures summed."""
    burst = max(1, round(args.duration / args.bursts))  # wrk takes whole seconds only
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent),
               OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{backends[0]}")  # the stub
    with contextlib.ExitStack() as stack:
        procs = {}
        for kind in kinds:
            port = free_port()
            cmd = proxy_command(kind, port, backends, d, tools)
            if args.taskset:
                cmd = ["taskset", "-c", args.taskset, *cmd]
            procs[kind] = (stack.enter_context(running(cmd, port, env)), port)
        for kind, (_pid, port) in procs.items():
            warm = run_wrk(tools["wrk"], script, port, args.connections, args.warmup)
            if warm["errors"]:
                raise SystemExit(f"{kind}: {warm['errors']} errors during the warm-up")
        bursts: dict[str, list[tuple[float, dict[str, float]]]] = {k: [] for k in kinds}
        order = list(kinds)
        for _ in range(args.bursts):
            random.shuffle(order)
            for kind in order:
                pid, port = procs[kind]
                cpu0 = cpu_seconds(pid)
                r = run_wrk(tools["wrk"], script, port, args.connections, burst)
                bursts[kind].append((cpu_seconds(pid) - cpu0, r))
    out = {}
    for kind, runs in bursts.items():
        requests = sum(r["rps"] * burst for _, r in runs)
        out[kind] = {
            "rps": round(requests / (burst * len(runs))),
            "p50_ms": statistics.median(r["p50_ms"] for _, r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for _, r in runs),
            "errors": sum(r["errors"] for _, r in runs),
            "proxy_cpu_us_per_req": round(sum(c for c, _ in runs) / max(requests, 1) * 1e6, 1),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, help="seconds of load before measuring (default "
                    "2; 6 with --observability: past the span exporter's first batch, 5 s in)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", help="comma-separated proxies to measure (default: all but "
                    "shoal-obs and py-floor)")
    ap.add_argument("--observability", action="store_true",
                    help="measure shoal against shoal-obs (metrics + tracing) only")
    ap.add_argument("--taskset", help="CPU list every proxy is pinned to (taskset -c)")
    ap.add_argument("--bursts", type=int, default=10, help="--observability: bursts per "
                    "proxy per round, each of duration / bursts seconds (at least 1: "
                    "wrk counts whole seconds)")
    ap.add_argument("--observe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve", choices=("shoal", "aiohttp", "py-floor"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--backends", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--coroutine-path", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        backends = [int(p) for p in args.backends.split(",")]
        if args.serve == "aiohttp":
            serve_aiohttp(args.port, backends)
        elif args.serve == "py-floor":
            serve_floor(args.port, backends)
        else:
            serve_shoal(args.port, backends, args.workers, fast=not args.coroutine_path,
                        observe=args.observe)
        return

    if args.warmup is None:
        args.warmup = 6.0 if args.observability or "shoal-obs" in (args.only or "") else 2.0
    kinds = tuple(args.only.split(",")) if args.only else (
        OBSERVED if args.observability else PROXIES)
    unknown = set(kinds) - {*PROXIES, *OBSERVED, "py-floor"}
    if unknown:
        raise SystemExit(f"--only: unknown proxies {sorted(unknown)}; known: "
                         f"{', '.join((*PROXIES, 'shoal-obs', 'py-floor'))}")
    load = [round(os.getloadavg()[0], 2)]
    tools = ensure_tools()
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-gateway-") as d:
        script = str(Path(d, "report.lua"))
        Path(script).write_text(WRK_SCRIPT)
        backends = [free_port(), free_port()]
        conf = Path(d, "backend.conf")
        conf.write_text(NGINX_BACKEND.format(d=d, name="backend", port_a=backends[0],
                                             port_b=backends[1], body=BODY))
        backend_cmd = [tools["nginx"], "-p", d, "-c", str(conf), "-e",
                       f"{d}/backend.stderr.log"]
        with running(backend_cmd, backends[0]):
            for _ in range(args.rounds if args.observability else 0):
                side = measure_side_by_side(kinds, tools, script, backends, d, args)
                for kind, fig in side.items():
                    results[kind].append(fig)
                    print(f"  {kind:9} {fig}", file=sys.stderr)
            for r in range(0 if args.observability else args.rounds):
                order = kinds if r % 2 == 0 else kinds[::-1]  # neither side always first
                for kind in order:
                    r = measure(kind, tools, script, backends, d, args)
                    results[kind].append(r)
                    print(f"  {kind:9} {r}", file=sys.stderr)
                    time.sleep(0.5)

    def median_round(rounds: list[dict[str, float]]) -> dict[str, float]:
        rps = statistics.median_low([r["rps"] for r in rounds])
        return next(r for r in rounds if r["rps"] == rps)

    final = {k: median_round(v) for k, v in results.items()}
    print(f"\nreverse proxy, GET / small JSON from 2 nginx backend ports (round robin), "
          f"wrk -t1 -c{args.connections} -d{args.duration:g}s, {os.cpu_count()} CPUs")
    print(f"load average before/after: {load[0]} / {os.getloadavg()[0]:.2f}")
    print(f"{'proxy':9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
          f"{'CPU us/req':>11}")
    for kind, r in final.items():
        print(f"{kind:9} {r['rps']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['errors']:>7} "
              f"{r['proxy_cpu_us_per_req']:>11}")
    ratios: dict[str, Any] = {}
    if "shoal" in final:
        shoal = final["shoal"]["rps"]
        cpu = final["shoal"]["proxy_cpu_us_per_req"]
        for peer in ("nginx", "haproxy", "aiohttp", "py-floor"):
            if peer in final:
                key = peer.replace("-", "_")
                ratios[f"shoal_vs_{key}_rps"] = round(shoal / final[peer]["rps"], 2)
                # CPU per request: the figure a machine shared with other work distorts least
                ratios[f"{key}_vs_shoal_cpu_per_req"] = round(
                    final[peer]["proxy_cpu_us_per_req"] / cpu, 2)
        if "shoal-coro" in final:
            coro = final["shoal-coro"]
            ratios["shoal_vs_shoal_coro_rps"] = round(shoal / coro["rps"], 2)
            ratios["shoal_coro_vs_shoal_cpu_per_req"] = round(
                coro["proxy_cpu_us_per_req"] / cpu, 2)
        if "shoal-2w" in final:
            ratios["shoal_2w_vs_shoal_rps"] = round(final["shoal-2w"]["rps"] / shoal, 2)
        if "shoal-obs" in final:  # what metrics + tracing cost: 1.0 is free
            ratios["observability_rps_ratio"] = round(
                statistics.median(r["rps"] for r in results["shoal-obs"])
                / statistics.median(r["rps"] for r in results["shoal"]), 3)
            ratios["observability_cpu_ratio"] = round(
                statistics.median(r["proxy_cpu_us_per_req"] for r in results["shoal"])
                / statistics.median(r["proxy_cpu_us_per_req"] for r in results["shoal-obs"]), 3)
            ratios["observability_rps_ratio_per_round"] = [
                round(o["rps"] / b["rps"], 3)
                for o, b in zip(results["shoal-obs"], results["shoal"], strict=True)]
    for name, value in ratios.items():
        print(f"{name:24} {value}")
    print(json.dumps({"bench": "gateway", "connections": args.connections,
                      "taskset": args.taskset,
                      "duration_s": args.duration, "rounds": args.rounds, "cpus": os.cpu_count(),
                      "load_average_1m": [load[0], round(os.getloadavg()[0], 2)],
                      "proxies": final, **ratios}))


if __name__ == "__main__":
    main()
