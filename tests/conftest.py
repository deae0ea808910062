"""Shared fixtures: temporary state directories and the project's Python for subprocesses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.redis_server import redis_server  # noqa: F401 - a real redis-server fixture

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A fresh `.shoal`-like state directory for one test."""
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One ``nats-server -js`` for the session; tests keep apart by namespace (URL path)."""
    from tests.servers import NatsServer

    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def nats_url(nats_server) -> str:  # type: ignore[no-untyped-def]
    """A ``nats://`` URL with a namespace of its own: a fresh, empty broker and store."""
    import uuid

    return f"{nats_server.url}/t{uuid.uuid4().hex[:12]}"
