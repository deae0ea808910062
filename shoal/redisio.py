"""What the Redis broker and Store share: the URL, the client, riding out restarts, pub/sub.

``redis://[user:password@]HOST[:PORT][/DB][?prefix=NAME&reconnect=30s]``: every key the
adapters write starts with ``NAME:`` (default ``shoal``), so several deployments (or
tests) share one server without seeing each other.

Riding out a restart: a command that fails because the connection broke (the server
restarted, is loading its append-only file, a socket timed out) is retried with
backoff for up to ``reconnect`` seconds (default 30s) before the caller gets an error.
That is safe because every script the adapters run is idempotent on retry: a write
carries a token, and a replay of an applied token returns the first answer without
writing again. redis-py's own retries are off, so there is one policy, this one.

Notifications: appends and Store writes ``PUBLISH`` inside their scripts; a
``Notifications`` listener (one pub/sub connection) turns them into wakeups. Pub/sub is
not durable, so after every (re)subscription the listener calls ``on_reset``, which
wakes everyone to re-read: a message missed while disconnected delays nothing.
The adapters run on a standalone Redis (or a Sentinel-managed primary): scripts build
key names from their arguments, which Redis Cluster does not allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from shoal.errors import ConfigError, ShoalError
from shoal.units import parse_duration

log = logging.getLogger("shoal.redis")

T = TypeVar("T")

DEFAULT_PREFIX = "shoal"
DEFAULT_RECONNECT = 30.0
_PREFIX = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_OPTIONS = {"prefix", "reconnect"}


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """A parsed ``redis://`` URL: where the server is, and the key prefix to write under."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    prefix: str
    reconnect: float

    @property
    def identity(self) -> tuple[str, int, int, str]:
        """What makes two URLs the same data: server, database and prefix."""
        return (self.host, self.port, self.db, self.prefix)


def parse_redis_url(url: str, what: str = "broker") -> RedisAddress:
    """Parse ``redis://HOST[:PORT][/DB][?prefix=NAME&reconnect=DURATION]``; ConfigError if bad."""
    if not isinstance(url, str) or len(url) > 2048:
        raise ConfigError(f"{what} url: expected redis://HOST[:PORT][/DB], got {url!r:.80}")
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ConfigError(f"{what} url: expected redis://HOST[:PORT][/DB], got {url!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ConfigError(f"{what} url {url!r}: port must be a number 1..65535") from None
    host = parts.hostname or "localhost"
    path = parts.path.strip("/")
    if path and (not path.isdigit() or int(path) > 10_000):
        raise ConfigError(f"{what} url {url!r}: database must be a number (like /0), got {path!r}")
    if parts.fragment:
        raise ConfigError(f"{what} url {url!r}: fragments are not supported")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigError(f"{what} url {url!r}: malformed query string") from None
    unknown = set(query) - _OPTIONS
    if unknown:
        raise ConfigError(
            f"{what} url {url!r}: unknown option(s) {sorted(unknown)} (known: prefix, reconnect)"
        )
    prefix = query.get("prefix", [DEFAULT_PREFIX])[-1]
    if not _PREFIX.match(prefix):
        raise ConfigError(
            f"{what} url {url!r}: prefix must be 1..64 of A-Z a-z 0-9 _ . -, got {prefix!r:.80}"
        )
    reconnect = parse_duration(
        query.get("reconnect", [DEFAULT_RECONNECT])[-1], name=f"{what} url option reconnect"
    )
    return RedisAddress(
        host=host, port=port, db=int(path or 0),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        prefix=prefix, reconnect=DEFAULT_RECONNECT if reconnect is None else reconnect,
    )


def make_client(addr: RedisAddress, *, timeout: float | None = 10.0):  # type: ignore[no-untyped-def]
    """An asyncio redis-py client for ``addr`` with redis-py's own retries turned off."""
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return redis.Redis(
        host=addr.host, port=addr.port, db=addr.db, username=addr.username,
        password=addr.password, socket_timeout=timeout, socket_connect_timeout=2.0,
        retry=Retry(NoBackoff(), 0), decode_responses=False,
    )


def is_connection_trouble(exc: BaseException) -> bool:
    """True for errors a reconnect cures: a broken or refused connection, a loading server."""
    import redis.exceptions as rex

    return isinstance(exc, rex.ConnectionError | rex.TimeoutError | ConnectionError)


def raise_if_cancelling(exc: BaseException | None = None, before: int = 0) -> None:
    """Re-raise a cancellation that redis-py swallowed.

    A command cancelled mid-reply (``asyncio.timeout`` around a watch, a task being
    stopped) sometimes returns normally or raises a ``ConnectionError`` in redis-py 8
    (measured: about once in a few hundred cancellations); carrying on would lose the
    cancellation and leave the task waiting forever. ``before``: the task's
    ``cancelling()`` count when the call started.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError() from exc


async def with_reconnect(
    call: Callable[[], Awaitable[T]],
    *,
    deadline_after: float,
    error: Callable[[str], ShoalError],
    what: str,
) -> T:
    """Run ``call``; on connection trouble retry with backoff for ``deadline_after`` seconds.

    ``call`` must be safe to repeat (see the module docstring). Other Redis errors, and
    connection trouble past the deadline, become ``error(message)`` naming ``what``.
    """
    import redis.exceptions as rex

    deadline = time.monotonic() + deadline_after
    delay = 0.02
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    while True:
        try:
            result = await call()
            raise_if_cancelling(None, before)
            return result
        except rex.RedisError as exc:
            raise_if_cancelling(exc, before)
            if not is_connection_trouble(exc):
                raise error(f"{what}: {type(exc).__name__}: {exc}") from exc
            if time.monotonic() + delay > deadline:
                raise error(
                    f"{what}: Redis unreachable for {deadline_after:.3g}s: {exc}"
                ) from exc
            log.info("%s: connection trouble (%s); retrying in %.2fs", what, exc, delay)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(1.0, delay * 2)


class Notifications:
    """One pub/sub connection on ``patterns``: messages to ``on_message``, reconnecting.

    ``on_reset`` runs after each successful (re)subscription, when messages may have been
    missed. ``ready`` is set while subscribed.
    """

    def __init__(
        self,
        addr: RedisAddress,
        patterns: list[str],
        on_message: Callable[[bytes, bytes], None],
        on_reset: Callable[[], None],
    ) -> None:
        self.addr = addr
        self.patterns = patterns
        self.on_message = on_message
        self.on_reset = on_reset
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start listening in the background (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"shoal-redis-notify {self.patterns[0]}"
            )

    async def _run(self) -> None:
        import redis.exceptions as rex

        delay = 0.02
        while True:
            client = make_client(self.addr, timeout=None)
            pubsub = client.pubsub()
            try:
                await pubsub.psubscribe(*self.patterns)
                while True:
                    msg = await pubsub.parse_response(block=True)
                    raise_if_cancelling()
                    if msg is None:
                        continue
                    kind = msg[0]
                    if kind == b"pmessage":
                        self.on_message(msg[2], msg[3])
                    elif kind == b"psubscribe" and msg[2] == len(self.patterns):
                        delay = 0.02
                        self.ready.set()
                        self.on_reset()
            except (rex.RedisError, OSError) as exc:
                raise_if_cancelling(exc)
                if self.ready.is_set():
                    log.info("notifications on %s lost: %s; resubscribing", self.patterns, exc)
                self.ready.clear()
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(1.0, delay * 2)

    async def close(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self.ready.clear()
