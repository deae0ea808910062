"""Linkerd's load-balancer experiment (the 2016 Peak EWMA post), repeated on the mesh client.

    python bench/balancers.py [--seconds 30] [--rate 1000] [--strategies a,b,...]

Eleven backends answer GET in 1-5 ms (uniform) on eleven loopback ports, all in ONE
subprocess on its own uvloop, so a slow backend never shares an event loop with the load
generator. This process registers them in a ``memory://`` store, then for each strategy
builds a fresh ``MeshClient`` (timeouts.request = 1s, retries.attempts = 0, outlier
detection and the consecutive-failure breaker off: the balancer alone is measured) and
drives it **open loop**: request i starts at ``t0 + i / rate`` whatever happened to
earlier ones, so a slow backend cannot slow the generator down. After ``--warmup``
seconds with every backend fast (pools open, balancer state warm, nothing measured), one
backend answers in 2 s for the ``--seconds`` measurement window; then it is fast again
and in-flight requests drain.

Per strategy: success rate (a 200 within the 1 s timeout), p50/p99/p99.9 latency of the
successful requests, measured from each request's *scheduled* start (so generator lag
counts, wrk2 style), the share of requests the balancer sent to the slow backend, the
rate actually offered and the generator's lag behind schedule. ``consistent_hash`` gets
a random key per request. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import free_port

from shoal.mesh.client import MeshClient
from shoal.mesh.registry import Instance, Registry
from shoal.mesh.resilience import load_traffic_policy
from shoal.store import connect_store

STRATEGIES = ("round_robin", "random", "least_request", "peak_ewma", "weighted_round_robin",
              "consistent_hash")
SERVICE = "backend"
BACKENDS = 11
SLOW = 0  # the backend that turns slow during the measurement window
SLOW_SECONDS = 2.0
ROOT = str(Path(__file__).resolve().parent.parent)
TIMEOUT = "1s"


# -- the backends (subprocess) --------------------------------------------------------------
class Backend(asyncio.Protocol):
    """A tiny HTTP/1.1 keep-alive GET responder: each request is answered after a delay.

    Requests are found by their blank line (GETs without bodies; the mesh client never
    pipelines). A reply due on a connection the client has since closed (a timeout) is
    dropped.
    """

    __slots__ = ("_buffer", "_delay", "_reply", "_transport")

    def __init__(self, reply: bytes, delay: Any) -> None:
        self._reply = reply
        self._delay = delay  # () -> seconds
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        end = buffer.find(b"\r\n\r\n")
        while end >= 0:
            buffer = buffer[end + 4:]
            delay = self._delay()
            if delay > 0:
                asyncio.get_running_loop().call_later(delay, self._answer)
            else:
                self._answer()
            end = buffer.find(b"\r\n\r\n")
        self._buffer = buffer

    def _answer(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(self._reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


def reply_for(index: int) -> bytes:
    """The response of backend ``index``: 2-byte body, naming the backend in a header."""
    return (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n"
            b"X-Backend: %d\r\n\r\nok" % index)


async def run_backends(ports: list[int], low: float, high: float) -> None:
    """Serve backends on ``ports``; stdin lines ``slow <i>`` / ``fast`` switch backend i.

    Each command is acknowledged with ``ok`` on stdout; EOF on stdin ends the process.
    """
    loop = asyncio.get_running_loop()
    slow: set[int] = set()
    uniform = random.uniform

    def delay_of(index: int) -> Any:
        def delay() -> float:
            return SLOW_SECONDS if index in slow else uniform(low, high)
        return delay

    servers = [
        await loop.create_server(lambda i=i: Backend(reply_for(i), delay_of(i)),  # type: ignore[misc]
                                 "127.0.0.1", port, backlog=1024)
        for i, port in enumerate(ports)
    ]
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    while line := (await reader.readline()).decode().split():
        if line[0] == "slow":
            slow.add(int(line[1]))
        elif line[0] == "fast":
            slow.clear()
        print("ok", flush=True)
    for server in servers:
        server.close()


class BackendProcess:
    """The backends' subprocess, and the switch that makes one of them slow."""

    def __init__(self, ports: list[int], proc: asyncio.subprocess.Process) -> None:
        self.ports = ports
        self.proc = proc

    @classmethod
    async def start(cls, n: int, low: float = 0.001, high: float = 0.005) -> BackendProcess:
        """Start ``n`` backends answering in uniform ``[low, high]`` seconds."""
        ports = [free_port() for _ in range(n)]
        env = {**os.environ, "PYTHONPATH": ROOT}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", ",".join(map(str, ports)),
            "--latency", f"{low},{high}", env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self = cls(ports, proc)
        await self._expect("ready")
        return self

    async def command(self, line: str) -> None:
        """Send ``slow <i>`` or ``fast`` and wait until the backends have applied it."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        await self._expect("ok")

    async def _expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        async with asyncio.timeout(10):
            got = (await self.proc.stdout.readline()).decode().strip()
        if got != word:
            raise RuntimeError(f"backends: expected {word!r}, got {got!r} "
                               f"(exit code {self.proc.returncode})")

    async def stop(self) -> None:
        """End the subprocess (EOF on its stdin, then kill if it lingers)."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(5):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


# -- the load generator ---------------------------------------------------------------------
def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (nan if empty)."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Run:
    """What one open-loop phase did."""

    def __init__(self) -> None:
        self.latencies: list[float] = []  # successful requests, from their scheduled start
        self.failures: Counter[str] = Counter()
        self.lags: list[float] = []  # actual start - scheduled start
        self.sent = 0
        self.elapsed = 0.0


async def open_loop(mesh: MeshClient, rate: float, seconds: float, *, keyed: bool) -> Run:
    """Start ``rate * seconds`` GETs on a fixed schedule; wait for all of them to end."""
    run = Run()
    clock = time.perf_counter
    total = round(rate * seconds)
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    getrandbits = random.getrandbits

    async def one(scheduled: float) -> None:
        run.lags.append(clock() - scheduled)
        try:
            response = await mesh.request(
                "GET", f"http://{SERVICE}/", hash_key=str(getrandbits(64)) if keyed else None)
            await response.aread()
        except Exception as exc:  # every failure is counted by its kind
            run.failures[type(exc).__name__] += 1
            return
        if response.status == 200:
            run.latencies.append(clock() - scheduled)
        else:
            run.failures[f"http_{response.status}"] += 1

    t0 = clock()
    sent = 0
    while sent < total:
        due = min(total, int((clock() - t0) * rate) + 1)
        while sent < due:
            task = loop.create_task(one(t0 + sent / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(max(0.0, t0 + sent / rate - clock()))
    run.sent = sent
    run.elapsed = clock() - t0
    if tasks:
        await asyncio.wait(tasks)
    return run


def policy_for(strategy: str) -> Any:
    """1 s request timeout, no retries, no ejection, no breaker: only the balancer acts."""
    return load_traffic_policy({
        "timeouts": {"request": TIMEOUT},
        "retries": {"attempts": 0},
        "outlier_detection": {"consecutive_5xx": 0},
        "circuit_breaker": {"consecutive_failures": 0, "max_requests": 100_000},
        "load_balancer": {"policy": strategy},
    })


async def measure(store: Any, backends: BackendProcess, strategy: str, rate: float,
                  seconds: float, warmup: float) -> dict[str, Any]:
    """One strategy: warm up with all backends fast, then the window with one slow."""
    mesh = await MeshClient.connect(store, default_policy=policy_for(strategy))
    try:
        await mesh.cache.wait_for(SERVICE, lambda eps: len(eps) == BACKENDS, timeout=5)
        keyed = strategy == "consistent_hash"
        if warmup > 0:
            await open_loop(mesh, rate, warmup, keyed=keyed)
        balancer = mesh.upstream(SERVICE).balancer
        slow_id = f"{SERVICE}-{SLOW}"
        before = balancer.stats(slow_id).requests + balancer.stats(slow_id).active
        await backends.command(f"slow {SLOW}")
        run = await open_loop(mesh, rate, seconds, keyed=keyed)
        await backends.command("fast")
        to_slow = balancer.stats(slow_id).requests - before
    finally:
        await mesh.aclose()
    run.latencies.sort()
    run.lags.sort()
    ok = len(run.latencies)
    return {
        "requests": run.sent,
        "succeeded": ok,
        "success_rate": round(ok / run.sent, 6),
        "p50_ms": round(percentile(run.latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(run.latencies, 0.99) * 1000, 2),
        "p999_ms": round(percentile(run.latencies, 0.999) * 1000, 2),
        "to_slow_backend": round(to_slow / run.sent, 5),
        "offered_rps": round(run.sent / run.elapsed, 1),
        "lag_p50_ms": round(percentile(run.lags, 0.50) * 1000, 2),
        "lag_p99_ms": round(percentile(run.lags, 0.99) * 1000, 2),
        "failures": dict(run.failures),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    backends = await BackendProcess.start(BACKENDS)
    store = await connect_store(f"memory://bench-balancers-{os.getpid()}")
    registry = Registry(store)
    try:
        for i, port in enumerate(backends.ports):
            await registry.register(
                Instance(id=f"{SERVICE}-{i}", service=SERVICE, address=f"127.0.0.1:{port}"))
        results: dict[str, Any] = {}
        for strategy in args.strategies:
            cpu = time.process_time()
            results[strategy] = res = await measure(
                store, backends, strategy, args.rate, args.seconds, args.warmup)
            res["generator_cpu_share"] = round(
                (time.process_time() - cpu) / (args.seconds + args.warmup), 3)
            print(f"  {strategy:22} success {res['success_rate']:.4%}  "
                  f"p50 {res['p50_ms']} ms  p99 {res['p99_ms']} ms  "
                  f"p99.9 {res['p999_ms']} ms  ({res['offered_rps']} req/s offered)",
                  file=sys.stderr, flush=True)
        return results
    finally:
        await registry.close()
        await store.close()
        await backends.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="measurement window")
    ap.add_argument("--warmup", type=float, default=2.0, help="all-fast phase before it")
    ap.add_argument("--rate", type=float, default=1000.0, help="requests/s, all backends")
    ap.add_argument("--strategies", type=lambda s: s.split(","), default=list(STRATEGIES))
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--latency", default="0.001,0.005", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        low, high = map(float, args.latency.split(","))
        uvloop.run(run_backends([int(p) for p in args.serve.split(",")], low, high))
        return
    for strategy in args.strategies:
        policy_for(strategy)  # a typo fails now, not after minutes of load

    results = uvloop.run(bench(args))
    print(f"\n{BACKENDS} backends (1-5 ms; one at {SLOW_SECONDS:g} s during the window), "
          f"{args.rate:g} req/s open loop, {args.seconds:g} s window, request timeout "
          f"{TIMEOUT}, no retries; uvloop, {os.cpu_count()} CPUs")
    print(f"{'strategy':22} {'success':>9} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} "
          f"{'to slow':>8} {'req/s':>7}")
    for strategy, r in results.items():
        print(f"{strategy:22} {r['success_rate']:>9.4%} {r['p50_ms']:>8} {r['p99_ms']:>8} "
              f"{r['p999_ms']:>9} {r['to_slow_backend']:>8.3%} {r['offered_rps']:>7}")
    print(json.dumps({
        "bench": "balancers", "backends": BACKENDS, "rate": args.rate,
        "seconds": args.seconds, "warmup": args.warmup, "slow_latency_s": SLOW_SECONDS,
        "request_timeout_s": 1.0, "cpus": os.cpu_count(), "strategies": results,
    }))


if __name__ == "__main__":
    main()
