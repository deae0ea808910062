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
