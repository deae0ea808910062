"""A real redis-server on a free loopback port, for the tests that run on Redis.

The session fixture ``redis_server`` starts one (append-only, no RDB snapshots, state in
a temporary directory); tests keep apart by key prefix (``redis_server.url()`` makes a
fresh one). Without the binary the tests are skipped with one line, unless
``SHOAL_REQUIRE_SERVERS=1`` (CI), where a missing server is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process on ``port`` keeping its append-only file in ``directory``."""

    def __init__(self, directory: Path, *, fsync: str = "everysec", port: int | None = None):
        self.directory = directory
        self.fsync = fsync
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, prefix: str | None = None) -> str:
        """A URL on this server with a fresh (or the given) key prefix."""
        return f"redis://127.0.0.1:{self.port}/0?prefix={prefix or 't' + uuid.uuid4().hex[:12]}"

    def start(self) -> None:
        """Start the server (loading its append-only file) and wait until it answers."""
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", self.fsync, "--dir", str(self.directory),
             "--loglevel", "warning", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with status {self.proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), 0.2
            ) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGKILL when ``kill``) and reap it."""
        if self.proc is not None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def require_redis_server() -> None:
    """Skip (or, with SHOAL_REQUIRE_SERVERS=1, fail) when redis-server is not installed."""
    if not os.path.exists(REDIS_SERVER):
        message = "redis-server not installed: Redis tests skipped (make servers installs it)"
        if os.environ.get("SHOAL_REQUIRE_SERVERS") == "1":
            pytest.fail(message + "; SHOAL_REQUIRE_SERVERS=1 requires it", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session."""
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
