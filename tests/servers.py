"""Real servers for tests: ``nats-server -js`` on free loopback ports with temporary state.

A missing binary skips the tests that need it with one line saying so, unless
``SHOAL_REQUIRE_SERVERS=1`` (CI), where it fails them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_binary(name: str) -> str:
    """The path of ``name``, or skip (fail when SHOAL_REQUIRE_SERVERS=1) if it is missing."""
    exe = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                 else None)
    if exe is None:
        message = f"{name} not installed (apt-get install {name}): its tests are skipped"
        if os.environ.get("SHOAL_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{name} not installed and SHOAL_REQUIRE_SERVERS=1")
        pytest.skip(message)
    return exe


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nats-server did not listen on {port} within {timeout}s")


class NatsServer:
    """One ``nats-server -js`` process: start, stop, kill -9 and restart on the same state."""

    def __init__(self, store_dir: Path, *, port: int | None = None, name: str = "n1",
                 cluster_port: int | None = None, routes: list[int] | None = None) -> None:
        self.exe = require_binary("nats-server")
        self.store_dir = store_dir
        self.port = port or free_port()
        self.name = name
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats.conf"
        conf.write_text("max_payload: 2MB\n")  # a 1 MiB Store value plus its key and framing
        args = [self.exe, "-c", str(conf), "-js", "-a", "127.0.0.1", "-p", str(self.port),
                "-sd", str(self.store_dir), "-n", self.name]
        if self.cluster_port is not None:
            routes = ",".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            args += ["--cluster_name", "shoal", "--cluster",
                     f"nats://127.0.0.1:{self.cluster_port}", "--routes", routes]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(self.port, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the process (SIGKILL: as a crash) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
