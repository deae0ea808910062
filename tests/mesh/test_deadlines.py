"""shoal.mesh.deadlines (one timer for every per-try timeout) and the Upstream fast path
that relies on it and on cached healthy lists: timeouts still fire on time, a caller's own
cancellation is never mistaken for a timeout, and health or membership changes (a new
endpoint list) are seen at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import uvloop
from aiohttp import web

from shoal.errors import UpstreamTimeout
from shoal.mesh.balancer import RoundRobinBalancer
from shoal.mesh.deadlines import Deadlines
from shoal.mesh.endpoint import Endpoint
from shoal.mesh.resilience import load_traffic_policy
from shoal.mesh.upstream import Upstream


async def _guarded(deadlines: Deadlines, seconds: float, work: float) -> str:
    task = asyncio.current_task()
    assert task is not None
    expiry = deadlines.start(task, seconds)
    try:
        await asyncio.sleep(work)
        return "done"
    except asyncio.CancelledError:
        if expiry.expired():
            return "timeout"
        raise
    finally:
        deadlines.finish(expiry)


@pytest.mark.parametrize("runner", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_deadlines_fire_on_time_in_any_order_and_only_for_unfinished_calls(runner) -> None:
    async def scenario() -> None:
        deadlines = Deadlines(asyncio.get_running_loop())
        t0 = time.monotonic()
        # Deadlines added out of order: a long one first, then shorter ones re-arm the timer.
        results = await asyncio.gather(
            _guarded(deadlines, 5.0, 0.01),    # finishes: no timeout
            _guarded(deadlines, 0.30, 10.0),   # times out at ~0.3 s
            _guarded(deadlines, 0.10, 10.0),   # times out at ~0.1 s
            _guarded(deadlines, 0.20, 0.05),   # finishes before its deadline
        )
        elapsed = time.monotonic() - t0
        assert results == ["done", "timeout", "timeout", "done"]
        assert 0.28 <= elapsed < 1.5
        assert len(deadlines) == 0  # finished calls are forgotten
        deadlines.close()

    runner(scenario())


def test_a_callers_own_cancellation_is_not_a_timeout() -> None:
    async def scenario() -> None:
        deadlines = Deadlines(asyncio.get_running_loop())
        task = asyncio.create_task(_guarded(deadlines, 5.0, 10.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Cancelled by someone else at the moment the deadline also fires: still cancelled.
        task = asyncio.create_task(_guarded(deadlines, 0.05, 10.0))
        await asyncio.sleep(0.045)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(deadlines) == 0
        deadlines.close()

    uvloop.run(scenario())


def test_round_robin_resorts_a_new_list_and_keeps_turns_on_the_same_one() -> None:
    a, b, c = (Endpoint(x, "s", f"127.0.0.1:{9000 + i}") for i, x in enumerate("abc"))
    balancer = RoundRobinBalancer()
    first = [b, a]
    picks = [balancer.pick(first).instance_id for _ in range(4)]
    assert sorted(picks) == ["a", "a", "b", "b"] and picks[0] != picks[1]
    grown = [c, b, a]  # a new list object: the order is recomputed from it
    assert {balancer.pick(grown).instance_id for _ in range(3)} == {"a", "b", "c"}
    # A precomputed healthy subset is used as given (no predicate call).
    assert {balancer.pick(grown, healthy=[c, b]).instance_id for _ in range(4)} == {"b", "c"}


@pytest.fixture
async def slow_backend() -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "0")))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"127.0.0.1:{port}"
    await runner.shutdown()
    await runner.cleanup()


async def test_upstream_per_try_timeout_fires_and_the_next_call_works(slow_backend: str) -> None:
    endpoints = [Endpoint("one", "slow", slow_backend)]
    policy = load_traffic_policy({"retries": {"attempts": 1, "per_try_timeout": "150ms"},
                                  "timeouts": {"request": "2s"}})
    upstream = Upstream("slow", lambda: endpoints, policy)
    try:
        t0 = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="per-try") as caught:
            await upstream.send("GET", "/?delay=0.8")
        assert 0.28 <= time.monotonic() - t0 < 1.5  # two tries of 150 ms (plus backoff)
        assert caught.value.attempts == 2
        resp = await upstream.send("GET", "/")
        assert resp.status == 200 and await resp.aread() == b"ok"
        # A caller cancelling a call in flight is cancelled, not timed out.
        call = asyncio.create_task(upstream.send("GET", "/?delay=0.8"))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert upstream.breaker.active == 0
    finally:
        await upstream.aclose()


async def test_upstream_sees_health_and_membership_changes_through_new_lists(
        slow_backend: str) -> None:
    a = Endpoint("a", "svc", slow_backend)
    b = Endpoint("b", "svc", slow_backend)
    down: set[str] = set()
    source = {"list": [a, b]}
    upstream = Upstream("svc", lambda: source["list"],
                        load_traffic_policy({"load_balancer": {"policy": "round_robin"}}),
                        is_healthy=lambda e: e.instance_id not in down)
    try:
        assert {upstream._pick(None, ()).instance_id for _ in range(4)} == {"a", "b"}
        down.add("b")  # health changes come with a new list (as the EndpointCache does)
        source["list"] = [a, b]
        assert {upstream._pick(None, ()).instance_id for _ in range(4)} == {"a"}
        source["list"] = [b]  # a left; b unhealthy alone: panic mode balances over it
        assert upstream._pick(None, ()).instance_id == "b"
        assert upstream.balancer.panicking
    finally:
        await upstream.aclose()
