"""Benchmark the event bus against Redis Streams and NATS JetStream, in one run.

    python bench/bus.py [--events 100000] [--rounds 3] [--rate 5000] [--seconds 4]
    python bench/bus.py --broker nats://HOST:PORT   # or --broker nats: start a nats-server

With ``--broker nats...``: Shoal's bus on that NATS JetStream (broker and store) against
the raw nats-py client doing the same work on the same server, in interleaved rounds;
the ratios are Shoal / raw client (the overhead target: >= 0.85).
    python bench/bus.py --observability [--events 100000] [--rounds 5]

With ``--observability``: Shoal's bus on SQLite alone, with metrics and tracing off against
both on (``enable_metrics()``; ``enable_tracing_from_env()`` at the default sampling ratio,
exporting OTLP/HTTP in batches to a local collector stub process), in interleaved rounds
in this process (alternating which goes first; a fresh log each round); the JSON line
has ``observability_ratios`` (on / off medians of publish, publish (single), consume:
1.0 is free) and the per-round ratios. OpenTelemetry is loaded before the first round, so
all rounds share one heap: what its ~12,000 objects add to each full collection of the
garbage collector (in a process that does not ``gc.freeze()`` its start-up heap, as the
gateway's workers do) is a cost of loading the SDK, not measured here.
    python bench/bus.py --broker redis://HOST:PORT   # or --broker redis: start a redis-server

With ``--broker redis...``: Shoal's bus on that Redis (broker and store; a fresh key
prefix per round) against the raw redis-py client doing the same work on the same server
(pipelined XADD; XREADGROUP + XACK), in interleaved rounds; ratios are Shoal / raw client
(the overhead target: >= 0.85). ``--broker redis`` starts redis-server with
``appendonly yes``, ``appendfsync everysec``.

Figures (175-byte payloads, uvloop everywhere):
* publish: events/s appended durably, batches of 1,000 (Shoal ``publish_many``; Redis
  pipelined XADD; NATS ``publish_async`` windows);
* publish (single): Shoal's ``publish`` called 1,000 at a time concurrently (group commit);
* consume: events/s read and acknowledged through a consumer group (Shoal subscription
  with offset commits; Redis XREADGROUP + XACK; NATS pull consumer, ack-all per batch);
* e2e: latency percentiles at a fixed rate with the producer in another process;
* idle: CPU share of one core used by an idle Shoal consumer process.
Throughput runs in interleaved rounds (Shoal, Redis, NATS, again...) and reports each
figure's median, because this 2-core machine is shared and noisy. The last line is one
JSON object with every figure and the ratios Shoal / peer.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import nats_server, otlp_collector, redis_server

PAYLOAD = "x" * 175
BATCH = 1000


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    if not s:
        return {}
    pick = lambda q: round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 3)  # noqa: E731
    return {"p50_ms": pick(0.5), "p99_ms": pick(0.99), "p999_ms": pick(0.999)}


# -- Shoal ---------------------------------------------------------------------------
async def shoal_throughput(url: str, n: int, cpu: bool = False) -> dict[str, float]:
    """Events/s of each phase; ``cpu``: also this process's CPU microseconds per event
    (``*_cpu_us``, every thread: the figure a shared machine distorts least)."""
    from shoal.events import EventBus, Message

    used: dict[str, float] = {}
    async with EventBus.connect(url) as bus:
        await bus.create_topic("bench", partitions=8)
        msgs = [Message(PAYLOAD, key=f"k{i % 64}") for i in range(BATCH)]
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n // BATCH):
            await bus.publish_many("bench", msgs)
        publish = n / (time.perf_counter() - t)
        used["publish_cpu_us"] = (time.process_time() - c) / n * 1e6

        await bus.create_topic("bench1", partitions=8)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n // BATCH // 2):
            await asyncio.gather(
                *(bus.publish("bench1", PAYLOAD, key=f"k{i % 64}") for i in range(BATCH))
            )
        single = (n // 2) / (time.perf_counter() - t)
        used["publish_single_cpu_us"] = (time.process_time() - c) / (n // 2) * 1e6

        done = asyncio.Event()
        count = 0

        async def handler(event: object) -> None:
            nonlocal count
            count += 1
            if count == n:
                done.set()

        t, c = time.perf_counter(), time.process_time()
        sub = await bus.subscribe("bench", "g", handler)
        await done.wait()
        await sub.close()  # includes the final offset commit
        consume = n / (time.perf_counter() - t)
        used["consume_cpu_us"] = (time.process_time() - c) / n * 1e6
    out = {"publish": publish, "publish_single": single, "consume": consume}
    return {**out, **used} if cpu else out


async def shoal_fsync_cost(directory: str, n: int) -> dict[str, float]:
    """What ``?fsync=1`` (synchronous=FULL, survives power loss) costs, against the default."""
    from shoal.events import EventBus, Message

    out: dict[str, float] = {}
    for name, query in (("default", ""), ("fsync", "?fsync=1")):
        async with EventBus.connect(f"sqlite:///{directory}/{name}.db{query}") as bus:
            await bus.create_topic("f", partitions=8)
            msgs = [Message(PAYLOAD, key=f"k{i % 64}") for i in range(BATCH)]
            t = time.perf_counter()
            for _ in range(n // BATCH):
                await bus.publish_many("f", msgs)
            out[f"{name}_publish"] = n / (time.perf_counter() - t)
            lat = []
            for i in range(300):
                t = time.perf_counter()
                await bus.publish("f", PAYLOAD, key=f"k{i}")
                lat.append(time.perf_counter() - t)
            out[f"{name}_single_p50_ms"] = percentiles(lat)["p50_ms"]
    return out


# -- Redis Streams ---------------------------------------------------------------------
async def redis_throughput(url: str, n: int, tag: str = "") -> dict[str, float]:
    import redis.asyncio as redis

    r = redis.from_url(url)
    stream = f"bench{tag}"
    await r.delete(stream)
    t = time.perf_counter()
    for _ in range(n // BATCH):
        pipe = r.pipeline(transaction=False)
        for i in range(BATCH):
            pipe.xadd(stream, {"k": f"k{i % 64}", "v": PAYLOAD})
        await pipe.execute()
    publish = n / (time.perf_counter() - t)
    await r.xgroup_create(stream, "g", id="0")
    got = 0
    t = time.perf_counter()
    while got < n:
        resp = await r.xreadgroup("g", "c", {stream: ">"}, count=BATCH)
        ids = [mid for _, entries in resp for mid, _ in entries]
        got += len(ids)
        if ids:
            await r.xack(stream, "g", *ids)
    consume = n / (time.perf_counter() - t)
    await r.aclose()
    return {"publish": publish, "consume": consume}


# -- NATS JetStream --------------------------------------------------------------------
async def nats_throughput(url: str, n: int, tag: str = "") -> dict[str, float]:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=4 * BATCH)
    await js.add_stream(name=f"bench{tag}", subjects=[f"bench{tag}.*"])
    data = PAYLOAD.encode()
    t = time.perf_counter()
    for _ in range(n // BATCH):
        futs = [await js.publish_async(f"bench{tag}.k{i % 64}", data) for i in range(BATCH)]
        await asyncio.gather(*futs)
    publish = n / (time.perf_counter() - t)
    sub = await js.pull_subscribe(
        f"bench{tag}.*", "g", config=ConsumerConfig(ack_policy=AckPolicy.ALL, max_ack_pending=-1)
    )
    got = 0
    t = time.perf_counter()
    while got < n:
        msgs = await sub.fetch(BATCH, timeout=5)
        got += len(msgs)
        await msgs[-1].ack()
    consume = n / (time.perf_counter() - t)
    await nc.close()
    return {"publish": publish, "consume": consume}


# -- end-to-end latency across processes -----------------------------------------------
async def produce_at_rate(backend: str, url: str, rate: int, seconds: float) -> None:
    """The producer process: ``rate`` events/s for ``seconds``, each carrying its send time."""
    total = int(rate * seconds)
    tick = 0.001
    per_tick = max(1, int(rate * tick))
    if backend == "shoal":
        from shoal.events import EventBus

        bus = await EventBus.connect(url)

        async def send(first: int, last: int) -> None:
            await asyncio.gather(*(
                bus.publish("e2e", {"t": time.time(), "p": PAYLOAD}, key=f"k{i % 64}")
                for i in range(first, last)
            ))
    elif backend == "redis":
        import redis.asyncio as redis

        r = redis.from_url(url)

        async def send(first: int, last: int) -> None:
            pipe = r.pipeline(transaction=False)
            for _ in range(first, last):
                pipe.xadd("e2e", {"t": repr(time.time()), "v": PAYLOAD})
            await pipe.execute()
    else:
        import nats

        nc = await nats.connect(url)
        js = nc.jetstream()

        async def send(first: int, last: int) -> None:
            await asyncio.gather(*(
                js.publish(f"e2e.k{i % 64}", f"{time.time()!r} {PAYLOAD}".encode())
                for i in range(first, last)
            ))
    start = time.perf_counter()
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * rate) + per_tick)
        if due > sent:
            await send(sent, due)
            sent = due
        await asyncio.sleep(tick)
    await asyncio.sleep(0.5)


async def e2e(backend: str, url: str, rate: int, seconds: float) -> dict[str, float]:
    total = int(rate * seconds)
    lat: list[float] = []
    done = asyncio.Event()
    cleanup = None
    if backend == "shoal":
        from shoal.events import EventBus

        bus = await EventBus.connect(url)
        await bus.create_topic("e2e", partitions=8)

        async def handler(event) -> None:  # type: ignore[no-untyped-def]
            lat.append(time.time() - event.data["t"])
            if len(lat) >= total:
                done.set()

        await bus.subscribe("e2e", "g", handler, start="latest")
        cleanup = bus.close
    elif backend == "redis":
        import redis.asyncio as redis

        r = redis.from_url(url)
        await r.delete("e2e")  # a fresh stream each round
        await r.xgroup_create("e2e", "g", id="$", mkstream=True)

        async def reader() -> None:
            while len(lat) < total:
                resp = await r.xreadgroup("g", "c", {"e2e": ">"}, count=BATCH, block=1000)
                now = time.time()
                ids = []
                for _, entries in resp or []:
                    for mid, fields in entries:
                        lat.append(now - float(fields[b"t"]))
                        ids.append(mid)
                if ids:
                    await r.xack("e2e", "g", *ids)
            done.set()

        task = asyncio.create_task(reader())
        cleanup = r.aclose
    else:
        import nats
        from nats.js.api import AckPolicy, ConsumerConfig

        nc = await nats.connect(url)
        js = nc.jetstream()
        try:
            await js.delete_stream("e2e")  # a fresh stream each round
        except nats.js.errors.NotFoundError:
            pass
        await js.add_stream(name="e2e", subjects=["e2e.*"])
        sub = await js.pull_subscribe(
            "e2e.*", "g", config=ConsumerConfig(ack_policy=AckPolicy.ALL, max_ack_pending=-1)
        )

        async def reader() -> None:
            while len(lat) < total:
                try:
                    msgs = await sub.fetch(BATCH, timeout=1)
                except nats.errors.TimeoutError:
                    continue
                now = time.time()
                for m in msgs:
                    lat.append(now - float(m.data.split(b" ", 1)[0]))
                await msgs[-1].ack()
            done.set()

        task = asyncio.create_task(reader())
        cleanup = nc.close
    producer = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--produce", backend, url, str(rate), str(seconds)
    )
    try:
        await asyncio.wait_for(done.wait(), seconds * 3 + 10)
    finally:
        await producer.wait()
        if backend != "shoal":
            task.cancel()
        await cleanup()
    warm = lat[int(len(lat) * 0.05) :]  # skip connection warm-up
    return percentiles(warm)


def idle_cpu(url: str) -> float:
    code = (
        "import asyncio\nfrom shoal.events import EventBus\n"
        "async def main():\n"
        f"    async with EventBus.connect({url!r}) as bus:\n"
        "        await bus.subscribe('quiet', 'g', lambda e: None)\n"
        "        print('ready', flush=True)\n"
        "        await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)

        def cpu() -> float:
            f = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

        c0, t0 = cpu(), time.monotonic()
        time.sleep(3)
        return (cpu() - c0) / (time.monotonic() - t0)
    finally:
        proc.kill()
        proc.wait()


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds."""
    return {k: statistics.median(run[k] for run in runs) for k in runs[0]}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


async def main(args: argparse.Namespace) -> dict[str, object]:
    n = args.events
    result: dict[str, object] = {
        "events": n, "rounds": args.rounds, "payload_bytes": len(PAYLOAD),
        "cores": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory() as d, redis_server() as rurl, nats_server() as nurl:
        rounds: dict[str, list[dict[str, float]]] = {"shoal": [], "redis": [], "nats": []}
        for r in range(args.rounds):  # interleaved rounds; each figure is the median
            os.mkdir(f"{d}/round{r}")  # a fresh log and store: group offsets start at zero
            rounds["shoal"].append(await shoal_throughput(f"sqlite:///{d}/round{r}/events.db", n))
            if rurl:
                rounds["redis"].append(await redis_throughput(rurl, n, tag=str(r)))
            if nurl:
                rounds["nats"].append(await nats_throughput(nurl, n, tag=str(r)))
        shoal = median_of(rounds["shoal"])
        peers = {name: median_of(runs) for name, runs in rounds.items() if runs and name != "shoal"}
        result["shoal"] = {k: round(v) for k, v in shoal.items()}
        print(f"shoal sqlite    publish {shoal['publish']:>10,.0f}/s  "
              f"single {shoal['publish_single']:>10,.0f}/s  consume {shoal['consume']:>10,.0f}/s")
        for name, fig in peers.items():
            result[name] = {k: round(v) for k, v in fig.items()}
            print(f"{name:<15} publish {fig['publish']:>10,.0f}/s  "
                  f"{'':>18}  consume {fig['consume']:>10,.0f}/s")
        fsync = await shoal_fsync_cost(d, n // 4)
        result["shoal_fsync"] = {k: round(v, 3) for k, v in fsync.items()}
        print(f"shoal fsync=1   publish {fsync['fsync_publish']:>10,.0f}/s "
              f"(default {fsync['default_publish']:,.0f}/s); one publish p50 "
              f"{fsync['fsync_single_p50_ms']} ms (default {fsync['default_single_p50_ms']} ms)")
        runs: dict[str, list[dict[str, float]]] = {"shoal": [], "redis": [], "nats": []}
        for r in range(args.rounds):  # interleaved too; each percentile is the median
            e2e_url = f"sqlite:///{d}/round{r}/e2e.db"
            runs["shoal"].append(await e2e("shoal", e2e_url, args.rate, args.seconds))
            for name, peer_url in (("redis", rurl), ("nats", nurl)):
                if peer_url:
                    try:
                        runs[name].append(await e2e(name, peer_url, args.rate, args.seconds))
                    except Exception as e:  # an overloaded peer: report it, keep the run
                        print(f"e2e round {r} on {name} failed: {e!r}", file=sys.stderr)
        lat = {n: {k: round(v, 3) for k, v in median_of(r).items()} for n, r in runs.items() if r}
        for name, p in lat.items():
            print(f"e2e @{args.rate}/s {name:<7} {p}")
        result["e2e"] = {"rate": args.rate, **lat}
        result["idle_cpu_share"] = round(idle_cpu(f"sqlite:///{d}/idle.db"), 4)
        print(f"idle consumer: {result['idle_cpu_share']:.2%} of one core")
    result["ratios"] = {
        f"{metric}_vs_{peer}": ratio(shoal[metric], peers[peer][metric])
        for peer in peers
        for metric in ("publish", "consume")
    }
    return result


def observability(on: bool) -> None:
    """Metrics and tracing both on (tracing as ``OTEL_*`` says), or both off."""
    from shoal.observability import disable_metrics, enable_metrics
    from shoal.observability.tracing import disable_tracing, enable_tracing_from_env

    disable_tracing()  # flushes the previous round's spans
    disable_metrics()
    if on:
        enable_metrics()
        if enable_tracing_from_env("bench-bus") is None:
            raise SystemExit("--observability: OTEL_EXPORTER_OTLP_ENDPOINT is not set")


async def observability_main(args: argparse.Namespace) -> dict[str, object]:
    """Shoal's bus with observability off against metrics + tracing on, same run."""
    n = args.events
    result: dict[str, object] = {"events": n, "rounds": args.rounds, "broker": "sqlite",
                                 "payload_bytes": len(PAYLOAD), "cores": os.cpu_count(),
                                 "load_average_1m": [round(os.getloadavg()[0], 2)]}
    rounds: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as d, otlp_collector() as endpoint:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        result["tracing"] = {"exporter": "OTLP/HTTP to a local collector stub",
                             "sampler": os.environ.get("OTEL_TRACES_SAMPLER", "default"),
                             "sampler_arg": os.environ.get("OTEL_TRACES_SAMPLER_ARG")}
        try:
            # Loaded once before the rounds, so every round runs with the same heap: else
            # only the first "off" round would lack OpenTelemetry's ~12,000 objects, which
            # each full collection of the garbage collector scans (a cost of loading the
            # SDK at all, not of the hooks; see the module docstring).
            observability(True)
            observability(False)
            for r in range(args.rounds):
                for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    observability(mode == "on")
                    gc.collect()  # each round starts with no garbage left by the last
                    os.mkdir(f"{d}/{mode}{r}")
                    fig = await shoal_throughput(f"sqlite:///{d}/{mode}{r}/events.db", n,
                                                 cpu=True)
                    rounds[mode].append(fig)
                    print(f"  round {r} {mode:3} " + "  ".join(
                        f"{k} {v:,.1f}" for k, v in fig.items()), file=sys.stderr)
        finally:
            observability(False)
            del os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]
    off, on = median_of(rounds["off"]), median_of(rounds["on"])
    result["off"] = {k: round(v, 2) for k, v in off.items()}
    result["on"] = {k: round(v, 2) for k, v in on.items()}

    def share(a: dict[str, float], b: dict[str, float], k: str) -> float:
        """on / off for a rate, off / on for CPU per event: 1.0 is free either way."""
        return round(a[k] / b[k] if k.endswith("_cpu_us") else b[k] / a[k], 3)

    result["observability_ratios"] = {k: share(off, on, k) for k in off}
    result["observability_ratios_per_round"] = {
        k: [share(a, b, k) for a, b in zip(rounds["off"], rounds["on"], strict=True)]
        for k in off}
    result["load_average_1m"].append(round(os.getloadavg()[0], 2))  # type: ignore[attr-defined]
    for mode, fig in (("off", off), ("on", on)):
        print(f"observability {mode:3}  publish {fig['publish']:>10,.0f}/s "
              f"({fig['publish_cpu_us']:.2f} us CPU/event)  single "
              f"{fig['publish_single']:>10,.0f}/s ({fig['publish_single_cpu_us']:.2f} us)  "
              f"consume {fig['consume']:>10,.0f}/s ({fig['consume_cpu_us']:.2f} us)")
    print("on against off (1.0 is free):", result["observability_ratios"])
    return result


async def publish_cpu_per_event(base: str, n: int) -> dict[str, float]:
    """This process's CPU per event published in batches of 1,000 (load-independent)."""
    import uuid

    import nats

    from shoal.events import EventBus, Message

    tag = uuid.uuid4().hex[:8]
    async with EventBus.connect(f"{base}/cpu{tag}") as bus:
        await bus.create_topic("cpu", partitions=8)
        msgs = [Message(PAYLOAD, key=f"k{i % 64}") for i in range(BATCH)]
        c = time.process_time()
        for _ in range(n // BATCH):
            await bus.publish_many("cpu", msgs)
        shoal = (time.process_time() - c) / n * 1e6
    nc = await nats.connect(base)
    js = nc.jetstream(publish_async_max_pending=4 * BATCH)
    await js.add_stream(name=f"cpu{tag}", subjects=[f"cpu{tag}.*"])
    data = PAYLOAD.encode()
    c = time.process_time()
    for _ in range(n // BATCH):
        futs = [await js.publish_async(f"cpu{tag}.k{i % 64}", data) for i in range(BATCH)]
        await asyncio.gather(*futs)
    raw = (time.process_time() - c) / n * 1e6
    await nc.close()
    return {"shoal": round(shoal, 1), "nats_py": round(raw, 1)}


async def nats_broker_main(args: argparse.Namespace) -> dict[str, object]:
    """Shoal on ``--broker`` against the raw client of that backend, same server, same run."""
    import contextlib
    import uuid

    n = args.events
    result: dict[str, object] = {"events": n, "rounds": args.rounds, "broker": args.broker,
                                 "payload_bytes": len(PAYLOAD), "cores": os.cpu_count()}
    with contextlib.ExitStack() as stack:
        url = args.broker
        if url == "nats":
            url = stack.enter_context(nats_server())
            if url is None:
                raise SystemExit("nats-server not installed")
        if not url.startswith("nats://"):
            raise SystemExit(f"--broker: expected nats://HOST:PORT or nats, got {url!r}")
        base = url.rstrip("/")
        rounds: dict[str, list[dict[str, float]]] = {"shoal": [], "raw": []}
        for r in range(args.rounds):
            run = uuid.uuid4().hex[:8]
            rounds["shoal"].append(await shoal_throughput(f"{base}/bench{r}_{run}", n))
            rounds["raw"].append(await nats_throughput(base, n, tag=f"{r}_{run}"))
        shoal, raw = median_of(rounds["shoal"]), median_of(rounds["raw"])
        cpu = await publish_cpu_per_event(base, n // 2)
    result["publish_client_cpu_us_per_event"] = cpu
    print(f"client CPU per published event: shoal {cpu['shoal']} us, "
          f"raw nats-py {cpu['nats_py']} us")
    result["shoal"] = {k: round(v) for k, v in shoal.items()}
    result["nats_py"] = {k: round(v) for k, v in raw.items()}
    print(f"shoal on nats   publish {shoal['publish']:>10,.0f}/s  "
          f"single {shoal['publish_single']:>10,.0f}/s  consume {shoal['consume']:>10,.0f}/s")
    print(f"raw nats-py     publish {raw['publish']:>10,.0f}/s  {'':>18}  "
          f"consume {raw['consume']:>10,.0f}/s")
    result["ratios"] = {f"{m}_vs_nats_py": ratio(shoal[m], raw[m]) for m in ("publish", "consume")}
    print("shoal / raw nats-py:", result["ratios"])
    return result


async def redis_broker_main(args: argparse.Namespace) -> dict[str, object]:
    """Shoal on ``--broker redis...`` against raw redis-py on the same server, same run."""
    import contextlib
    import uuid

    n = args.events
    result: dict[str, object] = {"events": n, "rounds": args.rounds, "broker": args.broker,
                                 "payload_bytes": len(PAYLOAD), "cores": os.cpu_count()}
    with contextlib.ExitStack() as stack:
        url = args.broker
        if url == "redis":
            url = stack.enter_context(redis_server(durable=True))
            if url is None:
                raise SystemExit("redis-server not installed")
        if not url.startswith("redis://"):
            raise SystemExit(f"--broker: expected redis://HOST:PORT or redis, got {url!r}")
        sep = "&" if "?" in url else "?"
        rounds: dict[str, list[dict[str, float]]] = {"shoal": [], "raw": []}
        for r in range(args.rounds):  # interleaved rounds; each figure is the median
            run = uuid.uuid4().hex[:8]
            rounds["shoal"].append(await shoal_throughput(f"{url}{sep}prefix=b{r}_{run}", n))
            rounds["raw"].append(await redis_throughput(url, n, tag=f"{r}_{run}"))
        shoal, raw = median_of(rounds["shoal"]), median_of(rounds["raw"])
        lat = {
            "shoal": await e2e("shoal", f"{url}{sep}prefix=e2e_{uuid.uuid4().hex[:8]}",
                               args.rate, args.seconds),
            "redis_py": await e2e("redis", url, args.rate, args.seconds),
        }
        result["idle_cpu_share"] = round(
            idle_cpu(f"{url}{sep}prefix=idle_{uuid.uuid4().hex[:8]}"), 4
        )
    result["shoal"] = {k: round(v) for k, v in shoal.items()}
    result["redis_py"] = {k: round(v) for k, v in raw.items()}
    print(f"shoal on redis  publish {shoal['publish']:>10,.0f}/s  "
          f"single {shoal['publish_single']:>10,.0f}/s  consume {shoal['consume']:>10,.0f}/s")
    print(f"raw redis-py    publish {raw['publish']:>10,.0f}/s  {'':>18}  "
          f"consume {raw['consume']:>10,.0f}/s")
    for name, p in lat.items():
        print(f"e2e @{args.rate}/s {name:<8} {p}")
    result["e2e"] = {"rate": args.rate, **lat}
    result["ratios"] = {
        f"{m}_vs_redis_py": ratio(shoal[m], raw[m]) for m in ("publish", "consume")
    }
    print(f"idle consumer on redis: {result['idle_cpu_share']:.2%} of one core")
    print("shoal / raw redis-py:", result["ratios"])
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--produce":
        _, _, backend, url, rate, seconds = sys.argv
        uvloop.run(produce_at_rate(backend, url, int(rate), float(seconds)))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--observability", action="store_true",
                        help="Shoal alone, observability off against metrics + tracing on")
    parser.add_argument("--broker", help="nats://HOST:PORT or redis://HOST:PORT (or nats / "
                        "redis: start one): Shoal on it against that backend's raw client")
    args = parser.parse_args()
    if args.observability:
        run = observability_main(args)
    elif args.broker and args.broker.startswith("redis"):
        run = redis_broker_main(args)
    elif args.broker:
        run = nats_broker_main(args)
    else:
        run = main(args)
    print(json.dumps(uvloop.run(run)))
