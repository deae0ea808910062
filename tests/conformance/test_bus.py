"""The broker contract, as seen through EventBus: one suite for every backend."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from datetime import UTC, datetime

import pytest

from shoal.errors import InvalidEvent, TopicError
from shoal.events import Drop, Event, EventBus, Message, RetryPolicy
from shoal.events.partitioning import partition_for
from tests.helpers import eventually

FAST_RETRY = RetryPolicy(attempts=3, initial=0.001, maximum=0.005)


async def test_publish_acknowledges_partition_and_gapless_offsets(bus: EventBus) -> None:
    await bus.create_topic("orders", partitions=4)
    acks = [await bus.publish("orders", {"n": i}, key=f"k{i % 3}") for i in range(30)]
    for ack in acks:
        assert ack.partition == partition_for(f"k{acks.index(ack) % 3}", 4)
        assert not ack.duplicate
    by_partition: dict[int, list[int]] = defaultdict(list)
    for ack in acks:
        by_partition[ack.partition].append(ack.offset)
    for offsets in by_partition.values():
        assert offsets == list(range(len(offsets)))
    info = {t.spec.name: t for t in await bus.topics()}["orders"]
    assert info.events == 30 and info.size_bytes > 0


async def test_publish_many_and_concurrent_publishes_group_commit(bus: EventBus) -> None:
    await bus.create_topic("t", partitions=2)
    many = await bus.publish_many("t", [Message({"i": i}, key="a") for i in range(100)])
    assert [a.offset for a in many] == list(range(100))
    acks = await asyncio.gather(*(bus.publish("t", i, key="a") for i in range(200)))
    assert sorted(a.offset for a in acks) == list(range(100, 300))
    # group commit keeps the call order for one key
    assert [a.offset for a in acks] == list(range(100, 300))


async def test_duplicate_id_inside_window_is_not_appended(bus: EventBus) -> None:
    first = await bus.publish("pay", {"x": 1}, id="evt-1")
    again = await bus.publish("pay", {"x": 2}, id="evt-1")
    assert not first.duplicate and again.duplicate
    assert (again.partition, again.offset) == (first.partition, first.offset)
    both = await bus.publish_many("pay", [Message(1, id="evt-2"), Message(2, id="evt-2")])
    assert [a.duplicate for a in both] == [False, True]
    assert sum(t.events for t in await bus.topics() if t.spec.name == "pay") == 2


async def test_every_group_gets_every_event_in_key_order(bus: EventBus) -> None:
    await bus.create_topic("o", partitions=4)
    seen: dict[str, list[tuple[str, int]]] = {"a": [], "b": []}
    subs = [
        await bus.subscribe("o", g, lambda e, g=g: seen[g].append((e.key, e.data)))
        for g in ("a", "b")
    ]
    for i in range(200):
        await bus.publish("o", i, key=f"c{i % 7}")
    await eventually(lambda: all(len(v) == 200 for v in seen.values()), what="both groups")
    for events in seen.values():
        for k in {k for k, _ in events}:
            values = [v for kk, v in events if kk == k]
            assert values == sorted(values)
    for s in subs:
        await s.close()


async def test_members_of_one_group_split_partitions(bus_url: str) -> None:
    async with EventBus.connect(bus_url) as one, EventBus.connect(bus_url) as two:
        await one.create_topic("s", partitions=6)
        got: dict[str, list[int]] = {"one": [], "two": []}
        s1 = await one.subscribe("s", "g", lambda e: got["one"].append(e.data),
                                 session_timeout="2s")
        s2 = await two.subscribe("s", "g", lambda e: got["two"].append(e.data),
                                 session_timeout="2s")
        await eventually(lambda: len(s1.stats.partitions) == 3 and len(s2.stats.partitions) == 3,
                         what="an even split")
        assert s1.stats.partitions.isdisjoint(s2.stats.partitions)
        for i in range(120):
            await one.publish("s", i, key=str(i))
        await eventually(lambda: len(got["one"]) + len(got["two"]) == 120, what="all events")
        assert sorted(got["one"] + got["two"]) == list(range(120))
        assert got["one"] and got["two"]
        await s2.close()  # leaving hands its partitions over
        await eventually(lambda: len(s1.stats.partitions) == 6, what="takeover")
        for i in range(120, 130):
            await one.publish("s", i, key=str(i))
        await eventually(lambda: len(got["one"]) + len(got["two"]) == 130, what="after leave")
        await s1.close()


async def test_async_and_thread_handlers(bus: EventBus) -> None:
    got: list[int] = []

    async def handler(event: Event) -> None:
        got.append(event.data)

    def blocking(event: Event) -> None:
        time.sleep(0.001)
        got.append(-event.data)

    await bus.subscribe("h", "async", handler)
    await bus.subscribe("h", "sync", blocking)
    for i in range(1, 21):
        await bus.publish("h", i)
    await eventually(lambda: len(got) == 40)
    assert sorted(got) == sorted([*range(1, 21), *(-i for i in range(1, 21))])


async def test_concurrency_overlaps_keys_but_never_one_key(bus: EventBus) -> None:
    await bus.create_topic("c", partitions=1)
    active: dict[str, int] = defaultdict(int)
    peak = {"all": 0, "key": 0}
    running = {"n": 0}
    order: dict[str, list[int]] = defaultdict(list)

    async def handler(event: Event) -> None:
        key = event.key or ""
        active[key] += 1
        running["n"] += 1
        peak["all"] = max(peak["all"], running["n"])
        peak["key"] = max(peak["key"], active[key])
        await asyncio.sleep(0.002)
        order[key].append(event.data)
        active[key] -= 1
        running["n"] -= 1

    for i in range(120):
        await bus.publish("c", i, key=f"k{i % 6}")
    sub = await bus.subscribe("c", "g", handler, concurrency=4)
    await eventually(lambda: sum(map(len, order.values())) == 120)
    assert peak["key"] == 1
    assert 1 < peak["all"] <= 4
    for values in order.values():
        assert values == sorted(values)
    await sub.close()
    assert await bus.committed("c", "g") == {0: 120}


async def test_commit_waits_for_every_earlier_event(bus: EventBus) -> None:
    await bus.create_topic("w", partitions=1)
    release = asyncio.Event()

    async def handler(event: Event) -> None:
        if event.data == 0:
            await release.wait()

    for i in range(10):
        await bus.publish("w", i, key=f"k{i}")
    sub = await bus.subscribe("w", "g", handler, concurrency=4)
    await asyncio.sleep(0.2)
    assert (await bus.committed("w", "g")).get(0, 0) == 0  # event 0 is still in flight
    release.set()
    await eventually(lambda: sub.stats.handled == 10)
    await sub.close()
    assert await bus.committed("w", "g") == {0: 10}


async def test_retry_then_success_keeps_key_order(bus: EventBus) -> None:
    await bus.create_topic("r", partitions=1)
    calls: list[int] = []

    async def flaky(event: Event) -> None:
        calls.append(event.data)
        if event.data == 1 and calls.count(1) < 3:
            raise RuntimeError("transient")

    for i in range(4):
        await bus.publish("r", i, key="same")
    sub = await bus.subscribe("r", "g", flaky, retry=FAST_RETRY)
    await eventually(lambda: sub.stats.handled == 4)
    assert calls == [0, 1, 1, 1, 2, 3]
    assert sub.stats.retried == 2 and sub.stats.dead_lettered == 0
    await sub.close()


async def test_exhausted_retries_dead_letter_with_reason_and_origin(bus: EventBus) -> None:
    await bus.create_topic("d", partitions=1)

    async def broken(event: Event) -> None:
        if event.data == "bad":
            raise ValueError("cannot charge")

    await bus.publish("d", "ok", key="k")
    bad = await bus.publish("d", "bad", key="k")
    await bus.publish("d", "ok2", key="k")
    sub = await bus.subscribe("d", "g", broken, retry=FAST_RETRY)
    dead: list[Event] = []
    await bus.subscribe("d.dlq", "inspect", dead.append)
    await eventually(lambda: sub.stats.handled == 2 and len(dead) == 1)
    letter = dead[0]
    assert letter.data == "bad" and letter.key == "k"
    ext = letter.extensions
    assert ext["dlqreason"] == "ValueError: cannot charge"
    assert ext["dlqattempts"] == 3
    assert (ext["dlqtopic"], ext["dlqpartition"], ext["dlqoffset"]) == ("d", 0, bad.offset)
    assert ext["dlqgroup"] == "g"
    await sub.close()
    assert await bus.committed("d", "g") == {0: 3}


async def test_drop_skips_without_retry_or_dead_letter(bus: EventBus) -> None:
    calls = []

    async def handler(event: Event) -> None:
        calls.append(event.data)
        raise Drop("not for us")

    sub = await bus.subscribe("x", "g", handler, retry=FAST_RETRY)
    await bus.publish("x", 1)
    await eventually(lambda: sub.stats.dropped == 1)
    assert calls == [1] and sub.stats.dead_lettered == 0
    assert sum(t.events for t in await bus.topics() if t.spec.name == "x.dlq") == 0


async def test_start_positions_and_seek_replay(bus: EventBus) -> None:
    await bus.create_topic("p", partitions=1)
    for i in range(5):
        await bus.publish("p", i)
    await asyncio.sleep(0.01)
    middle = datetime.now(UTC)
    await asyncio.sleep(0.01)
    for i in range(5, 10):
        await bus.publish("p", i)
    got: dict[str, list[int]] = defaultdict(list)
    subs = []
    for group, start in (("e", "earliest"), ("l", "latest"), ("o", 3), ("t", middle)):
        subs.append(await bus.subscribe("p", group, lambda e, g=group: got[g].append(e.data),
                                        start=start))
    await bus.publish("p", 10)
    await eventually(lambda: len(got["e"]) == 11 and got["l"] == [10] and len(got["o"]) == 8
                     and len(got["t"]) == 6)
    assert got["o"] == list(range(3, 11)) and got["t"] == list(range(5, 11))
    for s in subs:
        await s.close()
    await bus.seek("p", "l", "earliest")
    replay: list[int] = []
    sub = await bus.subscribe("p", "l", lambda e: replay.append(e.data))
    await eventually(lambda: len(replay) == 11, what="replay after seek")
    await sub.close()


async def test_seek_moves_a_live_member(bus: EventBus) -> None:
    await bus.create_topic("live", partitions=1)
    got: list[int] = []
    sub = await bus.subscribe("live", "g", lambda e: got.append(e.data))
    for i in range(3):
        await bus.publish("live", i)
    await eventually(lambda: len(got) == 3)
    await bus.seek("live", "g", "earliest")
    await bus.publish("live", 3)  # wakes the idle member, which notices the seek
    await eventually(lambda: got.count(0) == 2 and 3 in got, what="live replay")
    await sub.close()


async def test_consume_iterator_acknowledges_on_next(bus: EventBus) -> None:
    await bus.create_topic("it", partitions=1)
    for i in range(5):
        await bus.publish("it", i)
    seen = []
    async with bus.consume("it", "puller") as events:
        async for event in events:
            seen.append(event.data)
            if len(seen) == 3:
                break
    assert seen == [0, 1, 2]
    # event 2 was being handled when the block ended normally: it counts as handled
    assert await bus.committed("it", "puller") == {0: 3}
    rest = []
    async for event in bus.consume("it", "puller"):  # the bare form works too
        rest.append(event.data)
        if len(rest) == 2:
            break
    assert rest == [3, 4]


async def test_retention_by_age_and_size(bus: EventBus) -> None:
    await bus.create_topic("old", partitions=1, retention="50ms")
    for i in range(10):
        await bus.publish("old", i)
    await asyncio.sleep(0.1)
    await bus.publish("old", 10)
    await bus.apply_retention()
    (info,) = [t for t in await bus.topics() if t.spec.name == "old"]
    assert info.ranges[0].end == 11 and info.ranges[0].start >= 10
    await bus.create_topic("big", partitions=1, retention_bytes="2KiB")
    for _ in range(100):
        await bus.publish("big", "x" * 100)
    await bus.apply_retention()
    (info,) = [t for t in await bus.topics() if t.spec.name == "big"]
    assert info.size_bytes <= 2048 and info.ranges[0].end == 100 and info.ranges[0].start > 0
    got: list[str] = []
    sub = await bus.subscribe("big", "g", lambda e: got.append(e.data))
    await eventually(lambda: len(got) == 100 - info.ranges[0].start)
    await sub.close()


async def test_event_envelope_is_cloudevents(bus: EventBus) -> None:
    got: list[Event] = []
    await bus.subscribe("env", "g", got.append)
    ack = await bus.publish("env", {"a": 1}, key="k", type="order.created",
                            extensions={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    await eventually(lambda: len(got) == 1)
    e = got[0]
    assert (e.id, e.type, e.source, e.specversion) == (ack.id, "order.created", "/tests", "1.0")
    assert e.key == "k" and e.traceparent.startswith("00-") and e.time is not None


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda b: b.publish("bad topic", 1), TopicError),
        (lambda b: b.publish("", 1), TopicError),
        (lambda b: b.publish("t" * 201, 1), TopicError),
        (lambda b: b.publish("t", 1, key=5), InvalidEvent),
        (lambda b: b.publish("t", 1, extensions={"Bad-Name": "x"}), InvalidEvent),
        (lambda b: b.publish("t", 1, extensions={"data": "x"}), InvalidEvent),
        (lambda b: b.publish("t", 1, extensions={"ok": 1.5}), InvalidEvent),
        (lambda b: b.publish("t", 1, id=""), InvalidEvent),
        (lambda b: b.create_topic("t", partitions=0), TopicError),
        (lambda b: b.subscribe("t", "bad group!", print), TopicError),
    ],
)
async def test_bad_input_is_refused_and_appends_nothing(bus: EventBus, call, error) -> None:
    with pytest.raises(error):
        await call(bus)
    assert all(t.events == 0 for t in await bus.topics())


async def test_partition_count_mismatch_is_an_error(bus: EventBus) -> None:
    await bus.create_topic("m", partitions=2)
    assert (await bus.create_topic("m", partitions=2)).partitions == 2
    with pytest.raises(TopicError, match="exists with 2 partitions"):
        await bus.create_topic("m", partitions=3)


async def test_lag_counts_unhandled_events(bus: EventBus) -> None:
    await bus.create_topic("lag", partitions=2)
    for i in range(10):
        await bus.publish("lag", i, key=str(i))
    sub = await bus.subscribe("lag", "g", lambda e: None)
    await eventually(lambda: sub.stats.handled == 10)
    await sub.close()
    assert sum((await bus.lag("lag", "g")).values()) == 0
    await bus.publish("lag", 11, key="x")
    assert sum((await bus.lag("lag", "g")).values()) == 1
    assert await bus.groups("lag") == ["g"]


async def test_consume_block_failing_leaves_the_event_for_redelivery(bus: EventBus) -> None:
    await bus.create_topic("fail", partitions=1)
    for i in range(3):
        await bus.publish("fail", i)
    with pytest.raises(RuntimeError):
        async with bus.consume("fail", "g") as events:
            async for event in events:
                if event.data == 1:
                    raise RuntimeError("could not write it")
    assert await bus.committed("fail", "g") == {0: 1}
    async with bus.consume("fail", "g") as events:
        async for event in events:
            assert event.data == 1
            break


def test_sync_facade_publishes_from_plain_code(bus_url: str) -> None:
    from shoal.events import SyncEventBus

    with SyncEventBus(bus_url) as sync:
        ack = sync.publish("s", {"x": 1}, key="k")
        acks = sync.publish_many("s", [1, 2, 3])
    assert not ack.duplicate and len(acks) == 3


async def test_fsync_option_reaches_the_sqlite_broker(tmp_path) -> None:
    async with EventBus.connect(f"sqlite:///{tmp_path}/f.db", fsync=True) as bus:
        assert getattr(bus.broker, "fsync", True) is True
        assert not (await bus.publish("f", 1)).duplicate


async def test_unopenable_sqlite_path_is_a_config_error(tmp_path) -> None:
    from shoal.errors import ConfigError

    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot open"):
        await EventBus.connect(f"sqlite:///{tmp_path}/file/events.db")


async def test_out_of_range_extension_integer_is_refused(bus: EventBus) -> None:
    with pytest.raises(InvalidEvent, match="32-bit"):
        await bus.publish("t", 1, extensions={"big": 2**40})
