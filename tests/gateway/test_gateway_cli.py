"""``shoal gateway`` as a real process: it serves the config file's routes, takes new routes
from the Store while a keep-alive connection keeps working across the reload, refuses a bad
stored value (logged, old table kept), publishes events, and stops on SIGTERM with exit 0.
Bad config files and flags exit 2 with one line naming the file, line and key."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shoal.gateway import HttpServer, Request, Response
from shoal.mesh.registry import Instance, Registry
from shoal.store import connect_store
from shoal.store.base import Store

KEY = "shoal/gateway/routes"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("SHOAL_BROKER", "SHOAL_STORE")}


def shoal_gateway(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli", "gateway", *args], cwd=cwd,
                          text=True, capture_output=True, env=clean_env(), timeout=60)


class RawConnection:
    """One keep-alive client connection, used for every request of a test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: str = "") -> tuple[int, dict[str, str], bytes]:
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: gw.test\r\n{headers}"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        data = await self.reader.readexactly(int(fields.get("content-length", "0")))
        assert fields.get("connection") != "close", fields
        return status, fields, data


class Gateway:
    """The ``shoal gateway`` process and what it printed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr: list[str] = []
        self.ready: dict[str, object] = {}
        self._pump: asyncio.Task[None] | None = None
        self.signalled = False

    def terminate(self) -> None:
        """SIGTERM once: a second one during the graceful stop would cut it short (exit 130)."""
        if not self.signalled:
            self.signalled = True
            self.proc.send_signal(signal.SIGTERM)

    async def start(self) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if not line:
            await self.proc.wait()
            assert self.proc.stderr is not None
            raise AssertionError((await self.proc.stderr.read()).decode())
        self.ready = json.loads(line)
        self._pump = asyncio.create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.stderr.append(line.decode())

    async def connect(self) -> RawConnection:
        listen = self.ready["listen"]
        assert isinstance(listen, list)
        host, port = listen[0].rsplit(":", 1)
        return RawConnection(*await asyncio.open_connection(host, int(port)))

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._pump is not None:
            await asyncio.wait_for(self._pump, 5)
        return self.proc.returncode  # type: ignore[return-value]


async def backend(name: str, slow_started: asyncio.Event) -> HttpServer:
    async def handle(req: Request) -> Response:
        await req.body()
        if req.path.endswith("/slow"):
            slow_started.set()
            await asyncio.sleep(0.5)
        return Response(name.encode(), headers=[(b"x-path", req.raw_path)])

    server = HttpServer(handle)
    await server.start("127.0.0.1", 0)
    return server


@dataclass
class World:
    gw: Gateway
    store: Store
    registry: Registry
    spare_port: int  # a backend answering "svc-a2", not registered
    slow_started: asyncio.Event  # a backend began answering a /slow request


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[World]:
    store_url = f"sqlite:///{tmp_path}/store.db"
    store = await connect_store(store_url)
    registry = Registry(store)
    servers = []
    slow_started = asyncio.Event()
    for name in ("svc-a", "svc-b", "svc-a2"):
        server = await backend(name, slow_started)
        servers.append(server)
        if name != "svc-a2":
            await registry.register(Instance(id=f"{name}-1", service=name,
                                             address=f"127.0.0.1:{server.port}"))
    config = tmp_path / "shoal.yaml"
    config.write_text(
        "gateway:\n"
        "  listen: 127.0.0.1:0\n"
        "  drain: 3s\n"
        "  services: {svc-a: {timeout: 5s}}\n"
        "  routes:\n"
        "    - {name: x, match: {path: {prefix: /x}}, service: svc-a}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", "gateway", "--config", str(config), "--store",
        store_url, "--broker", f"sqlite:///{tmp_path}/events.db", cwd=tmp_path,
        env=clean_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    gw = Gateway(proc)
    try:
        await gw.start()
        yield World(gw, store, registry, servers[2].port, slow_started)
    finally:
        await gw.stop()
        await registry.close()
        for server in servers:
            await server.shutdown(1.0)
        await store.close()


async def test_routes_reload_from_the_store_on_an_open_connection(
        running: World) -> None:
    gw, store, registry = running.gw, running.store, running.registry
    assert gw.ready["event"] == "ready" and gw.ready["routes"] == 1
    conn = await gw.connect()
    status, _, body = await conn.request("GET", "/x/1")
    assert (status, body) == (200, b"svc-a")
    status, fields, _ = await conn.request("GET", "/nowhere")
    assert status == 404 and fields["shoal-error"] == "router; no-route"

    await store.put(KEY, b"- {name: x, match: {path: {prefix: /x}}, service: svc-b}\n"
                         b"- {name: y, match: {path: {prefix: /y}}, service: svc-a}\n")
    for _ in range(2000):  # the same socket, until the new table answers (~20 s at most)
        status, _, body = await conn.request("GET", "/x/2")
        assert status == 200
        if body == b"svc-b":
            break
        await asyncio.sleep(0.01)
    assert body == b"svc-b"
    assert (await conn.request("GET", "/y/1"))[2] == b"svc-a"

    await store.put(KEY, b"- {name: x, service: svc-a}\n- {name: z, service: svc-b}\n")
    for _ in range(2000):  # up to ~20 s on a loaded machine
        if any("refused new routes" in line for line in gw.stderr):
            break
        await asyncio.sleep(0.01)
    refusal = next(line for line in gw.stderr if "refused new routes" in line)
    assert f"store key '{KEY}'" in refusal and "line 2" in refusal and "can never match" in refusal
    assert (await conn.request("GET", "/x/3"))[2] == b"svc-b"  # the old table stays

    # endpoints follow the registry: svc-a moves to another instance, same socket
    await registry.register(Instance(id="svc-a-2", service="svc-a",
                                     address=f"127.0.0.1:{running.spare_port}"))
    old = next(r for r in registry.instances() if r.instance.id == "svc-a-1")
    await old.deregister()
    for _ in range(2000):  # up to ~20 s on a loaded machine
        body = (await conn.request("GET", "/y/2"))[2]
        if body == b"svc-a2":
            break
        await asyncio.sleep(0.01)
    assert body == b"svc-a2"

    event = b'{"order": 1}'
    status, _, body = await conn.request(
        "POST", "/events/orders", event,
        "ce-specversion: 1.0\r\nce-id: e1\r\nce-source: /t\r\nce-type: t.created\r\n"
        "content-type: application/json\r\n")
    assert status == 202 and json.loads(body)["offset"] == 0

    # SIGTERM with a request in flight: it is answered (connection: close), then exit 0
    other = await gw.connect()
    other.writer.write(b"GET /y/slow HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    await asyncio.wait_for(running.slow_started.wait(), 10)
    gw.terminate()
    answer = await asyncio.wait_for(other.reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"svc-a2"), answer
    assert b"connection: close" in answer.lower()
    assert await gw.stop() == 0
    assert not any("Traceback" in line for line in gw.stderr), gw.stderr
    assert await conn.reader.read() == b""  # the idle keep-alive connection was closed
    for c in (conn, other):
        c.writer.close()
        await c.writer.wait_closed()


def test_bad_config_and_flags_exit_2_naming_where(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway:\n  routes:\n    - service: orders\n      timeout: soon\n")
    result = shoal_gateway("--config", str(bad), "--store", f"sqlite:///{tmp_path}/s.db",
                           cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"shoal: error: {bad}, line 4: "), lines
    assert "routes[0]: timeout" in lines[0]

    for args, fragment in ((["--listen", "nowhere"], "--listen: 'nowhere'"),
                           (["--workers", "2", "--listen", "unix:/tmp/gw.sock"],
                            "exactly one TCP listen address")):
        result = shoal_gateway(*args, "--store", f"sqlite:///{tmp_path}/s.db", cwd=tmp_path)
        assert result.returncode == 2 and fragment in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def alive(pid: int) -> bool:
    """A running process (not gone, not a zombie)."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False


async def test_workers_share_one_port_and_stop_together(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", "gateway", "--workers", "2",
        "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path}/s.db",
        "--broker", f"sqlite:///{tmp_path}/e.db", cwd=tmp_path, env=clean_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line:
            raise AssertionError((await proc.stderr.read()).decode())
        ready = json.loads(line)
        assert ready["event"] == "ready" and ready["workers"] == 2 and len(ready["pids"]) == 2
        host, port = ready["listen"][0].rsplit(":", 1)
        for _ in range(4):  # each connection lands on some worker; all answer
            reader, writer = await asyncio.open_connection(host, int(port))
            conn = RawConnection(reader, writer)
            status, fields, _ = await conn.request("POST", "/events/orders", b'{"n": 1}',
                                                   "Content-Type: application/json\r\n"
                                                   "ce-id: x\r\nce-source: /t\r\n"
                                                   "ce-type: t\r\nce-specversion: 1.0\r\n")
            assert status == 202, fields
            writer.close()
            await writer.wait_closed()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert not any(alive(pid) for pid in ready["pids"])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
