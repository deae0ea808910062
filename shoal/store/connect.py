"""Open a Store from a URL: ``memory://``, ``sqlite:///PATH``, ``nats://HOST:PORT``,
``redis://HOST:PORT``."""

from __future__ import annotations

from shoal.errors import ConfigError
from shoal.store.base import Store

DEFAULT_STORE_URL = "sqlite:///.shoal/store.db"


async def connect_store(url: str | None = None) -> Store:
    """Open the store at ``url`` (default ``sqlite:///.shoal/store.db``)."""
    url = url or DEFAULT_STORE_URL
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "memory":
        from shoal.store.memory import MemoryStore

        return MemoryStore.named(url)
    if scheme == "sqlite":
        from shoal.store.sqlite import SqliteStore

        return await SqliteStore.open(url)
    if scheme == "nats":
        from shoal.store.nats import NatsStore

        return await NatsStore.open(url)
    if scheme == "redis":
        from shoal.store.redis import RedisStore

        return await RedisStore.open(url)
    raise ConfigError(
        f"store url: unsupported scheme in {url!r}"
        " (expected memory://, sqlite:///PATH, nats://HOST:PORT or redis://HOST:PORT)"
    )
