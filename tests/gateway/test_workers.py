"""shoal.gateway.workers with real processes and sockets: N workers on one SO_REUSEPORT
port all answer, SIGTERM stops every one of them after the requests in flight, a worker
that cannot start stops the group with its error, a crashed worker is replaced, and bad
arguments are refused with a message naming them."""

from __future__ import annotations

import contextlib
import http.client
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.errors import ConfigError
from shoal.gateway.workers import bind_reserved, run_workers

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")


class Group:
    """``python -m tests.gateway.workers_child`` and what it printed."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []

    def line(self, prefix: str, timeout: float = 30.0) -> str:
        """The next line starting with ``prefix`` (other lines are kept in ``lines``)."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                text = self.proc.stdout.readline()
                if not text:
                    break
                self.lines.append(text.strip())
                if text.startswith(prefix):
                    return text.strip()
        raise AssertionError(f"no {prefix!r} line within {timeout}s; got {self.lines}")

    def ready(self) -> tuple[int, list[int]]:
        _, port, pids = self.line("READY").split()
        return int(port), [int(p) for p in pids.split(",")]


@contextlib.contextmanager
def group(workers: int, mode: str = "") -> Iterator[Group]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.gateway.workers_child", str(workers),
                             *([mode] if mode else [])], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        yield Group(proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def get(port: int, path: str = "/") -> tuple[int, str]:
    """One request on a new connection (so SO_REUSEPORT may pick any worker)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def test_two_workers_share_one_port_and_sigterm_stops_all_after_requests_in_flight() -> None:
    with group(2) as g:
        port, pids = g.ready()
        assert len(set(pids)) == 2 and g.proc.pid not in pids
        seen: set[int] = set()
        for _ in range(200):
            status, body = get(port)
            assert status == 200
            seen.add(int(body))
            if seen == set(pids):
                break
        assert seen == set(pids), f"only {seen} of {pids} answered"

        # A request in flight when SIGTERM arrives is answered, then everything stops.
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow.sendall(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        time.sleep(0.1)
        g.proc.send_signal(signal.SIGTERM)
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
        slow.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head
        assert int(body) in pids
        assert g.proc.wait(20) == 0
        assert g.line("EXIT") == "EXIT 0"
        assert wait_gone(pids), "a worker outlived its group"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_worker_that_cannot_start_stops_the_group_with_its_error() -> None:
    with group(2, "fail") as g:
        error = g.line("ERROR")
        assert "WorkerError" in error and "failed to start" in error
        assert "this worker cannot start: no config" in error
        assert g.proc.wait(20) == 2


def test_a_crashed_worker_is_replaced_and_the_port_keeps_answering() -> None:
    with group(2, "crash") as g:
        port, pids = g.ready()
        with contextlib.suppress(http.client.HTTPException, OSError):
            get(port, "/crash")  # the worker that takes it exits at once
        deadline = time.monotonic() + 20
        seen: set[int] = set()
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, http.client.HTTPException):
                seen.add(int(get(port)[1]))
            if len(seen - set(pids)) == 1 and len(seen & set(pids)) == 1:
                break
            time.sleep(0.02)
        new = seen - set(pids)
        assert len(new) == 1, f"no replacement worker answered: saw {seen}, first {pids}"
        g.proc.send_signal(signal.SIGTERM)
        assert g.proc.wait(20) == 0
        assert wait_gone([*pids, *new])


@pytest.mark.parametrize("workers", [0, -1, True, "2", 2.0, 10**6])
def test_bad_worker_counts_are_refused_before_anything_starts(workers: object) -> None:
    async def never() -> None:  # pragma: no cover - never entered
        raise AssertionError

    with pytest.raises(ConfigError, match=r"workers: must be an integer from 1 to 256"):
        run_workers(never, "127.0.0.1", 0, workers=workers)  # type: ignore[arg-type]


@pytest.mark.parametrize("port", [-1, 65536, "80", None])
def test_bad_ports_are_refused(port: object) -> None:
    with pytest.raises(ConfigError, match=r"port: must be an integer from 0 to 65535"):
        run_workers(lambda: None, "127.0.0.1", port, workers=2)  # type: ignore[arg-type]


def test_an_unusable_listen_address_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"listen address 'no-such-host\.invalid'"):
        bind_reserved("no-such-host.invalid", 0)
    with socket.socket() as taken:  # a listener that did not opt into SO_REUSEPORT
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"listen address 127\.0\.0\.1:{port}: "
                                              r"Address already in use"):
            bind_reserved("127.0.0.1", port)
    reserved = bind_reserved("127.0.0.1", 0)  # port 0 resolves; the port is held
    try:
        assert reserved.getsockname()[1] > 0
    finally:
        reserved.close()


def test_workers_stop_when_their_supervisor_is_killed() -> None:
    with group(2) as g:
        port, pids = g.ready()
        g.proc.kill()  # SIGKILL: no chance to pass anything on
        g.proc.wait(10)
        assert wait_gone(pids), "workers kept serving after their supervisor died"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
