"""What the observability hooks add per request and per event, measured in one process.

    python bench/observability_hotpath.py [--n 20000] [--rounds 7]

On a shared machine throughput ratios of whole servers swing by more than the hooks cost,
so this measures the hooks alone, A/B, interleaved, best of ``--rounds`` (CPU time):

* ``gateway``: ``observe_gateway`` around a gateway whose ``handle`` notes its route and
  answers at once, against calling that ``handle`` directly (the peer);
* ``gateway-fast``: the same through ``fast_handle`` (the path ``HttpServer`` takes for a
  plain request): the gateway returns a pending try and answers through the callback;
* ``consume``: ``Subscription.handle`` of one event with a no-op handler (memory bus),
  metrics on against off (the peer);
* ``publish``: ``EventBus.publish`` on a memory bus, metrics/tracing against off.

Each mode prints microseconds per operation and what it adds to the peer's; divide by a
real request's or event's cost (``bench/observability.py``, ``bench/bus.py``) for the share.
Tracing modes sample 1% of new traces (the rest carried on, unsampled) or all of them.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from shoal.events.brokers.base import Record
from shoal.events.bus import EventBus
from shoal.events.event import Event, encode_record
from shoal.gateway.server import Headers, Response
from shoal.observability import metrics, tracing
from shoal.observability.http import observe_gateway

MODES = ("off", "metrics", "traced-1%", "traced-100%")


class _Drop(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def switch(mode: str) -> None:
    metrics.disable_metrics()
    tracing.disable_tracing()
    if mode != "off":
        metrics.enable_metrics()
    if mode.startswith("traced"):
        tracing.enable_tracing(_Drop(), batch=True,
                               sample_ratio=0.01 if mode == "traced-1%" else 1.0)


class _Route:
    name = "echo"
    index = 0


class _Request:
    method = "GET"
    path = "/"
    raw_path = b"/"

    def __init__(self) -> None:
        self.headers = Headers([(b"host", b"x")])


class _Gateway:
    """Routes every request to one service and answers at once."""

    def __init__(self) -> None:
        self.on_route: Callable[[Any, str], None] | None = None
        self.route = _Route()
        self.response = Response(b"ok")
        self.pending: _Try | None = None

    async def handle(self, request: Any) -> Response:
        if self.on_route is not None:
            self.on_route(self.route, "echo")
        return self.response

    def fast_handle(self, request: Any, answer: Callable[[Any, Any], None]) -> _Try:
        if self.on_route is not None:
            self.on_route(self.route, "echo")
        self.pending = _Try(request, answer, self.response)
        return self.pending


class _Try:
    """A fast try in flight (``answer_later``); ``complete`` answers it, as the upstream's
    response arriving does."""

    answer_later = True
    __slots__ = ("answer", "request", "response")

    def __init__(self, request: Any, answer: Callable[[Any, Any], None], response: Any
                 ) -> None:
        self.request, self.answer, self.response = request, answer, response

    def complete(self) -> None:
        self.answer(self.request, self.response)

    def done(self) -> bool:
        return False

    def cancel(self, msg: object = None) -> bool:
        return False


async def timed(n: int, op: Callable[[], Awaitable[Any]]) -> float:
    t = time.process_time()
    for _ in range(n):
        await op()
    return (time.process_time() - t) / n * 1e6


async def gateway_op(mode: str, n: int) -> float:
    switch(mode)
    gw = _Gateway()
    handle = gw.handle if mode == "off" else observe_gateway(gw)
    return await timed(n, lambda: handle(_Request()))


async def gateway_fast_op(mode: str, n: int) -> float:
    switch(mode)
    gw = _Gateway()
    fast = gw.fast_handle if mode == "off" else observe_gateway(gw).__self__.fast_handle
    answered: list[Any] = []

    def answer(request: Any, resp: Any) -> None:  # the server's callback
        answered.append(resp)

    async def one() -> None:
        result = fast(_Request(), answer)
        if hasattr(result, "__await__"):  # a recorded trace: the coroutine path
            answered.append(await result)
        else:
            gw.pending.complete()  # the upstream's response arrives

    t = await timed(n, one)
    assert len(answered) == n, (len(answered), n)
    return t


async def consume_op(mode: str, n: int) -> float:
    switch(mode)
    async with EventBus.connect("memory://hotpath") as bus:
        async def noop(event: Event) -> None:
            return None

        sub = await bus.subscribe("t", f"g{time.monotonic_ns()}", noop)
        traceparent = {} if mode == "off" else {
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0" + (
                "1" if mode == "traced-100%" else "0")}
        event = Event(id="e", source="s", type="t", extensions=traceparent)
        record = Record(0, 0, int(time.time() * 1000), None, encode_record(event))
        try:
            return await timed(n, lambda: sub.handle(record, event))
        finally:
            await sub.close()


async def publish_op(mode: str, n: int) -> float:
    switch(mode)
    async with EventBus.connect("memory://hotpath-pub") as bus:
        await bus.create_topic("p", partitions=8)
        return await timed(n, lambda: bus.publish("p", "x" * 175, key="k"))


async def main(args: argparse.Namespace) -> dict[str, Any]:
    ops = {"gateway": gateway_op, "gateway-fast": gateway_fast_op, "consume": consume_op,
           "publish": publish_op}
    best: dict[str, dict[str, float]] = {op: {} for op in ops}
    for _ in range(args.rounds):
        for op, fn in ops.items():
            for mode in MODES:
                us = await fn(mode, args.n)
                best[op][mode] = min(us, best[op].get(mode, float("inf")))
    switch("off")
    out: dict[str, Any] = {"bench": "observability_hotpath", "n": args.n,
                           "rounds": args.rounds}
    for op, figures in best.items():
        peer = figures["off"]
        print(f"{op}: {peer:.2f} us per operation with everything off (the peer)")
        for mode in MODES[1:]:
            print(f"  {mode:12} {figures[mode]:8.2f} us  (+{figures[mode] - peer:.2f} us)")
        out[op] = {m: round(v, 3) for m, v in figures.items()}
        out[op + "_added_us"] = {m: round(figures[m] - peer, 3) for m in MODES[1:]}
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=7)
    print(json.dumps(uvloop.run(main(ap.parse_args()))))
