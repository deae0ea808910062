"""The broker contract runs against every backend through these fixtures."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shoal.events import EventBus

BACKENDS = ["memory", "sqlite", "nats", "redis"]


@pytest.fixture(params=BACKENDS)
def bus_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty broker URL for each backend."""
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    if request.param == "nats":
        return request.getfixturevalue("nats_url")
    if request.param == "redis":
        return request.getfixturevalue("redis_server").url()
    return f"sqlite:///{tmp_path}/events.db"


@pytest.fixture
async def bus(bus_url: str) -> AsyncIterator[EventBus]:
    """A connected bus on a fresh broker."""
    async with EventBus.connect(bus_url, source="/tests") as b:
        yield b
