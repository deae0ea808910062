"""Start real peers (redis-server, nats-server -js) on free loopback ports for benchmarks."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port}")


@contextlib.contextmanager
def redis_server(durable: bool = False) -> Iterator[str | None]:
    """A throwaway redis-server; None if missing.

    Without persistence (a pure-speed peer), or ``durable``: append-only with
    ``appendfsync everysec``, the configuration Shoal's README recommends.
    """
    exe = shutil.which("redis-server")
    if exe is None:
        yield None
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if durable else "no", "--appendfsync", "everysec", "--dir", d],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            _wait_port(port, proc)
            yield f"redis://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait()


@contextlib.contextmanager
def nats_server() -> Iterator[str | None]:
    """A throwaway nats-server with JetStream on a temp store dir; None if missing."""
    exe = shutil.which("nats-server")
    if exe is None:
        yield None
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen(
            [exe, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", d],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            _wait_port(port, proc)
            yield f"nats://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait()


_OTLP_STUB = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Collect(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Collect).serve_forever()
"""


@contextlib.contextmanager
def otlp_collector() -> Iterator[str]:
    """A throwaway OTLP/HTTP collector stub (answers every POST with 200, keeps nothing);
    yields the endpoint for ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _OTLP_STUB, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def _self_check() -> dict[str, object]:
    """How long each peer takes to be ready (what a bench pays before measuring), against
    the floor of starting any process (``python -c pass``), in the same run."""
    import sys

    def timed(start: Callable[[], contextlib.AbstractContextManager[object]]) -> float | None:
        t0 = time.perf_counter()
        with start() as ready:
            took = time.perf_counter() - t0
        return None if ready is None else round(took, 3)

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    floor = round(time.perf_counter() - t0, 3)
    figures = {"redis_ready_s": timed(redis_server), "nats_ready_s": timed(nats_server),
               "otlp_stub_ready_s": timed(otlp_collector), "process_floor_s": floor}
    ratios = {f"{k.removesuffix('_ready_s')}_over_floor": round(v / floor, 2)
              for k, v in figures.items() if k != "process_floor_s" and v is not None}
    return {"bench": "_servers", **figures, **ratios}


if __name__ == "__main__":  # each peer's start-up, against a bare process start
    import json

    print(json.dumps(_self_check()))
