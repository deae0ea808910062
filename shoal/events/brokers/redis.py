"""The Redis broker: every partition a Redis Stream whose entry ids are its offsets.

``redis://HOST:PORT/DB?prefix=NAME`` (see ``shoal.redisio`` for the URL and for riding
out restarts). Keys, under ``NAME:``: ``topics`` (hash: name -> spec), ``log:T:P`` (the
stream of partition P of topic T), ``meta:T`` (hash: next offset ``nP``, first kept
offset ``sP`` and kept bytes ``bP`` per partition), ``dedup:T:ID`` (one key per dedup id,
expiring with the window), ``batch:TOKEN`` (an append's answer, for retries).

* Offsets: one Lua script appends a whole batch atomically, giving each record the
  explicit stream id ``<offset+1>-0``, so offsets are gapless, stable and shared by every
  client; a read is ``XRANGE`` from ``<offset+1>-0``.
* Deduplication happens in the same script, before the append it would prevent; each id
  is a key with ``PX window``, so the window needs no sweeping.
* Retries: each append carries a random token and the script keeps its answer (a few
  bytes per batch) for the reconnect window plus 10 s, as long as a retry can come, so an
  append re-sent after a broken connection is applied once.
* Waiting: the script ``PUBLISH``es on ``NAME:appended:T``; one pub/sub connection per
  broker turns that into ``append_generation`` bumps (no polling).
* Retention: ``XTRIM MINID`` after finding, in a script, the first record that age and
  size keep.
* Durability is Redis's: run it with ``appendonly yes``. With ``appendfsync everysec``
  (Redis's default once AOF is on) an acknowledged append survives kill -9 of
  redis-server (the AOF is written before the reply) but power loss may take the last
  second; ``appendfsync always`` survives power loss too. ``durability`` reports what the
  server said at connect time, and a server without AOF is logged as a warning.

Consumer groups are not Redis consumer groups: Shoal's groups (membership, partition
ownership through leases, committed offsets, seeks) live once in ``EventBus`` over the
Store, the same on every backend. A broker only needs a gapless log; XREADGROUP's
pending lists would be a second, different notion of "delivered" to keep in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
import uuid

from shoal.errors import ConfigError, PublishError, ShoalError, TopicError
from shoal.events.brokers.base import (
    Append,
    Appended,
    Broker,
    PartitionRange,
    Record,
    TopicSpec,
)
from shoal.redisio import Notifications, make_client, parse_redis_url, with_reconnect

log = logging.getLogger("shoal.events.redis")

RETENTION_STEP = 10_000  # records a retention script call may trim (keeps Redis responsive)
ANSWER_SLACK = 10.0  # an append's answer outlives the reconnect window by this (seconds)

_CREATE = """
local key, name, spec = ARGV[1] .. ':topics', ARGV[2], ARGV[3]
local found = redis.call('HGET', key, name)
if found then return found end
redis.call('HSET', key, name, spec)
return spec
"""

_APPEND = """
local P, topic, window, token, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local bkey = P .. ':batch:' .. token
local prev = redis.call('GET', bkey)
if prev then return prev end
if not redis.call('HEXISTS', P .. ':topics', topic) then
  return redis.error_reply('NOTOPIC topic ' .. topic .. ' does not exist')
end
local meta = P .. ':meta:' .. topic
local logp = P .. ':log:' .. topic .. ':'
local dedp = P .. ':dedup:' .. topic .. ':'
local nxt, size, out = {}, {}, {}
local i = 6
for r = 1, n do
  local p, ts, key, value, did = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  i = i + 5
  local dkey, dup = nil, nil
  if did ~= '' and window > 0 then
    dkey = dedp .. did
    dup = redis.call('GET', dkey)
  end
  if dup then
    out[r] = 'd' .. dup
  else
    local off = nxt[p]
    if not off then off = tonumber(redis.call('HGET', meta, 'n' .. p) or '0') end
    local id = string.format('%d-0', off + 1)
    if key == '' then
      redis.call('XADD', logp .. p, id, 't', ts, 'v', value)
    else
      redis.call('XADD', logp .. p, id, 't', ts, 'k', string.sub(key, 2), 'v', value)
    end
    nxt[p] = off + 1
    size[p] = (size[p] or 0) + #value
    local at = string.format('%d', off)
    if dkey then redis.call('SET', dkey, p .. ':' .. at, 'PX', window) end
    out[r] = at
  end
end
for p, off in pairs(nxt) do
  redis.call('HSET', meta, 'n' .. p, string.format('%d', off))
  redis.call('HINCRBY', meta, 'b' .. p, size[p])
end
local answer = table.concat(out, ',')
redis.call('SET', bkey, answer, 'PX', tonumber(ARGV[6 + 5 * n]))
redis.call('PUBLISH', P .. ':appended:' .. topic, '1')
return answer
"""

# One bulk string per read (see ``_parse_read``): parsing thousands of RESP elements in
# Python cost more than everything else on the consume path.
_READ = """
local e = redis.call('XRANGE', ARGV[1], ARGV[2], '+', 'COUNT', ARGV[3])
if #e == 0 then return '' end
local id = e[1][1]
local parts = {struct.pack('>i8I4', tonumber(string.sub(id, 1, string.find(id, '-') - 1)) - 1, #e)}
for i, entry in ipairs(e) do
  local f = entry[2]
  if #f == 4 then
    parts[i + 1] = struct.pack('>i8i4I4', tonumber(f[2]), -1, #f[4]) .. f[4]
  else
    parts[i + 1] = struct.pack('>i8i4I4', tonumber(f[2]), #f[4], #f[6]) .. f[4] .. f[6]
  end
end
return table.concat(parts)
"""
_READ_HEAD = struct.Struct(">qI")  # first offset, record count (offsets are gapless)
_RECORD_HEAD = struct.Struct(">qiI")  # timestamp ms, key length (-1: no key), value length


def _parse_read(blob: bytes, partition: int) -> list[Record]:
    """The records of a ``_READ`` answer."""
    if not blob:
        return []
    first, count = _READ_HEAD.unpack_from(blob, 0)
    pos, head, out = _READ_HEAD.size, _RECORD_HEAD, []
    unpack, size = head.unpack_from, head.size
    for offset in range(first, first + count):
        ts, klen, vlen = unpack(blob, pos)
        pos += size
        key = None
        if klen >= 0:
            key = blob[pos : pos + klen].decode()
            pos += klen
        out.append(Record(partition, offset, ts, key, blob[pos : pos + vlen]))
        pos += vlen
    return out

# The first offset in [lo, hi) whose timestamp is >= ARGV[4] (hi if none), by bisection.
_BISECT = """
local function ts_at(stream, off)
  local e = redis.call('XRANGE', stream, string.format('%d-0', off + 1), '+', 'COUNT', 1)
  if #e == 0 then return nil end
  return tonumber(e[1][2][2])
end
local stream, lo, hi, target = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
while lo < hi do
  local mid = math.floor((lo + hi) / 2)
  local ts = ts_at(stream, mid)
  if ts == nil or ts >= target then hi = mid else lo = mid + 1 end
end
return string.format('%d', lo)
"""

# Trim partition ARGV[3] of topic ARGV[2]: records older than ARGV[4] (ms, -1: none) and
# the oldest while kept bytes exceed ARGV[5] (-1: no limit); at most ARGV[6] records.
_RETAIN = """
local P, topic, p = ARGV[1], ARGV[2], ARGV[3]
local cutoff, limit, step = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local meta = P .. ':meta:' .. topic
local stream = P .. ':log:' .. topic .. ':' .. p
local start = tonumber(redis.call('HGET', meta, 's' .. p) or '0')
local size = tonumber(redis.call('HGET', meta, 'b' .. p) or '0')
local drop_to, gone_bytes, gone = start, 0, 0
local from = string.format('%d-0', start + 1)
local done = false
while not done and gone < step do
  local entries = redis.call('XRANGE', stream, from, '+', 'COUNT', 500)
  if #entries == 0 then break end
  for _, e in ipairs(entries) do
    local f = e[2]
    local ts, nbytes = tonumber(f[2]), #f[#f]
    local too_old = ts < cutoff
    local too_big = limit >= 0 and size - gone_bytes > limit
    if not (too_old or too_big) or gone >= step then done = true break end
    local id = e[1]
    drop_to = tonumber(string.sub(id, 1, string.find(id, '-') - 1))
    gone_bytes, gone = gone_bytes + nbytes, gone + 1
  end
  if not done then from = '(' .. entries[#entries][1] end
end
if gone > 0 then
  redis.call('XTRIM', stream, 'MINID', string.format('%d-0', drop_to + 1))
  redis.call('HSET', meta, 's' .. p, string.format('%d', drop_to))
  redis.call('HINCRBY', meta, 'b' .. p, -gone_bytes)
end
return gone
"""


def _encode_spec(spec: TopicSpec) -> str:
    rs = "" if spec.retention_seconds is None else repr(spec.retention_seconds)
    rb = "" if spec.retention_bytes is None else str(spec.retention_bytes)
    return f"{spec.partitions},{rs},{rb}"


def _decode_spec(name: str, raw: bytes) -> TopicSpec:
    parts, rs, rb = raw.decode().split(",")
    return TopicSpec(name, int(parts), float(rs) if rs else None, int(rb) if rb else None)


class RedisBroker(Broker):
    """Partitioned logs as Redis Streams with offset ids, shared by every client of the server."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.addr = parse_redis_url(url, "broker")
        self._p = self.addr.prefix
        self._r = make_client(self.addr)
        self._scripts = {
            name: self._r.register_script(src)
            for name, src in (("create", _CREATE), ("append", _APPEND), ("read", _READ),
                              ("bisect", _BISECT), ("retain", _RETAIN))
        }
        self._topics: dict[str, TopicSpec] = {}
        self._epoch = 0  # bumped whenever notifications may have been missed
        self._gens: dict[str, int] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._notes = Notifications(
            self.addr, [f"{self._p}:appended:*"], self._on_appended, self._on_reset
        )
        self._channel_head = len(f"{self._p}:appended:")
        self.durability: dict[str, str] = {}

    @classmethod
    async def open(cls, url: str) -> RedisBroker:
        """Connect to the server at ``url`` (ConfigError if it cannot be reached)."""
        self = cls(url)
        try:
            self.durability = await self._server_durability()
        except ShoalError:
            await self.close()
            raise
        if self.durability.get("appendonly") == "no":
            log.warning(
                "broker %s: the server runs without appendonly: acknowledged events are lost "
                "when it restarts (run redis-server --appendonly yes)", url,
            )
        return self

    async def _server_durability(self) -> dict[str, str]:
        import redis.exceptions as rex

        try:
            await self._r.ping()
        except (rex.RedisError, OSError) as exc:
            raise ConfigError(f"broker url {self.url!r}: cannot reach Redis: {exc}") from exc
        out: dict[str, str] = {}
        with contextlib.suppress(rex.RedisError):  # CONFIG may be disabled on managed servers
            for name in ("appendonly", "appendfsync"):
                for key, value in (await self._r.config_get(name)).items():
                    key = key.decode() if isinstance(key, bytes) else key
                    if key == name:
                        out[name] = value.decode() if isinstance(value, bytes) else str(value)
        return out

    async def _run(self, script: str, args: list[object], what: str, error=TopicError):  # type: ignore[no-untyped-def]
        return await with_reconnect(
            lambda: self._scripts[script](args=args), deadline_after=self.addr.reconnect,
            error=error, what=f"broker {self.url} {what}",
        )

    # -- topics ----------------------------------------------------------------------
    async def create_topic(self, spec: TopicSpec) -> TopicSpec:
        raw = await self._run("create", [self._p, spec.name, _encode_spec(spec)], "create topic")
        existing = _decode_spec(spec.name, raw)
        if existing.partitions != spec.partitions:
            raise TopicError(
                f"topic {spec.name!r} exists with {existing.partitions} partitions, "
                f"not {spec.partitions}"
            )
        self._topics[spec.name] = existing
        return existing

    async def get_topic(self, name: str) -> TopicSpec | None:
        cached = self._topics.get(name)
        if cached is not None:
            return cached
        raw = await with_reconnect(
            lambda: self._r.hget(f"{self._p}:topics", name), deadline_after=self.addr.reconnect,
            error=TopicError, what=f"broker {self.url} get topic",
        )
        if raw is None:
            return None
        spec = self._topics[name] = _decode_spec(name, raw)
        return spec

    async def list_topics(self) -> list[TopicSpec]:
        raw = await with_reconnect(
            lambda: self._r.hgetall(f"{self._p}:topics"), deadline_after=self.addr.reconnect,
            error=TopicError, what=f"broker {self.url} list topics",
        )
        return sorted((_decode_spec(k.decode(), v) for k, v in raw.items()), key=lambda s: s.name)

    async def _spec(self, topic: str) -> TopicSpec:
        spec = await self.get_topic(topic)
        if spec is None:
            raise TopicError(f"topic {topic!r} does not exist")
        return spec

    # -- the write path --------------------------------------------------------------
    async def append(self, topic: str, records: list[Append]) -> list[Appended]:
        window = int(self.dedup_window_seconds * 1000)
        args: list[object] = [self._p, topic, window, uuid.uuid4().hex, len(records)]
        for r in records:
            args += (
                r.partition, r.timestamp_ms, "" if r.key is None else "k" + r.key, r.value,
                r.dedup_id or "",
            )
        args.append(int((self.addr.reconnect + ANSWER_SLACK) * 1000))
        try:
            answer: bytes = await self._run("append", args, f"append to {topic!r}", PublishError)
        except PublishError as exc:
            if "NOTOPIC" in str(exc):
                raise TopicError(f"topic {topic!r} does not exist") from None
            raise
        out: list[Appended] = []
        for r, item in zip(records, answer.split(b","), strict=True):
            if item[:1] == b"d":
                p, _, o = item[1:].partition(b":")
                out.append(Appended(int(p), int(o), True))
            else:
                out.append(Appended(r.partition, int(item)))
        return out

    # -- the read path ---------------------------------------------------------------
    def _stream(self, topic: str, partition: int) -> str:
        return f"{self._p}:log:{topic}:{partition}"

    async def read(self, topic: str, partition: int, offset: int, limit: int) -> list[Record]:
        if topic not in self._topics:
            await self._spec(topic)
        blob = await self._run(
            "read", [self._stream(topic, partition), f"{offset + 1}-0", limit], "read"
        )
        return _parse_read(blob, partition)

    async def ranges(self, topic: str) -> list[PartitionRange]:
        spec = await self._spec(topic)
        meta = await with_reconnect(
            lambda: self._r.hgetall(f"{self._p}:meta:{topic}"),
            deadline_after=self.addr.reconnect, error=TopicError,
            what=f"broker {self.url} ranges of {topic!r}",
        )
        get = lambda field: int(meta.get(field.encode(), 0))  # noqa: E731
        return [
            PartitionRange(get(f"s{p}"), get(f"n{p}"), get(f"b{p}"))
            for p in range(spec.partitions)
        ]

    async def offset_for_time(self, topic: str, partition: int, timestamp_ms: int) -> int:
        rng = (await self.ranges(topic))[partition]
        args = [self._stream(topic, partition), rng.start, rng.end, timestamp_ms]
        return int(await self._run("bisect", args, "offset for time"))

    # -- waiting for appends ---------------------------------------------------------
    def _on_appended(self, channel: bytes, _data: bytes) -> None:
        topic = channel[self._channel_head :].decode()
        self._gens[topic] = self._gens.get(topic, 0) + 1
        for fut in self._waiters.pop(topic, ()):
            if not fut.done():
                fut.set_result(None)

    def _on_reset(self) -> None:
        self._epoch += 1
        waiters, self._waiters = self._waiters, {}
        for futs in waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)

    def append_generation(self, topic: str) -> int:
        self._notes.start()
        return (self._epoch << 32) + self._gens.get(topic, 0)

    async def wait_for_append(self, topic: str, since: int, timeout: float) -> None:
        if self.append_generation(topic) != since:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(topic, set()).add(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            pass
        finally:
            waiting = self._waiters.get(topic)
            if waiting is not None:
                waiting.discard(fut)

    # -- retention -------------------------------------------------------------------
    async def apply_retention(self, topic: str) -> int:
        spec = await self._spec(topic)
        if spec.retention_seconds is None and spec.retention_bytes is None:
            return 0
        cutoff = -1
        if spec.retention_seconds is not None:
            cutoff = int((time.time() - spec.retention_seconds) * 1000)
        limit = -1 if spec.retention_bytes is None else spec.retention_bytes
        removed = 0
        for p in range(spec.partitions):
            while True:
                args = [self._p, topic, p, cutoff, limit, RETENTION_STEP]
                gone = int(await self._run("retain", args, f"retention of {topic!r}"))
                removed += gone
                if gone < RETENTION_STEP:
                    break
        return removed

    async def close(self) -> None:
        await self._notes.close()
        self._on_reset()
        with contextlib.suppress(Exception):
            await self._r.aclose()
