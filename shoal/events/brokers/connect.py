"""Open a Broker from a URL: ``memory://``, ``sqlite:///PATH``, ``nats://HOST:PORT``,
``redis://HOST:PORT``."""

from __future__ import annotations

from shoal.errors import ConfigError
from shoal.events.brokers.base import Broker

DEFAULT_BROKER_URL = "sqlite:///.shoal/events.db"


async def connect_broker(url: str | None = None) -> Broker:
    """Open the broker at ``url`` (default ``sqlite:///.shoal/events.db``)."""
    url = url or DEFAULT_BROKER_URL
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "memory":
        from shoal.events.brokers.memory import MemoryBroker

        return MemoryBroker(url)
    if scheme == "sqlite":
        from shoal.events.brokers.sqlite import SqliteBroker

        return await SqliteBroker.open(url)
    if scheme == "nats":
        from shoal.events.brokers.nats import NatsBroker

        return await NatsBroker.open(url)
    if scheme == "redis":
        from shoal.events.brokers.redis import RedisBroker

        return await RedisBroker.open(url)
    raise ConfigError(
        f"broker url: unsupported scheme in {url!r}"
        " (expected memory://, sqlite:///PATH, nats://HOST:PORT or redis://HOST:PORT)"
    )
