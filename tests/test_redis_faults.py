"""The Redis backends under faults: redis-server killed and restarted mid-stream, a lease
holder killed with -9, and URLs that are wrong in every way."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from shoal.errors import ConfigError
from shoal.events import EventBus
from shoal.events.brokers.connect import connect_broker
from shoal.events.event import decode_record
from shoal.redisio import parse_redis_url
from shoal.store import connect_store
from shoal.store.redis import RedisStore
from tests.conftest import PYTHON
from tests.helpers import eventually
from tests.redis_server import RedisServer, require_redis_server

EVENTS = 600
KILL_AFTER = 200


@pytest.fixture
def fsync_always_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A private redis-server with appendfsync always, for tests that kill it."""
    require_redis_server()
    server = RedisServer(tmp_path / "redis", fsync="always")
    server.directory.mkdir()
    server.start()
    yield server
    server.stop(kill=True)


async def test_restart_mid_stream_loses_no_acknowledged_event(
    fsync_always_server: RedisServer,
) -> None:
    """kill -9 redis-server while publishing and consuming; restart it on the same files.

    Every acknowledged event is in the log exactly once (a publish in flight at the kill
    is retried with its token, so it is not appended twice), and the consumer gets every
    one of them without being restarted.
    """
    server = fsync_always_server
    url = server.url()
    handled: dict[str, list[int]] = defaultdict(list)
    acked: dict[int, tuple[int, int]] = {}
    async with EventBus.connect(url, source="/tests") as bus:
        await bus.create_topic("orders", partitions=4)
        sub = await bus.subscribe(
            "orders", "billing", lambda e: handled[e.key].append(e.data), session_timeout="10s"
        )

        async def produce(first: int, last: int) -> None:
            for i in range(first, last):
                ack = await bus.publish("orders", i, key=f"c{i % 5}")
                acked[i] = (ack.partition, ack.offset)

        producers = [asyncio.create_task(produce(k * 150, (k + 1) * 150)) for k in range(4)]
        await eventually(lambda: len(acked) >= KILL_AFTER, what="acks before the kill")
        server.stop(kill=True)
        await asyncio.sleep(0.2)  # publishes and reads now fail and retry
        server.start()
        await asyncio.gather(*producers)
        assert len(acked) == EVENTS
        await eventually(
            lambda: sum(len(v) for v in handled.values()) >= EVENTS, timeout=20,
            what="the consumer to get every event after the restart",
        )
        await sub.close()
        seen = [d for values in handled.values() for d in values]
        assert set(seen) == set(range(EVENTS))
        for key, values in handled.items():  # log order per key (a redelivery may repeat)
            firsts = list(dict.fromkeys(values))
            assert firsts == sorted(firsts, key=lambda i: acked[i]), key
        log = []
        for p in range(4):
            log += [(p, r.offset, r.value) for r in await bus.broker.read("orders", p, 0, 10_000)]
        assert len(log) == EVENTS  # no publish was appended twice
        by_position = {(p, o): decode_record(v).data for p, o, v in log}
        assert all(by_position[where] == i for i, where in acked.items())


LEASE_HOLDER = """
import asyncio, sys
from shoal.store.redis import RedisStore
async def main():
    store = await RedisStore.open(sys.argv[1])
    lease = await store.lease(float(sys.argv[2]))
    await store.put("held/k", b"mine", lease=lease)
    print("ready", flush=True)
    while True:
        await asyncio.sleep(float(sys.argv[2]) / 4)
        await lease.keepalive()
asyncio.run(main())
"""


async def test_kill_9_lease_holder_keys_vanish_within_ttl(redis_server: RedisServer) -> None:
    url, ttl = redis_server.url(), 1.0
    store = await RedisStore.open(url)
    try:
        changes = store.watch("held/")
        child = subprocess.Popen(  # noqa: ASYNC220 - a child we kill by hand
            [PYTHON, "-c", LEASE_HOLDER, url, str(ttl)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            async with asyncio.timeout(5):
                assert (await anext(changes)).kind == "put"
            await asyncio.sleep(ttl)  # kept alive meanwhile: still there
            assert await store.get("held/k") is not None
            child.send_signal(signal.SIGKILL)
            killed = time.monotonic()
        finally:
            child.kill()
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        async with asyncio.timeout(ttl + 1.0):
            change = await anext(changes)
        assert (change.kind, change.key) == ("delete", "held/k")
        assert time.monotonic() - killed < ttl + 0.5
    finally:
        await store.close()


async def test_store_and_broker_share_the_server_and_keep_apart(redis_server: RedisServer) -> None:
    url = redis_server.url()
    async with EventBus.connect(url) as bus:
        assert bus.store.url == url  # default_store_for: the same server and prefix
        await bus.publish("t", 1)
        assert [e.key for e in await bus.store.list("t")] == []
        assert [t.spec.name for t in await bus.topics()] == ["t"]
    async with EventBus.connect(redis_server.url()) as other:
        assert await other.topics() == []  # another prefix sees nothing


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("redis://h:99999", "port"),
        ("redis://h:abc", "port"),
        ("redis://h/notanumber", "database"),
        ("redis://h/0?prefix=", "prefix"),
        ("redis://h/0?prefix=a*b", "prefix"),
        ("redis://h/0?prefix=" + "p" * 65, "prefix"),
        ("redis://h/0?prefix=a b", "prefix"),
        ("redis://h/0?bogus=1", "unknown option"),
        ("redis://h/0?reconnect=soon", "reconnect"),
        ("redis://h/0?reconnect=-1", "reconnect"),
        ("redis://h/0#frag", "fragment"),
        ("redis://h/0?" + "&" * 5 + "=", "query"),
        ("redis://" + "h" * 3000, "expected redis"),
        ("rediss://h", "expected redis"),
    ],
)
def test_malformed_urls_are_config_errors_naming_the_problem(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_redis_url(url)


def test_url_defaults_and_credentials() -> None:
    a = parse_redis_url("redis://user:p%40ss@example:6380/3?prefix=app.v1&reconnect=2s")
    assert (a.host, a.port, a.db, a.username, a.password) == ("example", 6380, 3, "user", "p@ss")
    assert (a.prefix, a.reconnect) == ("app.v1", 2.0)
    d = parse_redis_url("redis://")
    assert (d.host, d.port, d.db, d.prefix, d.reconnect) == ("localhost", 6379, 0, "shoal", 30.0)


async def test_unreachable_server_is_a_config_error_naming_the_url() -> None:
    require_redis_server()
    from tests.redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(ConfigError, match="cannot reach Redis"):
        await connect_broker(url)
    with pytest.raises(ConfigError, match="cannot reach Redis"):
        await connect_store(url)


async def test_gone_server_fails_calls_after_the_reconnect_window(
    fsync_always_server: RedisServer,
) -> None:
    """Past ``reconnect`` (here 300 ms) a call gives up with an error naming the store."""
    from shoal.errors import StoreError

    store = await RedisStore.open(fsync_always_server.url() + "&reconnect=300ms")
    try:
        await store.put("k", b"v")
        fsync_always_server.stop(kill=True)
        t = time.monotonic()
        with pytest.raises(StoreError, match=r"put: Redis unreachable for 0.3s"):
            await store.put("k", b"v2")
        assert time.monotonic() - t < 2
    finally:
        await store.close()


async def test_a_retried_append_or_write_is_applied_once(redis_server: RedisServer) -> None:
    """The token that makes retries after a broken connection safe: replaying a script call
    returns the first answer and writes nothing."""
    from shoal.events.brokers.base import Append, TopicSpec
    from shoal.events.brokers.redis import RedisBroker

    broker = await RedisBroker.open(redis_server.url())
    try:
        await broker.create_topic(TopicSpec("t", 1))
        args: list[object] = [broker.addr.prefix, "t", 0, "token-1", 1, 0, 1, "", b"v", "", 60_000]
        first = await broker._run("append", args, "append")
        again = await broker._run("append", args, "append")
        assert first == again == b"0"
        assert (await broker.ranges("t"))[0].end == 1
        appended = await broker.append("t", [Append(0, None, 1, b"w")])
        assert appended[0].offset == 1  # a new token appends
    finally:
        await broker.close()
    store = await RedisStore.open(redis_server.url())
    try:
        call = [store.addr.prefix, store.history, "token-2", "put", "k", b"v", "", 60_000]
        first = await store._call(store._write_script, call, "put")
        again = await store._call(store._write_script, call, "put")
        assert first == again and await store.revision() == 1
    finally:
        await store.close()


async def test_a_server_without_aof_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_redis_server()
    from tests.redis_server import REDIS_SERVER, free_port

    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - a server we kill by hand
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        broker = None
        deadline = time.monotonic() + 10
        while broker is None:
            try:
                broker = await connect_broker(url)
            except ConfigError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)
        assert broker.durability == {"appendonly": "no", "appendfsync": "everysec"}  # type: ignore[attr-defined]
        assert "without appendonly" in caplog.text
        await broker.close()
    finally:
        proc.kill()
        proc.wait()


async def test_listing_more_keys_than_lua_can_unpack_at_once(redis_server: RedisServer) -> None:
    """Lua's unpack() stops at 8,000 values; list() must not."""
    store = await RedisStore.open(redis_server.url())
    n = 8200
    try:
        pipe = store._r.pipeline(transaction=False)  # the put script, n times, one round trip
        for i in range(n):
            args = [store.addr.prefix, store.history, f"tok{i}", "put", f"many/{i:05d}", b"v", "",
                    60_000]
            await store._write_script(args=args, client=pipe)
        await pipe.execute()
        listed = await store.list("many/")
        assert [e.key for e in listed] == [f"many/{i:05d}" for i in range(n)]
        assert {e.revision for e in listed} == set(range(1, n + 1))
    finally:
        await store.close()


async def test_a_watch_and_a_lease_ride_out_a_restart(fsync_always_server: RedisServer) -> None:
    """Across kill -9 and restart: a pending watch sees later writes, a lease keeps its keys."""
    server = fsync_always_server
    url = server.url()
    reader, writer = await RedisStore.open(url), await RedisStore.open(url)
    try:
        lease = await writer.lease(30)
        await writer.put("r/held", b"1", lease=lease)
        changes = reader.watch("r/")
        pending = asyncio.ensure_future(anext(changes))
        await asyncio.sleep(0.05)
        server.stop(kill=True)
        server.start()
        revision = await writer.put("r/after", b"2")
        async with asyncio.timeout(5):
            change = await pending
        assert (change.key, change.revision) == ("r/after", revision)
        await lease.keepalive()
        assert (await reader.get("r/held")) is not None
    finally:
        await reader.close()
        await writer.close()
