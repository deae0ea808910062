"""``python -m shoal.instance``: real instance processes on a real SQLite broker and store."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.events import EventBus
from shoal.events.group import offset_key
from shoal.mesh import MeshClient, Registry
from shoal.store.connect import connect_store
from tests.conftest import ROOT
from tests.helpers import eventually

pytestmark = pytest.mark.slow
APP = "tests.sdk.instance_app:svc"
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def spawn(tmp_path: Path, *extra: str, app: str = APP) -> subprocess.Popen[str]:
    env = {**os.environ, "SDK_TEST_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("SHOAL_BROKER", None)
    env.pop("SHOAL_STORE", None)
    return subprocess.Popen(
        [sys.executable, "-m", "shoal.instance", "--app", app, "--listen", "127.0.0.1:0",
         "--broker", f"sqlite:///{tmp_path}/events.db",
         "--store", f"sqlite:///{tmp_path}/store.db", *extra],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def ready_line(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    if not line:
        raise AssertionError(f"instance exited {proc.wait()}: {proc.stderr.read()}")  # type: ignore[union-attr]
    return json.loads(line)


async def finish(proc: subprocess.Popen[str], sig: int | None = signal.SIGTERM
                 ) -> tuple[int, str]:
    if proc.poll() is None and sig is not None:
        proc.send_signal(sig)
    try:
        code = await asyncio.wait_for(asyncio.to_thread(proc.wait), 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = ""
    for stream in (proc.stdout, proc.stderr):
        if stream is not None and not stream.closed:
            output += stream.read()
            stream.close()
    return code, output


async def http_get(address: str, path: str) -> tuple[int, dict[str, object]]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def raw_exchange(address: str, data: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return raw


async def test_instance_serves_registers_handles_events_and_drains(tmp_path: Path) -> None:
    (tmp_path / "shoal.yaml").write_text(
        "security: {mtls: off}\n"  # no control plane here to issue certificates
        "services:\n  sdk-echo:\n    app: tests.sdk.instance_app:svc\n"
        "    policy: {retries: {attempts: 0}}\n")
    proc = spawn(tmp_path, "--instance-id", "echo-1", "--label", "zone=a",
                 "--manifest", "shoal.yaml")
    try:
        ready = await ready_line(proc)
        assert ready["event"] == "ready" and ready["instance"] == "echo-1"
        assert ready["service"] == "sdk-echo" and ready["pid"] == proc.pid
        address = str(ready["listen"])
        assert (await http_get(address, "/healthz"))[0] == 200
        for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
                        b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999999"
                        b"999999999\r\n\r\n"):
            assert (await raw_exchange(address, garbage)).startswith(b"HTTP/1.1 4")
        assert await http_get(address, "/readyz") == (
            200, {"ready": True, "service": "sdk-echo", "missing": []})

        store = await connect_store(f"sqlite:///{tmp_path}/store.db")
        async with EventBus.connect(f"sqlite:///{tmp_path}/events.db", store=store) as bus:
            # registered, with its labels and version, as SERVING
            (instance,) = await Registry(store).list("sdk-echo")
            assert instance.id == "echo-1" and instance.address == address
            assert instance.labels == {"zone": "a", "version": "7"}
            assert instance.state == "serving"

            # a call through the mesh, by service name, with the trace carried
            async with await MeshClient.connect(store) as mesh:
                resp = await mesh.post("http://sdk-echo/echo", json={"n": 1},
                                       headers={"traceparent": TRACE})
                body = await resp.json()
                assert resp.status == 200 and body["echo"] == {"n": 1}
                assert body["instance"] == "echo-1"
                assert body["trace"].split("-")[1] == TRACE.split("-")[1]

            # an event published by this (other) process is handled by the instance
            ack = await bus.publish("sdk-jobs", {"sleep": 0}, key="k",
                                    extensions={"traceparent": TRACE})
            await eventually(lambda: (tmp_path / f"done-{ack.id}").exists(), 20, "handled")
            carried = (tmp_path / f"started-{ack.id}").read_text()
            assert carried.split("-")[1] == TRACE.split("-")[1]

            # SIGTERM while a request and an event are in flight: both finish
            slow = await bus.publish("sdk-jobs", {"sleep": 1.0}, key="k")
            await eventually(lambda: (tmp_path / f"started-{slow.id}").exists(), 20, "start")
            request = asyncio.create_task(http_get(address, "/slow?s=1"))
            await eventually(lambda: (tmp_path / "slow-started").exists(), 20, "slow request")
            proc.send_signal(signal.SIGTERM)
            assert await request == (200, {"slow": "done"})
            code, output = await finish(proc, None)
            assert code == 0, output
            assert "Traceback" not in output
            assert (tmp_path / f"done-{slow.id}").exists()
            committed = await store.get(offset_key("sdk-jobs", "sdk-echo", slow.partition))
            assert committed is not None and int(committed.value) == slow.offset + 1
            # what the handler published on its way out is durable too
            assert sum((r.end - r.start) for r in await bus.broker.ranges("sdk-done")) == 2
            # and the instance has left the registry
            assert await Registry(store).list("sdk-echo") == []
        await store.close()
    finally:
        await finish(proc, signal.SIGKILL)


async def test_two_instances_share_the_group_and_one_draining_hands_over(
        tmp_path: Path) -> None:
    procs = [spawn(tmp_path, "--instance-id", f"echo-{i}") for i in range(2)]
    try:
        for proc in procs:
            await ready_line(proc)
        store = await connect_store(f"sqlite:///{tmp_path}/store.db")
        async with EventBus.connect(f"sqlite:///{tmp_path}/events.db", store=store) as bus:
            assert len(await Registry(store).list("sdk-echo")) == 2
            code, output = await finish(procs[0])
            assert code == 0, output
            assert [i.id for i in await Registry(store).list("sdk-echo")] == ["echo-1"]
            acks = [await bus.publish("sdk-jobs", {"sleep": 0}, key=f"k{i}") for i in range(8)]
            await eventually(lambda: all((tmp_path / f"done-{a.id}").exists() for a in acks),
                             20, "the survivor handles every partition")
        await store.close()
    finally:
        for proc in procs:
            await finish(proc, signal.SIGKILL)


async def test_sigterm_while_starting_exits_0_without_a_ready_line(tmp_path: Path) -> None:
    proc = spawn(tmp_path, app="tests.sdk.instance_app:slow_start")
    try:
        await eventually(lambda: (tmp_path / "lifespan-started").exists(), 30, "starting")
        started = time.monotonic()
        code, output = await finish(proc)
        assert code == 0, output
        assert time.monotonic() - started < 10  # did not wait for the 30 s startup
        assert '"ready"' not in output and "Traceback" not in output
        store = await connect_store(f"sqlite:///{tmp_path}/store.db")
        assert await Registry(store).list("sdk-slow-start") == []
        await store.close()
    finally:
        await finish(proc, signal.SIGKILL)


@pytest.mark.parametrize(("args", "fragment", "code"), [
    (["--app", "tests.sdk.instance_app:not_a_service"], "expected a shoal.Service", 2),
    (["--app", "tests.sdk.nowhere:svc"], "no module named 'tests.sdk.nowhere'", 2),
    (["--app", "tests.sdk.instance_app:missing"], "has no attribute 'missing'", 2),
    (["--app", "no-colon"], "expected module:attribute", 2),
    (["--app", APP, "--listen", "nonsense"], "listen: expected HOST:PORT", 2),
    (["--app", APP, "--instance-id", "bad id!"], "instance id", 2),
    (["--app", APP, "--label", "novalue"], "expected KEY=VALUE", 2),
    (["--app", APP, "--manifest", "bad.yaml"],
     "bad.yaml, line 1: brokr: unknown key (did you mean 'broker'?)", 2),
    (["--app", APP, "--manifest", "missing.yaml"], "missing.yaml: no such file", 2),
    (["--app", APP, "--mtls", "maybe"], "argument --mtls: invalid choice: 'maybe'", 2),
    (["--app", APP, "--trust-domain", "Not/A.Domain"],
     "--trust-domain: expected a lowercase name like 'shoal.local'", 2),
    (["--app", APP, "--policies", "{not json"], "--policies: not JSON", 2),
    (["--app", APP, "--policies", "[]"], "--policies: expected a JSON object", 2),
    (["--app", APP, "--policies", '{"a": 1}'], "--policies 'a': expected an object", 2),
    (["--app", APP, "--policies", '{"a": {"retrys": {}}}'],
     "--policies a.retrys: unknown key (did you mean 'retries'?)", 2),
    (["--app", APP, "--policies", '{"a": {"retries": {"attempts": "many"}}}'],
     "--policies a.retries.attempts", 2),
    (["--app", APP, "--policies", '{"a": {"x": "' + "y" * 70_000 + '"}}'],
     "--policies: 70016 bytes, over the limit of 65536", 2),
])
def test_bad_arguments_exit_with_one_clear_line(tmp_path: Path, args: list[str],
                                                fragment: str, code: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (tmp_path / "bad.yaml").write_text("brokr: memory://x\n")
    result = subprocess.run(
        [sys.executable, "-m", "shoal.instance", "--broker", f"sqlite:///{tmp_path}/e.db",
         "--store", f"sqlite:///{tmp_path}/s.db", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_instance_start_path_leaves_heavy_optional_modules_unimported() -> None:
    """``shoal up`` starts nine processes at once on a few cores: the instance path imports
    neither OpenTelemetry (tracing off), cryptography (mTLS off), nor pydantic and YAML
    (``--policies`` JSON, not the manifest)."""
    code = ("import sys, shoal.instance as i\n"
            "i.parse_policies('{\"a\": {\"retries\": {\"attempts\": 1}}}')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'opentelemetry', 'cryptography', 'pydantic', 'yaml'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
