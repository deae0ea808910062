"""What strict mTLS costs on service-to-service calls over keep-alive.

    python bench/mesh_tls.py [--requests 20000] [--concurrency 32] [--rounds 3]
                             [--backend service|http-server]

One backend process on uvloop answers ``ok`` at once - by default a ``shoal.Service``
served as an instance serves it (what a service-to-service call reaches), with
``--backend http-server`` the project's ``HttpServer`` (the gateway's and the sidecar's
server). It listens twice: in plaintext, and with strict mutual TLS (``MeshTLS`` server
context: TLS 1.3, client certificate required against the trust bundle). This process, also on
uvloop, calls it through ``MeshClient`` - the whole proxyless stack - once without TLS
(``plain``, the peer) and once with ``tls=MeshTLS(...)`` (``mtls``: client certificate,
the server's SPIFFE id checked), interleaved over ``--rounds`` rounds after a warm-up,
so connections are open and handshakes are not what is measured: this is the steady
cost of TLS records on keep-alive connections (the server keeps idle connections for
the whole run, and ``connections opened`` shows that no round reconnected). Identities
come from a fresh CA, issued from CSRs like an instance's.

Figures per mode: ``--concurrency`` closed-loop workers (req/s, p50, client and server
CPU per request) and sequential calls (p50), medians of the rounds. Each round runs a
phase in both modes back to back, in alternating order; the headline is the median of
the rounds' throughput ratios mtls/plain (the target: at least 0.85, i.e. at most 15%
lower). The last line is one JSON object; the
load average before and after is printed, since the machine is shared.

What the cost is (measured per side with ``perf``, ``strace -c`` and cProfile): each side
encrypts one record and decrypts one per call - the same ``send``/``recv`` as plaintext,
no extra Python call. TLS reads go through a ``BufferedProtocol`` into one reused buffer
(``shoal.mesh.tls_reads``: the loop's SSL layer otherwise allocates 256 KiB per read), and
a Service's response goes out as one record (``shoal.mesh.tls_writes``: uvicorn writes
head and body apart). The four records of a call cost about 8 us of CPU in isolation
(TLS_AES_256_GCM_SHA384); in the full stack each side's CPU per call rises 20-47 us, mostly
as the interpreter running slower (cache interference with OpenSSL is the likely reason;
this VM has no hardware counters to show it). Kernel TLS would move the record work out of
the process; this kernel has no ``tls`` ULP. Figures per run are in the README and the
commit history.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _measure import closed_loop

from shoal.control.ca import CertificateAuthority
from shoal.gateway.server import HttpServer, Request, Response, ServerLimits
from shoal.mesh.client import MeshClient
from shoal.mesh.registry import Instance, Registry
from shoal.mesh.security import Identity, MeshTLS
from shoal.mesh.security.identity import make_csr, new_key
from shoal.mesh.security.spiffe import SpiffeId
from shoal.store import connect_store

OK = Response(b"ok")
ROOT = str(Path(__file__).resolve().parent.parent)


def issue(ca: CertificateAuthority, service: str) -> Identity:
    from cryptography.hazmat.primitives import serialization

    key = new_key()
    cert = ca.sign(make_csr(key, SpiffeId(ca.trust_domain, service)), service)
    return Identity.from_pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()), ca.bundle_pem())


# -- the backend process ------------------------------------------------------------------
def answer(request: Request) -> Response:
    """``ok``; on ``/cpu`` this process's CPU seconds so far (read between phases)."""
    if request.path == "/cpu":
        return Response(repr(time.process_time()).encode())
    return OK


async def serve(directory: str, backend: str) -> None:
    d = Path(directory)
    identity = Identity.load(d / "cert.pem", d / "key.pem", d / "bundle.pem")
    if backend == "service":
        await serve_service(identity)
        return
    # Idle connections of one mode wait while the other runs: keep them all run long.
    limits = ServerLimits(keep_alive_timeout=3600)
    plain = HttpServer(answer, limits=limits)
    mtls = HttpServer(answer, limits=limits, ssl=MeshTLS(identity).server_context)
    await plain.start("127.0.0.1", 0)
    await mtls.start("127.0.0.1", 0)
    print(json.dumps({"plain": plain.port, "mtls": mtls.port}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await plain.shutdown(1)
    await mtls.shutdown(1)


async def serve_service(identity: Identity) -> None:
    """The same two listeners, served as an instance serves a ``shoal.Service``: its app
    through the SDK's uvicorn server (``shoal.service._UvicornServer``: PeerIdentityProtocol,
    under mTLS behind ``buffered_reads``), with a handler answering ``ok``."""
    import socket

    from starlette.responses import Response as StarletteResponse

    from shoal.service import Service, _UvicornServer

    svc = Service("echo")

    @svc.get("/")
    async def ok(request: Any) -> StarletteResponse:
        return StarletteResponse(b"ok")

    @svc.get("/cpu")
    async def cpu(request: Any) -> StarletteResponse:
        return StarletteResponse(repr(time.process_time()).encode())

    ports, running = {}, []
    for mode, context in (("plain", None), ("mtls", MeshTLS(identity).server_context)):
        sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Service._serve does
        sock.setblocking(False)
        server = _UvicornServer(svc, sock, ssl=context)
        server.uvicorn.config.timeout_keep_alive = 3600  # idle while the other mode runs
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        ports[mode] = sock.getsockname()[1]
        running.append((server, task))
    print(json.dumps(ports), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for server, task in running:
        server.should_exit = True
        await task


# -- the client ------------------------------------------------------------------------------
async def bench(args: argparse.Namespace) -> dict[str, Any]:
    ca = CertificateAuthority.create()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-tls-") as directory:
        server_id = issue(ca, "echo")
        for name, data in (("cert.pem", server_id.certificate_pem),
                           ("key.pem", server_id.key_pem), ("bundle.pem", server_id.bundle_pem)):
            fd = os.open(Path(directory) / name, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", directory, "--backend", args.backend,
            env={**os.environ, "PYTHONPATH": ROOT},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None and proc.stdin is not None
        async with asyncio.timeout(20):
            ports = json.loads(await proc.stdout.readline())
    store = await connect_store(f"memory://bench-mesh-tls-{os.getpid()}")
    registry = Registry(store)
    await registry.register(Instance(id="plain-1", service="plain",
                                     address=f"127.0.0.1:{ports['plain']}"))
    await registry.register(Instance(id="echo-1", service="echo",
                                     address=f"127.0.0.1:{ports['mtls']}"))
    plain = await MeshClient.connect(store)
    mtls = await MeshClient.connect(store, tls=MeshTLS(issue(ca, "caller")))
    for mesh, service in ((plain, "plain"), (mtls, "echo")):
        await mesh.cache.wait_for(service, timeout=5)

    async def plain_get() -> bytes:
        return await (await plain.get("http://plain/")).aread()

    async def mtls_get() -> bytes:
        return await (await mtls.get("http://echo/")).aread()

    async def server_cpu() -> float:
        return float(await (await plain.get("http://plain/cpu")).aread())

    modes = {"plain": plain_get, "mtls": mtls_get}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {m: {} for m in modes}
    try:
        for get in modes.values():  # warm up: connections (and handshakes) happen here
            await closed_loop(get, 2000, args.concurrency, b"ok")
        for i in range(args.rounds):
            for phase, conc, count in (("sequential", 1, args.requests // 4),
                                       ("concurrent", args.concurrency, args.requests)):
                # The two modes back to back, in alternating order: on a shared machine
                # the load drifts, and each round's ratio compares neighbours in time.
                for name in (("plain", "mtls") if i % 2 == 0 else ("mtls", "plain")):
                    before = await server_cpu()
                    figures = await closed_loop(modes[name], count, conc, b"ok")
                    figures["server_cpu_us"] = round(
                        (await server_cpu() - before) / count * 1e6, 1)
                    runs[name].setdefault(phase, []).append(figures)
        opened = {name: sum(p.opened for p in mesh.upstream(svc)._pools.values())
                  for name, mesh, svc in (("plain", plain, "plain"), ("mtls", mtls, "echo"))}
    finally:
        await plain.aclose()
        await mtls.aclose()
        await registry.close()
        await store.close()
        proc.stdin.close()
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def median_run(samples: list[dict[str, float]]) -> dict[str, float]:
        return {k: statistics.median(s[k] for s in samples) for k in samples[0]}

    out: dict[str, Any] = {name: {phase: median_run(s) for phase, s in phases.items()}
                           for name, phases in runs.items()}
    out["connections_opened"] = opened
    out["round_ratios"] = {phase: [round(m["rps"] / p["rps"], 3) for p, m in zip(
        runs["plain"][phase], runs["mtls"][phase], strict=True)] for phase in runs["plain"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", choices=("http-server", "service"), default="service",
                    help="what serves the calls: a shoal.Service as an instance serves it "
                         "(the default: what service-to-service calls reach) or the "
                         "project's HttpServer (the gateway's and the sidecar's server)")
    ap.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        uvloop.run(serve(args.serve, args.backend))
        return
    load_before = os.getloadavg()
    res = uvloop.run(bench(args))
    res["load_average"] = {"before": [round(x, 2) for x in load_before],
                           "after": [round(x, 2) for x in os.getloadavg()]}
    plain, mtls = res["plain"], res["mtls"]
    ratios = res["round_ratios"]
    headline = {  # the median of the rounds' ratios (each round: the modes back to back)
        "throughput_ratio_mtls_over_plain": round(statistics.median(ratios["concurrent"]), 3),
        "sequential_ratio_mtls_over_plain": round(statistics.median(ratios["sequential"]), 3),
        # CPU per request, client + server, plain/mtls: what the throughput ratio is when
        # both are CPU-bound, and steadier than req/s on a loaded machine.
        "cpu_ratio_plain_over_mtls": round(
            (plain["concurrent"]["cpu_us"] + plain["concurrent"]["server_cpu_us"])
            / (mtls["concurrent"]["cpu_us"] + mtls["concurrent"]["server_cpu_us"]), 3),
        "added_p50_us_sequential": round(
            mtls["sequential"]["p50_us"] - plain["sequential"]["p50_us"], 1),
    }
    backend = ("project HttpServer" if args.backend == "http-server"
               else "shoal.Service (uvicorn)")
    print(f"\nMeshClient GET over keep-alive, {backend} backend in a subprocess, "
          f"uvloop, {os.cpu_count()} CPUs, TLS 1.3 ECDSA P-256, median of {args.rounds} rounds")
    print(f"{'':34} {'plain':>10} {'mtls':>10}")
    rows = [("sequential p50 us", "sequential", "p50_us"),
            ("sequential req/s", "sequential", "rps"),
            (f"concurrent({args.concurrency}) req/s", "concurrent", "rps"),
            (f"concurrent({args.concurrency}) p50 us", "concurrent", "p50_us"),
            (f"concurrent({args.concurrency}) client CPU us/req", "concurrent", "cpu_us"),
            (f"concurrent({args.concurrency}) server CPU us/req", "concurrent", "server_cpu_us"),
            ("sequential client CPU us/req", "sequential", "cpu_us"),
            ("sequential server CPU us/req", "sequential", "server_cpu_us")]
    for label, phase, key in rows:
        print(f"{label:34} {plain[phase][key]:>10} {mtls[phase][key]:>10}")
    print(f"{'connections opened':34} {res['connections_opened']['plain']:>10} "
          f"{res['connections_opened']['mtls']:>10}")
    for key, value in headline.items():
        print(f"{key:34} {value:>10}")
    for phase in ("concurrent", "sequential"):
        print(f"{phase + ' ratio per round':34} {ratios[phase]}")
    print(f"{'load average (1, 5, 15 min)':34} before {res['load_average']['before']}, "
          f"after {res['load_average']['after']}")
    print(json.dumps({"bench": "mesh_tls", "backend": args.backend, "requests": args.requests,
                      "concurrency": args.concurrency, "rounds": args.rounds,
                      "cpus": os.cpu_count(), **headline, **res}))


if __name__ == "__main__":
    main()
