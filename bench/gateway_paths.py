"""What the gateway's fast path saves: CPU per request, fast path vs coroutine path.

    python bench/gateway_paths.py [--slices 10] [--slice 0.5] [--connections 32]

One process on uvloop holds a trivial backend (a protocol answering a small JSON body),
one ``Gateway`` (round robin over two backend ports) behind two ``HttpServer``s, and a
load generator of ``--connections`` keep-alive clients (httptools). ``fast`` serves with
``gateway.handle`` (the server finds ``fast_handle``: no task per request); ``coroutine``
with ``functools.partial(Gateway.handle, gateway)`` (no fast handler: a task per request).
The load alternates between the two in short slices, so both see the same machine load,
and each slice's process CPU time (``time.process_time``: client, backend and gateway)
per request is recorded. Figures: the median per path, and their difference, which is
the gateway's own saving (client and backend cost the same in both). The last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

import httptools
import uvloop

from shoal.gateway.proxy import Gateway
from shoal.gateway.routes import RouteTable
from shoal.gateway.server import HttpServer
from shoal.mesh.registry import EndpointCache, Instance, Registry
from shoal.store import connect_store

BODY = b'{"message":"Hello, World!"}'
ANSWER = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
          % (len(BODY), BODY))
REQUEST = b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n"


class Backend(asyncio.Protocol):
    """Answers every request head it sees with ``ANSWER`` (requests have no body)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        data = self.pending + data
        n = data.count(b"\r\n\r\n")
        self.pending = data[data.rfind(b"\r\n\r\n") + 4:] if n else data
        if n:
            self.transport.write(ANSWER * n)


class Client(asyncio.Protocol):
    """One keep-alive client: sends the next request when a response completes."""

    def __init__(self, counts: list[int], running: list[bool]) -> None:
        self.counts = counts
        self.running = running
        self.parser = httptools.HttpResponseParser(self)
        self.idle: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.counts[0] += 1
        if self.running[0]:
            self.transport.write(REQUEST)
        elif self.idle is not None and not self.idle.done():
            self.idle.set_result(None)

    def go(self) -> None:
        self.idle = asyncio.get_running_loop().create_future()
        self.transport.write(REQUEST)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    backends = [await loop.create_server(Backend, "127.0.0.1", 0) for _ in range(2)]
    store = await connect_store(f"memory://{uuid.uuid4().hex}")
    registry = Registry(store)
    for i, srv in enumerate(backends):
        port = srv.sockets[0].getsockname()[1]
        await registry.register(Instance(id=f"b{i}", service="hello",
                                         address=f"127.0.0.1:{port}"))
    cache = await EndpointCache(store).start()
    await cache.wait_for("hello", lambda eps: len(eps) == 2)
    gateway = Gateway(RouteTable.from_config([{"name": "hello", "service": "hello"}]), cache,
                      services={"hello": {"load_balancer": {"policy": "round_robin"}}})
    servers = {"fast": HttpServer(gateway.handle),
               "coroutine": HttpServer(functools.partial(Gateway.handle, gateway))}
    clients: dict[str, list[Client]] = {}
    counts = [0]
    running = [False]
    try:
        for name, server in servers.items():
            await server.start("127.0.0.1", 0)
            clients[name] = []
            for _ in range(args.connections):
                _, c = await loop.create_connection(lambda: Client(counts, running),
                                                    "127.0.0.1", server.port)
                clients[name].append(c)
        per: dict[str, list[float]] = {"fast": [], "coroutine": []}
        for i in range(args.slices * 2 + 2):  # the first round of each warms up
            name = ("fast", "coroutine")[i % 2]
            counts[0] = 0
            running[0] = True
            cpu0 = time.process_time()
            for c in clients[name]:
                c.go()
            await asyncio.sleep(args.slice)
            running[0] = False
            await asyncio.gather(*(c.idle for c in clients[name] if c.idle is not None))
            cpu = time.process_time() - cpu0
            if i >= 2:
                per[name].append(cpu / max(counts[0], 1) * 1e6)
        for c in (c for cs in clients.values() for c in cs):
            c.transport.close()
    finally:
        for server in servers.values():
            await server.shutdown(1)
        await gateway.aclose()
        await cache.close()
        await registry.close()
        await store.close()
        for srv in backends:
            srv.close()
    fast = statistics.median(per["fast"])
    coro = statistics.median(per["coroutine"])
    return {"bench": "gateway_paths", "connections": args.connections, "slices": args.slices,
            "slice_s": args.slice, "load_average_1m": round(os.getloadavg()[0], 2),
            "fast_cpu_us_per_req": round(fast, 1), "coroutine_cpu_us_per_req": round(coro, 1),
            "saved_us_per_req": round(coro - fast, 1),
            "coroutine_vs_fast_cpu": round(coro / fast, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=10)
    ap.add_argument("--slice", type=float, default=0.5)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    with contextlib.suppress(AttributeError):
        sys.setswitchinterval(0.005)
    result = uvloop.run(run(args))
    print(f"process CPU per request (client + backend + gateway), {args.connections} "
          f"connections, median of {args.slices} slices each, load {result['load_average_1m']}")
    print(f"  fast path       {result['fast_cpu_us_per_req']:>8} us")
    print(f"  coroutine path  {result['coroutine_cpu_us_per_req']:>8} us")
    print(f"  saved           {result['saved_us_per_req']:>8} us per request")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
