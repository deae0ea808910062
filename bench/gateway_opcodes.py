"""The gateway's Python work per proxied request, counted, not timed: bytecodes and calls.

    python bench/gateway_opcodes.py [--requests 1600] [--top 25]

On a shared machine CPU timings of the gateway move by 30% from run to run; what the code
does per request does not. This drives one ``Gateway`` behind its ``HttpServer`` with no
sockets at all: client connections and pooled upstream connections are the real protocol
objects (``_ServerConnection``, ``Http1Connection``) on fake transports that record what is
written, 32 of each, answered with a small nginx-like response, on uvloop. A trace function
counts every Python bytecode executed and every Python function called, per function; a run
of 2N requests minus a run of N (same set-up) leaves the cost of N requests. Figures for the
fast path (``gateway.handle``: ``fast_handle``) next to the coroutine path
(``functools.partial(Gateway.handle, gateway)``: a task per request), and the functions
that execute the most bytecodes on the fast path. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import sys
import uuid
from typing import Any

import uvloop

from shoal.gateway.proxy import Gateway
from shoal.gateway.routes import RouteTable
from shoal.gateway.server import HttpServer, _ServerConnection
from shoal.mesh.http1 import Http1Connection
from shoal.mesh.registry import EndpointCache, Instance, Registry
from shoal.store import connect_store

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"
BODY = b'{"message":"Hello, World!"}'
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 17:46:11 GMT\r\n"
          b"Content-Type: application/json\r\nContent-Length: 27\r\nConnection: keep-alive\r\n"
          b"\r\n" + BODY)
CONNECTIONS = 32


class RecordingTransport(asyncio.Transport):
    """A transport that keeps what is written and never blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.out.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


async def proxy(requests: int, fast: bool) -> None:
    """Set up a gateway on recording transports and proxy ``requests`` requests."""
    store = await connect_store(f"memory://{uuid.uuid4().hex}")
    registry = Registry(store)
    for i in range(2):
        await registry.register(Instance(id=f"hello-{i}", service="hello",
                                         address=f"127.0.0.1:{18601 + i}"))
    cache = await EndpointCache(store).start()
    await cache.wait_for("hello", lambda eps: len(eps) == 2)
    routes = RouteTable.from_config([{"name": "hello", "service": "hello"}])
    gateway = Gateway(routes, cache,
                      services={"hello": {"load_balancer": {"policy": "round_robin"}}})
    server = HttpServer(gateway.handle if fast else functools.partial(Gateway.handle, gateway))
    server._loop = asyncio.get_running_loop()
    m = routes.match("GET", "h", "/")
    assert m is not None
    upstream = gateway.upstream(m, m.choose_destination(gateway.rng))
    backends = []
    for endpoint in cache.endpoints("hello"):
        pool = upstream._pool(endpoint)
        for _ in range(CONNECTIONS):
            conn = Http1Connection(endpoint.address, owner=pool)
            conn.connection_made(t := RecordingTransport())
            pool._idle.append(conn)
            pool.size += 1
            backends.append((conn, t))
    clients = []
    for _ in range(CONNECTIONS):
        client = _ServerConnection(server)
        client.connection_made(t := RecordingTransport())
        clients.append((client, t))
    try:
        for _ in range(requests // CONNECTIONS):
            for client, _ in clients:
                client.data_received(REQUEST)
            for _ in range(3):
                await asyncio.sleep(0)
            for conn, t in backends:
                if t.out:
                    t.out.clear()
                    conn.data_received(ANSWER)
            for _ in range(3):
                await asyncio.sleep(0)
            for _, t in clients:
                if not t.out or not t.out[-1].endswith(BODY):
                    raise SystemExit(f"no answer written: {t.out!r:.200}")
                t.out.clear()
    finally:
        await gateway.aclose()
        await cache.close()
        await registry.close()
        await store.close()


def count(requests: int, fast: bool) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Bytecodes and calls per function over a run of ``requests`` requests."""
    ops: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if event != "call":
            return None
        code = frame.f_code
        key = f"{code.co_filename.rsplit('/shoal/', 1)[-1]}:{code.co_name}"
        calls[key] += 1
        frame.f_trace_opcodes = True

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "opcode":
                ops[key] += 1
            return local
        return local

    sys.settrace(trace)
    try:
        uvloop.run(proxy(requests, fast))
    finally:
        sys.settrace(None)
    return ops, calls


def per_request(n: int, fast: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Bytecodes and calls per request and function, set-up and the driver left out."""
    ops1, calls1 = count(n, fast)
    ops2, calls2 = count(2 * n, fast)

    def diff(a: collections.Counter[str], b: collections.Counter[str]) -> dict[str, float]:
        return {k: (b[k] - a[k]) / n for k in set(a) | set(b)
                if b[k] > a[k] and "gateway_opcodes" not in k and "asyncio/" not in k}
    return diff(ops1, ops2), diff(calls1, calls2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1600)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    n = max(CONNECTIONS, args.requests // CONNECTIONS * CONNECTIONS)
    uvloop.run(proxy(CONNECTIONS * 4, True))  # imports and first-use caches
    result: dict[str, Any] = {"bench": "gateway_opcodes", "requests": n}
    for name, fast in (("fast", True), ("coroutine", False)):
        ops, calls = per_request(n, fast)
        result[f"{name}_bytecodes_per_req"] = round(sum(ops.values()), 1)
        result[f"{name}_calls_per_req"] = round(sum(calls.values()), 1)
        if fast:
            top = sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]
            result["fast_top"] = {k: round(v, 1) for k, v in top}
    print(f"Python work per proxied request (gateway, server and stack; {n} requests)")
    for name in ("fast", "coroutine"):
        print(f"  {name:10} {result[f'{name}_bytecodes_per_req']:>8} bytecodes "
              f"{result[f'{name}_calls_per_req']:>6} calls")
    print("fast path, bytecodes by function:")
    for k, v in result["fast_top"].items():
        print(f"  {v:7.1f}  {k}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
