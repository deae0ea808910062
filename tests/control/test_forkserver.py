"""Instances forked from the fork server: ready, restarted after kill -9 with the exit
seen, reseeded, nothing left behind; a dead server means plain starts; bad requests get
an answer, not a crash. Preloading: a forked instance imports nothing itself (its app was
imported by the server), an app whose import starts a thread is not preloaded."""

from __future__ import annotations

import array
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from shoal.control.forkserver import (
    SERVER_FD,
    ForkedProcess,
    ForkServer,
    Preload,
    preload,
    startup_modules,
)
from shoal.control.restart import RestartPolicy
from shoal.control.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.sdk.instance_app:svc"
FAST = RestartPolicy(initial_backoff="20ms", max_backoff="100ms", stable_after="5s",
                     crash_loop_exits=3, jitter=0.0)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(
        f"/proc/{pid}/status").read_text()


def _supervisor(tmp_path: Path, lines: list[str]) -> Supervisor:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SDK_TEST_DIR": str(tmp_path),
           "PYTHONUNBUFFERED": "1"}

    def launch(service: str, instance_id: str, port: int) -> list[str]:
        return [sys.executable, "-m", "shoal.instance", "--app", APP,
                "--listen", f"127.0.0.1:{port}", "--broker", f"sqlite:///{tmp_path}/e.db",
                "--store", f"sqlite:///{tmp_path}/s.db", "--instance-id", instance_id]

    return Supervisor(launch, policy=FAST, output=lines.append, grace=5.0, env=env,
                      cwd=str(ROOT), forkserver=ForkServer(env, str(ROOT)))


async def _wait(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_forked_instances_serve_restart_after_kill_9_and_leave_nothing(
        tmp_path: Path) -> None:
    lines: list[str] = []
    sup = _supervisor(tmp_path, lines)
    server = sup.forkserver
    assert server is not None
    try:
        await sup.scale("sdk-echo", 2)
        await sup.wait_ready(30)
        first, second = sup.of("sdk-echo")
        assert isinstance(first.process, ForkedProcess)
        server_pid = server._process.pid  # type: ignore[union-attr]
        assert _parent(first.pid) == _parent(second.pid) == server_pid  # type: ignore[arg-type]
        assert first.ready_info["instance"] == "sdk-echo-1"
        old = first.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await _wait(lambda: first.pid not in (None, old) and first.ready.is_set())
        assert first.life.restarts == 1
        assert any("killed by SIGKILL" in line for line in lines), lines
        pids = [first.pid, second.pid]
    finally:
        await sup.close()
    assert not any(_alive(pid) for pid in pids if pid is not None)
    assert not _alive(server_pid)


async def test_children_of_a_killed_server_stop_and_later_starts_do_not_fork(
        tmp_path: Path) -> None:
    lines: list[str] = []
    sup = _supervisor(tmp_path, lines)
    server = sup.forkserver
    assert server is not None
    try:
        await sup.scale("sdk-echo", 1)
        await sup.wait_ready(30)
        (inst,) = sup.of("sdk-echo")
        forked = inst.pid
        os.kill(server._process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        # the child gets SIGTERM (it dies with the server), drains and exits; the
        # supervisor sees it through its pidfd and starts it again, without the server
        await _wait(lambda: inst.pid not in (None, forked) and inst.ready.is_set(), 30)
        assert not isinstance(inst.process, ForkedProcess)
        assert not _alive(forked)  # type: ignore[arg-type]
    finally:
        await sup.close()


def test_the_server_answers_bad_requests_and_keeps_serving(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import socket, shoal.control.forkserver as f; "
         f"f.serve(socket.socket(fileno={SERVER_FD}))"],
        env=env, pass_fds=(theirs.fileno(), SERVER_FD),
        preexec_fn=lambda: os.dup2(theirs.fileno(), SERVER_FD))
    theirs.close()
    reader = ours.makefile("rb")
    try:
        assert "ready" in json.loads(reader.readline())
        ours.sendall(b"not json\n")
        assert json.loads(reader.readline())["error"].startswith("bad request")
        ours.sendall(b'{"argv": ["--app", "x:y"]}\n')  # no output descriptor
        assert "one output fd" in json.loads(reader.readline())["error"]
        ours.sendall(b"x" * (2 << 20) + b"\n")  # oversized
        assert "bad request" in json.loads(reader.readline())["error"]
        ours.sendall(b'{"preload": ["json"]}\n')
        assert json.loads(reader.readline())["error"] == "bad request: preload: expected an object"
        ours.sendall(b'{"preload": {"apps": "json"}}\n')
        assert "preload.apps: expected a list" in json.loads(reader.readline())["error"]
        ours.sendall(b'{"preload": {"modules": ["json"]}}\n')
        assert json.loads(reader.readline()) == {"preloaded": ["json"], "failed": {}}
        # a real request still works: an instance with a bad app exits 2, reported
        r, w = os.pipe()
        request = {"argv": ["--app", "tests.sdk.nowhere:svc"], "env": env,
                   "cwd": str(ROOT)}
        ours.sendmsg([json.dumps(request).encode() + b"\n"],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))])
        os.close(w)
        pid = json.loads(reader.readline())["pid"]
        assert json.loads(reader.readline()) == {"exit": pid, "status": 2}
        with os.fdopen(r, "rb") as out:
            assert b"no module named 'tests.sdk.nowhere'" in out.read()
    finally:
        reader.close()
        ours.close()  # hang up: the server exits
        assert proc.wait(10) == 0


def test_forked_children_get_fresh_random_state() -> None:
    code = ("import os, random, shoal.context as c, shoal.control.forkserver as f\n"
            "r, w = os.pipe()\n"
            "for _ in range(2):\n"
            "    if os.fork() == 0:\n"
            "        f._reseed(); os.write(w, b'%d %d\\n' % (c._random.getrandbits(64),"
            " random.getrandbits(64))); os._exit(0)\n"
            "    os.wait()\n"
            "os.close(w); print(os.read(r, 1000).decode())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    first, second = out.stdout.split("\n")[:2]
    assert first.split()[0] != second.split()[0] and first.split()[1] != second.split()[1]


# -- preloading -------------------------------------------------------------------------------


def _probe_supervisor(tmp_path: Path, app: str, preload: Preload) -> Supervisor:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}

    def launch(service: str, instance_id: str, port: int) -> list[str]:
        return [sys.executable, "-m", "shoal.instance", "--app", app,
                "--listen", f"127.0.0.1:{port}", "--broker", f"sqlite:///{tmp_path}/e.db",
                "--store", f"sqlite:///{tmp_path}/s.db", "--instance-id", instance_id]

    return Supervisor(launch, policy=FAST, output=None, grace=5.0, env=env, cwd=str(ROOT),
                      forkserver=ForkServer(env, str(ROOT), preload))


async def _imports(address: str) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{address}/imports", timeout=10) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    return await asyncio.to_thread(get)


async def test_a_forked_instance_imports_nothing_itself_its_app_was_preloaded(
        tmp_path: Path) -> None:
    app = "tests.control.preload_app"
    modules = tuple(startup_modules(f"sqlite:///{tmp_path}/e.db",
                                    f"sqlite:///{tmp_path}/s.db", "off"))
    sup = _probe_supervisor(tmp_path, f"{app}:svc", Preload(modules, (app,)))
    server = sup.forkserver
    assert server is not None
    try:
        await sup.scale("preload-probe", 1)
        await sup.wait_ready(30)
        (inst,) = sup.of("preload-probe")
        seen = await _imports(inst.ready_info["listen"])
        assert server.preloaded == [*modules, app] and not server.failed and not server.unsafe
        assert seen["pid"] == inst.pid
        assert seen["imported_in"] == server._process.pid  # type: ignore[union-attr]
        assert seen["imported_after_fork"] == []  # its start, its app, a request: nothing
    finally:
        await sup.close()


async def test_an_app_that_starts_a_thread_on_import_is_left_to_its_instances(
        tmp_path: Path) -> None:
    app = "tests.control.preload_threaded_app"
    sup = _probe_supervisor(tmp_path, f"{app}:svc", Preload(("shoal.store.sqlite",), (app,)))
    server = sup.forkserver
    assert server is not None
    try:
        await sup.scale("preload-threaded", 1)
        await sup.wait_ready(30)
        (inst,) = sup.of("preload-threaded")
        assert server.unsafe == f"importing {app} started a thread: forking after that is unsafe"
        assert server.preloaded == ["shoal.store.sqlite"]  # a second server, without apps
        assert isinstance(inst.process, ForkedProcess)
        assert _parent(inst.pid) == server._process.pid  # type: ignore[arg-type,union-attr]
        seen = await _imports(inst.ready_info["listen"])
        assert seen["imported_in"] == seen["pid"] == inst.pid  # imported by the instance
        assert app in seen["imported_after_fork"]
    finally:
        await sup.close()


def test_preload_imports_what_it_can_and_refuses_malformed_requests() -> None:
    answer = preload({"modules": ["json"], "apps": ["tests.control.nowhere_at_all"]})
    assert answer["preloaded"] == ["json"]
    assert answer["failed"] == {"tests.control.nowhere_at_all": "ModuleNotFoundError: No "
                                "module named 'tests.control.nowhere_at_all'"}
    for bad, kind in (({"modules": "json"}, "modules"), ({"apps": [1]}, "apps"),
                      ({"modules": [""]}, "modules"), ({"apps": None}, "apps")):
        assert preload(bad) == {"error": f"bad request: preload.{kind}: expected a list of "
                                         "module names"}


def test_startup_modules_follow_the_urls_and_the_mtls_mode() -> None:
    assert startup_modules("sqlite:///e.db", "redis://h:1", "off") == [
        "shoal.store.redis", "shoal.events.brokers.sqlite"]
    strict = startup_modules("nats://h:1", "nats://h:1", "strict")
    assert strict[:2] == ["shoal.store.nats", "shoal.events.brokers.nats"]
    assert "shoal.mesh.security.identity" in strict
    assert startup_modules("weird", "ftp://x", "off") == []  # the instance says what is wrong


def test_a_server_forked_from_a_process_without_threads_serves_and_stops(
        tmp_path: Path) -> None:
    code = (
        "import asyncio, os, sys\n"
        "from shoal.control.forkserver import ForkServer, Preload, _Child\n"
        "server = ForkServer(dict(os.environ), os.getcwd(), Preload(('json',)))\n"
        "server.launch(fork=True)\n"
        "async def main():\n"
        "    assert await server.ready(), 'not ready'\n"
        "    print(type(server._process).__name__, server._process.pid, server.preloaded)\n"
        "    await server.close()\n"
        "    print(server._process.poll())\n"
        "asyncio.run(main())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    kind, pid, preloaded = first.split(" ", 2)
    assert kind == "_Child" and preloaded == "['json']"
    assert second == "0" and not _alive(int(pid))  # SIGTERM: it stopped serving and exited


def test_an_app_that_keeps_a_descriptor_open_is_not_preloaded() -> None:
    name = "tests.control.preload_socket_app"
    try:
        assert preload({"modules": ["json"], "apps": [name]}) == {
            "unsafe": f"importing {name} left 1 file descriptor(s) open (a connection or "
                      "file every instance would share)"}
    finally:
        module = sys.modules.pop(name, None)
        if module is not None:
            module.CONNECTION.close()
