"""The shop end to end: time from `shoal up` to ready, and orders per second.

The shop is ``examples/shop/shoal.yaml`` as a user runs it (strict mTLS, the default;
billing autoscaled), its state in a temporary directory, any free ports. Peers measured
in the same run (the machine is shared; read the ratios):

* **startup**: wall seconds from spawning `shoal up` until it prints its ready line (8
  instances, gateway, admin, health monitor), which must mean ready: right after it, one
  request per route through the gateway must be answered by its service (else the bench
  fails), and the time until both were is reported too. The peer is the *import floor*:
  the same number of Python processes started in parallel that only import their service
  module and exit (what any process-per-instance runner pays before serving anything),
  measured before and after the run, the better of the two kept. Also reported: the CPU
  seconds of every process of `shoal up` at the ready line, and with ``--timeline`` each
  process's marks (``shoal.control.timeline``: CLI parsed, fork server up, instances
  spawned, certificates issued, each instance ready, gateway serving, ...) from the spawn.
* **throughput**: orders settled (or failed) per second end to end (gateway -> orders ->
  bus -> inventory -> bus -> billing -> payments (mesh call) -> bus -> orders-view),
  against orders *accepted* per second by the gateway and the orders service (HTTP 202s)
  in the same run.

    python bench/shop.py [--orders 2000] [--concurrency 32] [--timeline]

``--orders 0`` times the start only. Shoal's and the shop's bytecode is compiled first
and the processes may use it, as where Shoal was installed by pip, even if the
environment says ``PYTHONDONTWRITEBYTECODE`` (as the shared machine's sessions do: then
every process compiled ~90 of Shoal's modules from source, ~0.35 s of CPU each, and so
did the import floor); ``--no-bytecode-cache`` keeps that. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import uvloop

from shoal.control.timeline import ENV as TIMELINE_ENV
from shoal.control.timeline import read as read_timeline
from shoal.mesh.http1 import ConnectionPool

ROOT = Path(__file__).resolve().parents[1]
SHOP = ROOT / "examples" / "shop"
MODULES = ["shop.orders", "shop.orders", "shop.inventory", "shop.inventory", "shop.payments",
           "shop.payments", "shop.billing", "shop.view"]


def shop_manifest() -> str:
    """``examples/shop/shoal.yaml`` as a ``str.format`` template: its state under ``{dir}``,
    the gateway and the admin API on ports the system picks; everything else as a user runs
    it (strict mTLS, the default; services, replicas, routes, policies, autoscaling)."""
    text = (SHOP / "shoal.yaml").read_text().replace("{", "{{").replace("}", "}}")
    for pattern, replacement in ((r"^broker: .*$", "broker: sqlite:///{dir}/events.db"),
                                 (r"^store: .*$", "store: sqlite:///{dir}/store.db"),
                                 (r"^admin: .*$", "admin: {{listen: 127.0.0.1:0}}"),
                                 (r"^  listen: .*$", "  listen: 127.0.0.1:0")):
        text, n = re.subn(pattern, replacement, text, count=1, flags=re.M)
        if n != 1:
            raise SystemExit(f"{SHOP / 'shoal.yaml'}: no line matches {pattern!r}")
    return text


MANIFEST = shop_manifest()


def import_floor(env: dict[str, str]) -> float:
    """Seconds to run one importing process per instance, all in parallel."""
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", f"import shoal.instance, {m}"], env=env)
             for m in MODULES]
    for p in procs:
        p.wait()
    return time.perf_counter() - started


def tree_cpu(root: int) -> dict[int, tuple[str, float]]:
    """CPU seconds used so far by ``root`` and every process under it: {pid: (name, s)}."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, stats = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:]
        fields = rest.split()
        parents[int(entry)] = int(fields[1])
        stats[int(entry)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            tree[pid] = stats[pid]
            todo += [child for child, parent in parents.items() if parent == pid]
    return tree


@dataclass
class Started:
    """A `shoal up` that said it is ready."""

    process: asyncio.subprocess.Process
    spawned_at: float  # unix time, just before the spawn
    ready_wall: float  # seconds from spawn to its ready line
    ready_own: float  # its own figure (printed in the ready line)
    first_request: float  # seconds from spawn until a request through the gateway succeeded
    gateway: str
    cpu: dict[int, tuple[str, float]]  # per process at the ready line


async def probe(gateway: str) -> None:
    """One request per route through the gateway, each answered by its service: POST /orders
    with an invalid order (the orders service says 400, nothing is placed) and GET /orders
    (the read model says 200). SystemExit otherwise: then "ready" was not ready."""
    async with ConnectionPool(gateway.removeprefix("http://"), max_connections=1) as client:
        for method, body, wanted in (("POST", b"{}", 400), ("GET", None, 200)):
            r = await client.request(method, "/orders", [(b"content-type", b"application/json")],
                                     body)
            text = await r.aread()
            if r.status != wanted or (method == "POST" and b"order." not in text):
                raise SystemExit(f"right after the ready line, {method} /orders through the "
                                 f"gateway: HTTP {r.status} {text[:200]!r} (wanted {wanted})")


async def up(manifest: Path, env: dict[str, str], log: Path) -> Started:
    """Start `shoal up`; return once it printed its ready line and a request succeeded."""
    spawned_at = time.time()
    started = time.perf_counter()
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shoal.cli", "up", str(manifest),
            stdout=subprocess.PIPE, stderr=out, env=env, cwd=manifest.parent)
    assert process.stdout is not None
    while True:
        line = (await process.stdout.readline()).decode()
        if not line:
            raise SystemExit(f"shoal up exited early; see {log}")
        m = re.search(r"ready in ([0-9.]+)s: gateway (\S+),", line)
        if m:
            wall = time.perf_counter() - started
            cpu = tree_cpu(process.pid)
            await probe(m.group(2))
            return Started(process, spawned_at, wall, float(m.group(1)),
                           time.perf_counter() - started, m.group(2), cpu)


def print_timeline(path: Path, started: Started) -> None:
    """The marks of every process (``shoal.control.timeline``) from the spawn of `shoal up`,
    and each process's CPU seconds at the ready line."""
    pids: dict[int, str] = {started.process.pid: "cli"}
    print(f"{'wall s':>7} {'pid':>7} {'cpu s':>6}  mark")
    for at, pid, cpu, what in read_timeline(path):
        print(f"{at - started.spawned_at:7.3f} {pid:7d} {cpu:6.2f}  {what}")
        if what.startswith("instance:") and "forked" not in what:
            pids.setdefault(pid, what.split()[1])
        elif what.startswith("forkserver:"):
            pids[pid] = "forkserver"
    total = sum(s for _, s in started.cpu.values())
    print(f"CPU at the ready line: {total:.2f} s in {len(started.cpu)} processes: " + ", ".join(
        f"{pids.get(pid, name)} {s:.2f}" for pid, (name, s) in sorted(started.cpu.items())))


async def orders(gateway: str, n: int, concurrency: int) -> tuple[float, float]:
    """Place ``n`` orders; (seconds until all accepted, seconds until all settled/failed).

    The client is the mesh's own HTTP/1.1 pool (``shoal.mesh.http1``) on uvloop: httpx's
    AsyncClient spends milliseconds of CPU per request at this concurrency (its pool polls
    every idle connection on each checkout), so with it this figure measured the client:
    about 20 orders/s, whatever the shop could do.
    """
    todo = list(range(n))
    encode = msgspec.json.encode
    headers = [(b"content-type", b"application/json")]
    async with ConnectionPool(gateway.removeprefix("http://"),
                              max_connections=concurrency) as client:
        async def worker() -> None:
            while todo:
                i = todo.pop()
                order = {"order_id": f"b{i}", "customer": f"c{i % 101}", "sku": f"s{i % 7}",
                         "quantity": 1, "amount": i % 900}
                r = await client.request("POST", "/orders", headers, encode(order))
                body = await r.aread()
                if r.status != 202:
                    raise SystemExit(f"order {i}: HTTP {r.status} {body[:200]!r}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        accepted = time.perf_counter() - started
        while True:
            r = await client.request("GET", "/orders")
            counts = msgspec.json.decode(await r.aread())["counts"]
            if counts.get("settled", 0) + counts.get("failed", 0) >= n:
                return accepted, time.perf_counter() - started
            # GET /orders lists every order's view (store list + JSON of thousands of
            # records on the projecting instance): polled every 50 ms, it took about half
            # a core from the pipeline it measures. 250 ms bounds the error at 0.25 s.
            await asyncio.sleep(0.25)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=2000, help="0: time the start only")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--timeline", action="store_true",
                        help="print every process's start-up marks and CPU")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="keep PYTHONDONTWRITEBYTECODE if set (every process then "
                             "compiles Shoal from source)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": f"{SHOP}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "SHOP_INITIAL_STOCK": str(10 * max(args.orders, 1))}
    cached = not (args.no_bytecode_cache and env.get("PYTHONDONTWRITEBYTECODE"))
    if cached:  # as where Shoal was installed by pip: its modules' bytecode is cached
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        compiling = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "compileall", "-q", str(ROOT / "shoal"), str(SHOP), env=env,
            stdout=subprocess.DEVNULL)
        if await compiling.wait():
            raise SystemExit("python -m compileall failed")
    load = os.getloadavg()[0]
    floors = [import_floor(env)]
    with tempfile.TemporaryDirectory(prefix="shoal-bench-shop-") as tmp:
        manifest = Path(tmp) / "shoal.yaml"
        manifest.write_text(MANIFEST.format(dir=tmp))
        timeline = Path(tmp) / "timeline"
        env[TIMELINE_ENV] = str(timeline)
        s = await up(manifest, env, Path(tmp) / "up.log")
        try:
            if args.timeline:
                print_timeline(timeline, s)
            if args.orders:
                accepted, settled = await orders(s.gateway, args.orders, args.concurrency)
        finally:
            s.process.send_signal(signal.SIGTERM)
            await s.process.wait()
    floors.append(import_floor(env))  # before and after: the better of the two is the peer
    floor = min(floors)
    wall = s.ready_wall
    cpu = sum(c for _, c in s.cpu.values())
    result = {
        "bench": "shop", "orders": args.orders, "concurrency": args.concurrency,
        "up_ready_s": round(wall, 2), "up_ready_own_s": s.ready_own,
        "first_request_s": round(s.first_request, 2), "cpu_to_ready_s": round(cpu, 2),
        "import_floor_s": round(floor, 2), "up_over_floor": round(wall / floor, 2),
        "load_1m": round(load, 2), "bytecode_cache": cached,
    }
    print(f"shoal up -> ready      {wall:6.2f} s   (its own figure {s.ready_own:.2f} s; a "
          f"request through the gateway answered at {s.first_request:.2f} s)")
    print(f"CPU to ready           {cpu:6.2f} s   (every process of shoal up)")
    print(f"import floor (peer)    {floor:6.2f} s   ratio {wall / floor:.2f}x   "
          f"(load average {load:.2f} at the start; bytecode {'cached' if cached else 'not cached'}"
          ")")
    if args.orders:
        result.update({"accepted_per_s": round(args.orders / accepted),
                       "settled_per_s": round(args.orders / settled),
                       "settled_over_accepted": round(accepted / settled, 2)})
        print(f"orders accepted        {result['accepted_per_s']:6d} /s (gateway + orders, "
              f"peer)")
        print(f"orders settled e2e     {result['settled_per_s']:6d} /s   ratio "
              f"{result['settled_over_accepted']:.2f} of accepted")
    print(json.dumps(result))


if __name__ == "__main__":
    uvloop.run(main())
