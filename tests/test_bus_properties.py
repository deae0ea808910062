"""Property: across crashes and rebalances, no acknowledged event is lost and per-key
order holds (first deliveries of each key's events come in publish order)."""

from __future__ import annotations

import asyncio
import threading
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.events import Event, EventBus, RetryPolicy

pytestmark = __import__("pytest").mark.slow

KEYS = ["a", "b", "c", "d"]
_crashed: list[Member] = []  # kept referenced: a crashed loop's tasks must not be collected


class Member:
    """A consumer-group member on its own thread and event loop, so that a "crash" can
    stop it dead: no final commit, no lease revoke (the lease just runs out)."""

    def __init__(self, url: str, name: str, log: list[tuple[str, str, int]], fail_every: int):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.calls = 0

        async def handler(event: Event) -> None:
            self.calls += 1
            if fail_every and self.calls % fail_every == 0:
                raise RuntimeError("flaky handler")
            log.append((name, event.key or "", event.data))

        async def start() -> EventBus:
            bus = await EventBus.connect(url)
            await bus.subscribe(
                "prop", "g", handler, session_timeout="400ms",
                retry=RetryPolicy(attempts=50, initial=0.001, maximum=0.002),
            )
            return bus

        self.bus = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def leave(self) -> None:
        asyncio.run_coroutine_threadsafe(self.bus.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def crash(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)  # everything stops mid-flight


operation = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 40)),
    st.tuples(st.just("join"), st.integers(0, 3)),
    st.tuples(st.just("leave"), st.integers(0, 5)),
    st.tuples(st.just("crash"), st.integers(0, 5)),
    st.tuples(st.just("pause"), st.integers(1, 30)),
)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(operation, min_size=3, max_size=10))
def test_no_acknowledged_event_lost_and_key_order_kept(tmp_path_factory, ops) -> None:
    url = f"sqlite:///{tmp_path_factory.mktemp('prop')}/events.db"
    log: list[tuple[str, str, int]] = []
    members: list[Member] = []
    acked: dict[str, list[int]] = {k: [] for k in KEYS}
    seq = 0

    async def publish(n: int) -> None:
        nonlocal seq
        async with EventBus.connect(url) as bus:
            await bus.create_topic("prop", partitions=3)
            for _ in range(n):
                key = KEYS[seq % len(KEYS)]
                await bus.publish("prop", seq, key=key)
                acked[key].append(seq)
                seq += 1

    asyncio.run(publish(0))
    for kind, arg in ops:
        if kind == "publish":
            asyncio.run(publish(arg))
        elif kind == "join":
            members.append(Member(url, f"m{len(members)}", log, fail_every=arg and arg + 2))
        elif kind in ("leave", "crash") and members:
            m = members.pop(arg % len(members))
            if kind == "leave":
                m.leave()
            else:
                m.crash()
                _crashed.append(m)
        elif kind == "pause":
            time.sleep(arg / 1000)
    final = Member(url, "final", log, fail_every=0)
    try:
        everything = {s for seqs in acked.values() for s in seqs}
        deadline = time.monotonic() + 20
        while {s for _, _, s in log} < everything and time.monotonic() < deadline:
            time.sleep(0.02)
        assert {s for _, _, s in list(log)} >= everything, "acknowledged events were lost"
        for key, seqs in acked.items():
            firsts = list(dict.fromkeys(s for _, k, s in list(log) if k == key))
            assert firsts == seqs, f"key {key}: first deliveries out of order"
    finally:
        for m in [*members, final]:
            m.leave()

