"""``shoal sidecar`` with real processes: two plain Python ``http.server`` apps, each
behind its own ``shoal sidecar``, called through ``MeshClient`` by service name. An app
that dies takes its instance out of rotation; SIGTERM drains and deregisters. And the pure
piece: ``AppHealth``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shoal.errors import ConfigError
from shoal.gateway.config import parse_listen
from shoal.gateway.sidecar import AppHealth, SidecarConfig
from shoal.mesh import MeshClient
from shoal.mesh.health import HealthCheckConfig, HealthState, InstanceHealth
from shoal.mesh.http1 import ConnectionPool
from shoal.mesh.registry import EndpointCache
from shoal.store import connect_store
from tests.helpers import eventually


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("SHOAL_BROKER", "SHOAL_STORE")}


def test_app_health_declares_what_the_state_machine_says() -> None:
    health = AppHealth(InstanceHealth("web-1", HealthCheckConfig(
        healthy_threshold=2, unhealthy_threshold=2), now=0.0))
    assert health.state is HealthState.STARTING
    assert health.observe(False, 1.0, "refused") is None
    assert health.observe(True, 2.0, "200") == (HealthState.SERVING,
                                                 "first passing health check: 200")
    assert health.observe(False, 3.0, "refused") is None
    state, why = health.observe(False, 4.0, "refused") or (None, "")
    assert state is HealthState.UNHEALTHY and "2 failed health checks" in why
    assert health.observe(True, 5.0, "200") is None
    assert health.observe(True, 6.0, "200") == (HealthState.SERVING,
                                                 "2 passing health checks in a row: 200")


def test_config_refusals() -> None:
    def config(**kw: object) -> SidecarConfig:
        base: dict[str, object] = {"service": "web", "listen": parse_listen("127.0.0.1:0"),
                                   "app": "127.0.0.1:8000", "instance_id": "web-1"}
        return SidecarConfig(**{**base, **kw})  # type: ignore[arg-type]

    assert config().advertise is None
    with pytest.raises(ConfigError, match="--advertise"):
        config(listen=parse_listen(":8080"))
    assert config(listen=parse_listen(":8080"), advertise="10.0.0.5:8080")
    with pytest.raises(ConfigError, match="--app"):
        config(app="nowhere")
    with pytest.raises(ConfigError, match="service name"):
        config(service="Web")
    with pytest.raises(ConfigError, match="instance id"):
        config(instance_id="a b")


@dataclass
class Proc:
    proc: asyncio.subprocess.Process
    info: dict[str, object]


APP = r"""
import http.server, sys, time
NAME = sys.argv[1].encode()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/slow":
            print("slow", flush=True)
            time.sleep(0.5)
        body = b"ok" if self.path == "/healthz" else NAME
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("port", server.server_address[1], flush=True)
server.serve_forever()
"""


async def start_app(name: str) -> Proc:
    """A plain Python HTTP/1.1 app (no Shoal): /healthz, /slow (half a second, says "slow"
    on stdout when it starts), anything else answers ``name``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", APP, name, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    port = int(re.search(r"port (\d+)", line).group(1))  # type: ignore[union-attr]
    return Proc(proc, {"port": port})


async def start_sidecar(tmp: Path, store: str, app_port: int, instance: str) -> Proc:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", "sidecar", "--service", "web", "--listen",
        "127.0.0.1:0", "--app", f"127.0.0.1:{app_port}", "--store", store,
        "--health-interval", "150ms", "--health-timeout", "1s", "--unhealthy-threshold", "2",
        "--instance-id", instance, "--label", "version=1", "--drain", "300ms",
        cwd=tmp, env=clean_env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if not line:
        raise AssertionError((await proc.stderr.read()).decode())
    return Proc(proc, json.loads(line))


async def stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    return proc.returncode  # type: ignore[return-value]


async def direct_get(address: str, path: str) -> tuple[int, bytes]:
    pool = ConnectionPool(address)
    try:
        resp = await pool.request("GET", path, [("host", "web")])
        return resp.status, await resp.aread()
    finally:
        await pool.aclose()


@pytest.fixture
async def procs() -> AsyncIterator[list[Proc]]:
    held: list[Proc] = []
    try:
        yield held
    finally:
        for p in reversed(held):
            if p.proc.returncode is None:
                p.proc.kill()
            await p.proc.wait()


async def test_apps_behind_sidecars_join_the_mesh_and_leave_it(tmp_path: Path,
                                                               procs: list[Proc]) -> None:
    store_url = f"sqlite:///{tmp_path}/store.db"
    apps = await asyncio.gather(*(start_app(n) for n in ("app-a", "app-b")))
    procs.extend(apps)
    sidecars = await asyncio.gather(*(
        start_sidecar(tmp_path, store_url, int(app.info["port"]), f"web-{n}")  # type: ignore[call-overload]
        for app, n in zip(apps, "ab", strict=True)))
    procs.extend(sidecars)
    assert sidecars[0].info["address"] == sidecars[0].info["listen"][0]  # type: ignore[index]

    store = await connect_store(store_url)
    cache = await EndpointCache(store).start()
    mesh = MeshClient(cache)  # one view of the registry for the test and the calls
    try:
        await cache.wait_for("web", lambda eps: len(eps) == 2 and all(
            cache.is_healthy(e) for e in eps), timeout=20)
        assert {i.labels["version"] for i in cache.instances("web")} == {"1"}

        async def bodies(n: int) -> list[bytes]:
            out = []
            for _ in range(n):
                resp = await mesh.request("GET", "http://web/hello.txt")
                assert resp.status == 200
                out.append(await resp.aread())
            return out

        assert set(await bodies(10)) == {b"app-a", b"app-b"}

        apps[0].proc.kill()  # app a dies; its sidecar stays up
        await apps[0].proc.wait()
        await eventually(lambda: cache.state("web", "web-a") is HealthState.UNHEALTHY, 15,
                         "web-a unhealthy")
        assert cache.get("web", "web-a").reason.startswith("2 failed health checks")  # type: ignore[union-attr]
        assert set(await bodies(10)) == {b"app-b"}

        # SIGTERM with a request in flight: it is answered; the instance drains and leaves
        slow = asyncio.create_task(direct_get(str(sidecars[1].info["address"]), "/slow"))
        assert apps[1].proc.stdout is not None
        assert await asyncio.wait_for(apps[1].proc.stdout.readline(), 10) == b"slow\n"
        sidecars[1].proc.send_signal(signal.SIGTERM)
        await eventually(lambda: cache.state("web", "web-b") in (HealthState.DRAINING, None),
                         5, "web-b draining")
        assert await slow == (200, b"app-b")
        assert await asyncio.wait_for(sidecars[1].proc.wait(), 15) == 0
        await eventually(lambda: cache.get("web", "web-b") is None, 5, "web-b deregistered")
        assert await stop(sidecars[0].proc) == 0
        await eventually(lambda: cache.instances("web") == [], 5, "every instance gone")
        for sidecar in sidecars:
            assert sidecar.proc.stderr is not None
            err = (await sidecar.proc.stderr.read()).decode()
            assert "Traceback" not in err and "draining" in err, err
    finally:
        await mesh.aclose()
        await cache.close()
        await store.close()


def test_bad_flags_exit_2_with_one_line(tmp_path: Path) -> None:
    import subprocess

    for args, fragment in (
            (["--listen", "0.0.0.0:8001", "--app", "127.0.0.1:9000"], "--advertise"),
            (["--listen", "127.0.0.1:0", "--app", "127.0.0.1:9000", "--health-interval",
              "0s"], "--health-interval: must be a duration greater than zero"),
            (["--listen", "127.0.0.1:0", "--app", "127.0.0.1:9000", "--label", "v"],
             "--label 'v': expected KEY=VALUE")):
        result = subprocess.run(
            [sys.executable, "-m", "shoal.cli", "sidecar", "--service", "web", *args,
             "--store", f"sqlite:///{tmp_path}/s.db"], cwd=tmp_path, env=clean_env(),
            text=True, capture_output=True, timeout=60)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("shoal: error: ") and fragment in lines[0], lines
