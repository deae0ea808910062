"""The Redis Store: keys, revisions, leases and the watch log in one Redis database.

``redis://HOST:PORT/DB?prefix=NAME`` (see ``shoal.redisio``). Keys under ``NAME:s:``:
``rev`` (the store-wide revision, INCR), ``val``/``krev``/``klease`` (hashes: key -> value,
revision, lease id), ``keys`` (a sorted set of every key at score 0: ``ZRANGEBYLEX`` lists
a prefix in byte order, which is code-point order), ``leases`` (sorted set: lease id ->
expiry in server milliseconds), ``lk:ID`` (set: the keys on a lease), ``changes`` (a
stream with id ``<revision>-0`` per change: the watch log), ``compacted``.

* Every operation is one Lua script, so it is atomic; scripts take the time from the
  server (``TIME``), so clients' clocks do not matter. Every write script first sweeps
  expired leases (deleting their keys and logging the deletes), then does its work,
  trims the log in bulk once it holds 2x ``history`` changes, and ``PUBLISH``es the new
  revision on ``NAME:s:changed``. Reads sweep first too, so a holder killed with -9
  loses its keys at most ``ttl`` later for anyone who looks.
* Watch: one pub/sub listener per client wakes its watchers, which read the log after
  their last revision (``XRANGE``); a client with watchers also runs a timer set for the
  earliest lease expiry that sweeps, so watchers see the deletes without anyone writing.
  A watcher further behind than the log gets a ``StoreError``: list again and watch
  from ``revision()``.
* Retries after a broken connection are safe: each write carries a token and the
  script keeps its answer for as long as a retry can come (the reconnect window + 10 s).
* ``watch()`` must fix "now" before it returns, so it reads the revision with a blocking
  ``GET`` on a dedicated synchronous connection (about 100 us on loopback).

Durability: coordination state (offsets, ownership, registry); with ``appendonly yes``
it survives a restart of redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from shoal.errors import ConfigError, LeaseExpired, StoreError
from shoal.redisio import Notifications, make_client, parse_redis_url, with_reconnect
from shoal.store.base import Change, Entry, Lease, Store
from shoal.store.validation import (
    DEFAULT_HISTORY,
    check_key,
    check_prefix,
    check_revision,
    check_ttl,
    check_value,
    prefix_end,
)
from shoal.store.watch import ChangeStream

WATCH_BATCH = 500
ANSWER_SLACK = 10.0  # a write's answer outlives the reconnect window by this (seconds)
EXPIRY_SLACK = 0.005  # wake this long after a lease's expiry, so it has surely expired

_PRELUDE = """
local S = ARGV[1] .. ':s'
local K_REV, K_VAL, K_KREV, K_KLEASE = S .. ':rev', S .. ':val', S .. ':krev', S .. ':klease'
local K_KEYS, K_LEASES, K_CHANGES, K_COMPACTED = S .. ':keys', S .. ':leases', S .. ':changes',
  S .. ':compacted'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function record(key, value)
  local rev = redis.call('INCR', K_REV)
  local id = string.format('%d-0', rev)
  if value then redis.call('XADD', K_CHANGES, id, 'k', key, 'v', value)
  else redis.call('XADD', K_CHANGES, id, 'k', key) end
  return rev
end
local function detach(key)
  local lid = redis.call('HGET', K_KLEASE, key)
  if lid then
    redis.call('SREM', S .. ':lk:' .. lid, key)
    redis.call('HDEL', K_KLEASE, key)
  end
end
local function remove(key)
  detach(key)
  redis.call('HDEL', K_VAL, key)
  redis.call('HDEL', K_KREV, key)
  redis.call('ZREM', K_KEYS, key)
  return record(key, false)
end
local function drop_lease(lid)
  local keys = redis.call('SMEMBERS', S .. ':lk:' .. lid)
  table.sort(keys)
  for _, key in ipairs(keys) do remove(key) end
  redis.call('DEL', S .. ':lk:' .. lid)
  redis.call('ZREM', K_LEASES, lid)
end
local function sweep(now)
  local due = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now)
  for _, lid in ipairs(due) do drop_lease(lid) end
end
local function earliest(now)
  local first = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
  if #first == 0 then return -1 end
  return math.max(0, tonumber(first[2]) - now)
end
"""

# ARGV: prefix, history, token, op, args...; answers "ok:N", "ok", "no", "expired", or
# for 'sweep' the ms until the earliest lease expiry (-1: none).
_WRITE = _PRELUDE + """
local history, token, op = tonumber(ARGV[2]), ARGV[3], ARGV[4]
local wkey = S .. ':w:' .. token
local prev = redis.call('GET', wkey)
if prev then return prev end
local start = tonumber(redis.call('GET', K_REV) or '0')
local now = now_ms()
sweep(now)
local answer
local function lease_alive(lid)
  return lid == '' or redis.call('ZSCORE', K_LEASES, lid) ~= false
end
local function upsert(key, value, lid)
  detach(key)
  local rev = record(key, value)
  redis.call('HSET', K_VAL, key, value)
  redis.call('HSET', K_KREV, key, rev)
  redis.call('ZADD', K_KEYS, 0, key)
  if lid ~= '' then
    redis.call('HSET', K_KLEASE, key, lid)
    redis.call('SADD', S .. ':lk:' .. lid, key)
  end
  return 'ok:' .. rev
end
local function key_rev(key)
  return tonumber(redis.call('HGET', K_KREV, key) or '0')
end
if op == 'put' then
  if not lease_alive(ARGV[7]) then answer = 'expired'
  else answer = upsert(ARGV[5], ARGV[6], ARGV[7]) end
elseif op == 'cas' then
  if not lease_alive(ARGV[7]) then answer = 'expired'
  elseif key_rev(ARGV[5]) ~= tonumber(ARGV[8]) then answer = 'no'
  else answer = upsert(ARGV[5], ARGV[6], ARGV[7]) end
elseif op == 'delete' then
  local current = key_rev(ARGV[5])
  if current == 0 or (ARGV[6] ~= '' and current ~= tonumber(ARGV[6])) then answer = 'no'
  else remove(ARGV[5]); answer = 'ok' end
elseif op == 'grant' then
  local lid = redis.call('INCR', S .. ':leaseid')
  redis.call('ZADD', K_LEASES, now + tonumber(ARGV[5]), lid)
  redis.call('PUBLISH', S .. ':changed', 'L')
  answer = 'ok:' .. lid
elseif op == 'keepalive' then
  if redis.call('ZSCORE', K_LEASES, ARGV[5]) == false then answer = 'expired'
  else redis.call('ZADD', K_LEASES, now + tonumber(ARGV[6]), ARGV[5]); answer = 'ok' end
elseif op == 'revoke' then
  drop_lease(ARGV[5]); answer = 'ok'
elseif op == 'sweep' then
  answer = string.format('%d', earliest(now))
end
local rev = tonumber(redis.call('GET', K_REV) or '0')
if rev ~= start then
  local compacted = tonumber(redis.call('GET', K_COMPACTED) or '0')
  if rev - compacted >= 2 * history then
    local cut = rev - history
    redis.call('XTRIM', K_CHANGES, 'MINID', string.format('%d-0', cut + 1))
    redis.call('SET', K_COMPACTED, cut)
  end
  redis.call('PUBLISH', S .. ':changed', rev)
end
if op ~= 'sweep' then redis.call('SET', wkey, answer, 'PX', tonumber(ARGV[#ARGV])) end
return answer
"""

# Reads sweep first only when a lease is due (then they publish the deletes).
_READ = _PRELUDE + """
local op = ARGV[2]
local now = now_ms()
if #redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, 1) > 0 then
  sweep(now)
  redis.call('PUBLISH', S .. ':changed', redis.call('GET', K_REV))
end
if op == 'get' then
  local key = ARGV[3]
  local value = redis.call('HGET', K_VAL, key)
  if not value then return false end
  return {value, redis.call('HGET', K_KREV, key), redis.call('HGET', K_KLEASE, key) or ''}
elseif op == 'list' then
  local keys = redis.call('ZRANGEBYLEX', K_KEYS, ARGV[3], ARGV[4])
  local out = {}
  for first = 1, #keys, 1000 do  -- unpack() is limited to a few thousand values
    local chunk = {unpack(keys, first, math.min(#keys, first + 999))}
    local vals = redis.call('HMGET', K_VAL, unpack(chunk))
    local revs = redis.call('HMGET', K_KREV, unpack(chunk))
    local leases = redis.call('HMGET', K_KLEASE, unpack(chunk))
    for i, key in ipairs(chunk) do
      out[#out + 1] = key
      out[#out + 1] = vals[i]
      out[#out + 1] = revs[i]
      out[#out + 1] = leases[i] or ''
    end
  end
  return out
elseif op == 'revision' then
  return tonumber(redis.call('GET', K_REV) or '0')
elseif op == 'changes' then
  local last, prefix, batch = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
  local rev = tonumber(redis.call('GET', K_REV) or '0')
  local compacted = tonumber(redis.call('GET', K_COMPACTED) or '0')
  if last < compacted then return {-1, compacted} end
  local entries = redis.call('XRANGE', K_CHANGES, string.format('%d-0', last + 1),
    string.format('%d-0', rev), 'COUNT', batch)
  local upto = rev
  if #entries == batch then
    local id = entries[#entries][1]
    upto = tonumber(string.sub(id, 1, string.find(id, '-') - 1))
  end
  local out = {rev, upto}
  local n = #prefix
  for _, e in ipairs(entries) do
    local f = e[2]
    if string.sub(f[2], 1, n) == prefix then
      out[#out + 1] = e[1]
      out[#out + 1] = f[2]
      out[#out + 1] = f[4] or false
    end
  end
  return out
end
return redis.error_reply('unknown op ' .. op)
"""


class RedisLease(Lease):
    """A lease in a ``RedisStore`` (valid in every client of the same server and prefix)."""

    def __init__(self, store: RedisStore, lease_id: int, ttl: float) -> None:
        self._store = store
        self.id = lease_id
        self.ttl = ttl

    async def keepalive(self) -> None:
        answer = await self._store._write("keepalive", self.id, _ms(self.ttl))
        if answer == "expired":
            raise LeaseExpired(f"lease {self.id} (ttl {self.ttl}s) expired or was revoked")

    async def revoke(self) -> None:
        await self._store._write("revoke", self.id)

    def __repr__(self) -> str:
        return f"RedisLease(id={self.id}, ttl={self.ttl}, store={self._store.url!r})"


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _bytes_range(prefix: str) -> tuple[bytes, bytes]:
    """``ZRANGEBYLEX`` bounds for keys starting with ``prefix``."""
    if not prefix:
        return b"-", b"+"
    end = prefix_end(prefix)
    low = b"[" + prefix.encode()
    return low, (b"+" if end is None else b"(" + end.encode())


class _RedisChangeStream(ChangeStream):
    def __init__(self, store: RedisStore, prefix: str, last: int) -> None:
        super().__init__(prefix, last, store._watcher_stopped)
        self._store = store

    async def _fetch(self) -> list[Change] | None:
        store = self._store
        while not store._closed:
            changed = store._changed  # taken before reading: no wakeup is lost
            changes, self.last = await store._changes_after(self.prefix, self.last)
            if changes:
                return changes
            await changed.wait()
        return None


class RedisStore(Store):
    """Store adapter on a Redis server, shared by every client of the same URL."""

    def __init__(self, url: str, history: int) -> None:
        self.url = url
        self.addr = parse_redis_url(url, "store")
        self.history = history
        self._p = self.addr.prefix
        self._r = make_client(self.addr)
        self._write_script = self._r.register_script(_WRITE)
        self._read_script = self._r.register_script(_READ)
        self._sync: Any = None  # the blocking client watch() reads "now" with
        self._closed = False
        self._changed = asyncio.Event()  # replaced on every bump; watchers await it
        self._lease_granted = asyncio.Event()
        self._notes = Notifications(
            self.addr, [f"{self._p}:s:changed"], self._on_changed, self._bump
        )
        self._watchers = 0
        self._pump_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, *, history: int = DEFAULT_HISTORY) -> RedisStore:
        """Connect to the server at ``redis://...`` (ConfigError if it cannot be reached)."""
        import redis.exceptions as rex

        if not isinstance(history, int) or history < 1:
            raise ConfigError(f"store history: must be an int >= 1, got {history!r}")
        self = cls(url, history)
        try:
            await self._r.ping()
        except (rex.RedisError, OSError) as exc:
            await self._r.aclose()
            raise ConfigError(f"store url {url!r}: cannot reach Redis: {exc}") from exc
        return self

    # -- calls -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.url}: closed")

    async def _call(self, script: Any, args: list[object], what: str) -> Any:
        self._check_open()
        return await with_reconnect(
            lambda: script(args=args), deadline_after=self.addr.reconnect,
            error=StoreError, what=f"store {self.url} {what}",
        )

    async def _write(self, op: str, *args: object) -> str:
        token = uuid.uuid4().hex
        keep_ms = int((self.addr.reconnect + ANSWER_SLACK) * 1000)
        answer = await self._call(
            self._write_script, [self._p, self.history, token, op, *args, keep_ms], op
        )
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    async def _read(self, op: str, *args: object) -> Any:
        return await self._call(self._read_script, [self._p, op, *args], op)

    def _lease_id(self, lease: Lease | None) -> int | str:
        if lease is None:
            return ""
        if not isinstance(lease, RedisLease) or lease._store.addr.identity != self.addr.identity:
            raise StoreError(f"store {self.url}: {lease!r} was granted by another store")
        return lease.id

    @staticmethod
    def _revision(answer: str, lease: Lease | None) -> int | None:
        if answer == "expired":
            assert lease is not None
            raise LeaseExpired(f"lease {lease.id} (ttl {lease.ttl}s) expired or was revoked")
        if answer == "no":
            return None
        return int(answer[3:])

    # -- the contract ----------------------------------------------------------------
    async def get(self, key: str) -> Entry | None:
        key = check_key(key)
        row = await self._read("get", key)
        if row is None:
            return None
        value, rev, lease = row
        return Entry(key, value, int(rev), int(lease) if lease else None)

    async def list(self, prefix: str) -> list[Entry]:
        low, high = _bytes_range(check_prefix(prefix))
        flat = await self._read("list", low, high)
        return [
            Entry(flat[i].decode(), flat[i + 1], int(flat[i + 2]),
                  int(flat[i + 3]) if flat[i + 3] else None)
            for i in range(0, len(flat), 4)
        ]

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        key = check_key(key)
        value = check_value(key, value)
        lease_id = self._lease_id(lease)
        revision = self._revision(await self._write("put", key, value, lease_id), lease)
        assert revision is not None
        return revision

    async def cas(
        self, key: str, value: bytes, *, expected_revision: int, lease: Lease | None = None
    ) -> int | None:
        key = check_key(key)
        value = check_value(key, value)
        expected = check_revision(expected_revision, "cas expected_revision")
        lease_id = self._lease_id(lease)
        return self._revision(await self._write("cas", key, value, lease_id, expected), lease)

    async def delete(self, key: str, *, expected_revision: int | None = None) -> bool:
        key = check_key(key)
        if expected_revision is not None:
            check_revision(expected_revision, "delete expected_revision")
        expected = "" if expected_revision is None else expected_revision
        return await self._write("delete", key, expected) == "ok"

    async def lease(self, ttl: float) -> Lease:
        ttl = check_ttl(ttl)
        answer = await self._write("grant", _ms(ttl))
        return RedisLease(self, int(answer[3:]), ttl)

    async def revision(self) -> int:
        return int(await self._read("revision"))

    # -- watch -----------------------------------------------------------------------
    def watch(self, prefix: str, *, after_revision: int | None = None) -> ChangeStream:
        """Changes under ``prefix``; "now" is this call, not the first ``anext``."""
        prefix = check_prefix(prefix)
        self._check_open()
        if after_revision is None:
            start = self._revision_now()
        else:
            start = check_revision(after_revision, "watch after_revision")
        self._watcher_started()
        return _RedisChangeStream(self, prefix, start)

    def _revision_now(self) -> int:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if self._sync is None:
            a = self.addr
            self._sync = redis.Redis(
                host=a.host, port=a.port, db=a.db, username=a.username, password=a.password,
                socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 2),
            )
        try:
            return int(self._sync.get(f"{self._p}:s:rev") or 0)
        except redis.RedisError as exc:
            raise StoreError(f"store {self.url}: cannot read the revision: {exc}") from exc

    async def _changes_after(self, prefix: str, last: int) -> tuple[list[Change], int]:
        flat = await self._read("changes", last, prefix.encode(), WATCH_BATCH)
        rev, upto = int(flat[0]), int(flat[1])
        if rev == -1:
            raise StoreError(
                f"store {self.url}: watch on {prefix!r} fell behind: changes up to revision "
                f"{upto} were compacted; list again and watch from the current revision"
            )
        changes = []
        for i in range(2, len(flat), 3):
            rid, key, value = flat[i], flat[i + 1], flat[i + 2]
            revision = int(rid[: rid.index(b"-")])
            if value is None:
                changes.append(Change("delete", key.decode(), None, revision))
            else:
                changes.append(Change("put", key.decode(), value, revision))
        return changes, max(last, upto)  # upto: the last revision scanned

    def _bump(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        self._lease_granted.set()  # a reset may have hidden a grant: re-read expiries

    def _on_changed(self, _channel: bytes, data: bytes) -> None:
        if data == b"L":
            self._lease_granted.set()
        else:
            self._bump()

    def _watcher_started(self) -> None:
        self._watchers += 1
        self._notes.start()
        if self._pump_task is None and not self._closed:
            self._pump_task = asyncio.get_running_loop().create_task(
                self._pump(), name=f"shoal-store-leases {self.url}"
            )

    def _watcher_stopped(self) -> None:
        self._watchers -= 1
        if self._watchers == 0 and self._pump_task is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                self._pump_task.cancel()
            self._pump_task = None

    async def _pump(self) -> None:
        """Sweep leases when the earliest one is due, so watchers see its keys' deletes."""
        due: float | None = 0.0
        while True:
            timeout = None if due is None else max(0.0, due - time.monotonic()) + EXPIRY_SLACK
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._lease_granted.wait()
            self._lease_granted.clear()
            try:
                wait_ms = int(await self._write("sweep"))
            except StoreError:
                if self._closed:
                    return
                due = time.monotonic() + 1.0
                continue
            due = None if wait_ms < 0 else time.monotonic() + wait_ms / 1000

    async def close(self) -> None:
        """End watchers and background tasks; close the connections."""
        if self._closed:
            return
        self._closed = True
        if self._pump_task is not None:
            self._pump_task.cancel()
            self._pump_task = None
        await self._notes.close()
        self._bump()
        with contextlib.suppress(Exception):
            await self._r.aclose()
        if self._sync is not None:
            with contextlib.suppress(Exception):
                self._sync.close()

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r})"

