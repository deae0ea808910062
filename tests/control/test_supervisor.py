"""The supervisor with real processes: ready lines, restarts after kill -9, crash loops,
graceful and forced stops, scaling."""

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from shoal.control.restart import LifeState, RestartPolicy
from shoal.control.supervisor import Supervisor
from shoal.errors import ConfigError, ShoalError

FAKE = str(Path(__file__).with_name("fake_instance.py"))
FAST = RestartPolicy(initial_backoff="20ms", max_backoff="100ms", stable_after="5s",
                     crash_loop_exits=3, jitter=0.0)


def supervisor(modes: dict[str, str], lines: list[str], **kw) -> Supervisor:
    def launch(service: str, instance_id: str, port: int) -> list[str]:
        return [sys.executable, FAKE, modes.get(service, "ok"), str(port)]
    return Supervisor(launch, policy=FAST, output=lines.append, grace=kw.pop("grace", 5.0), **kw)


async def test_scale_up_ready_restart_after_kill_and_scale_down():
    lines: list[str] = []
    sup = supervisor({}, lines)
    events: list[tuple[str, str]] = []
    sup.listeners.append(lambda inst, what: events.append((inst.id, what)))
    try:
        started = await sup.scale("billing", 2)
        assert [i.id for i in started] == ["billing-1", "billing-2"]
        await sup.wait_ready(10)
        first = sup.instances["billing-1"]
        assert first.ready_info["port"] == first.port and first.pid is not None
        old_pid = first.pid
        os.kill(old_pid, signal.SIGKILL)
        for _ in range(200):
            await asyncio.sleep(0.025)
            if first.pid not in (None, old_pid) and first.ready.is_set():
                break
        assert first.pid not in (None, old_pid)
        assert first.life.restarts == 1 and first.life.state is LifeState.RUNNING
        assert any("killed by SIGKILL" in line for line in lines)
        assert ("billing-1", "exited") in events
        await sup.scale("billing", 1)
        assert [i.id for i in sup.of("billing")] == ["billing-1"]
        assert "[billing-2] draining" in lines  # SIGTERM, handled
        assert ("billing-2", "stopped") in events
        started = await sup.scale("billing", 2)
        assert [i.id for i in started] == ["billing-2"]  # the free number is reused
    finally:
        await sup.close()
    assert sup.instances == {}


async def test_crash_loop_is_marked_failed_with_its_last_lines():
    lines: list[str] = []
    sup = supervisor({"orders": "crash"}, lines)
    try:
        await sup.scale("orders", 1)
        with pytest.raises(ShoalError, match=r"(?s)orders-1 failed: crash loop.*no database"):
            await sup.wait_ready(10)
        inst = sup.instances["orders-1"]
        assert inst.life.state is LifeState.FAILED and inst.exits == 3
        assert "exit status 3" in inst.life.reason
        assert inst.describe()["process"] == "failed"
        assert any("FAILED" in line for line in lines)
        assert "[orders-1] supervisor:   | RuntimeError: no database" in lines
    finally:
        await sup.close()


async def test_an_instance_ignoring_sigterm_is_killed_after_the_grace():
    lines: list[str] = []
    sup = supervisor({"slow": "stubborn"}, lines, grace=0.3)
    await sup.scale("slow", 1)
    await sup.wait_ready(10)
    process = sup.instances["slow-1"].process
    await sup.close()
    assert process.returncode == -signal.SIGKILL
    assert any("SIGKILL" in line for line in lines)


async def test_wait_ready_names_the_late_and_bad_counts_are_refused():
    sup = Supervisor(lambda s, i, p: [sys.executable, "-c", "import time; time.sleep(30)"],
                     output=None, grace=1.0)
    try:
        await sup.scale("quiet", 1)
        with pytest.raises(TimeoutError, match="quiet-1"):
            await sup.wait_ready(0.3)
        for bad in (-1, True, "2"):
            with pytest.raises(ConfigError, match="replicas must be an integer"):
                await sup.scale("quiet", bad)
    finally:
        await sup.close()


async def test_a_missing_executable_counts_as_a_crash():
    sup = Supervisor(lambda s, i, p: ["/nonexistent/python"], policy=FAST, output=None)
    try:
        await sup.scale("ghost", 1)
        with pytest.raises(ShoalError, match="cannot start /nonexistent/python"):
            await sup.wait_ready(5)
    finally:
        await sup.close()


async def test_exit_hooks_get_the_dead_pid_before_the_restart():
    seen: list[tuple[str, int, bool]] = []
    sup = supervisor({}, [])

    async def hook(inst, pid):
        seen.append((inst.id, pid, inst.process.returncode is not None))

    sup.exit_hooks.append(hook)
    try:
        await sup.scale("billing", 1)
        await sup.wait_ready(10)
        pid = sup.instances["billing-1"].pid
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            await asyncio.sleep(0.025)
            if seen:
                break
        assert seen == [("billing-1", pid, True)]
    finally:
        await sup.close()
    assert len(seen) == 1  # a stop we asked for runs no hook


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
async def test_instances_do_not_outlive_a_supervisor_killed_with_9():
    parent = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).with_name("supervisor_parent.py")),
        stdout=asyncio.subprocess.PIPE)
    try:
        child = int(await asyncio.wait_for(parent.stdout.readline(), 20))
        os.kill(parent.pid, signal.SIGKILL)
        await parent.wait()
        for _ in range(200):
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.025)
        else:
            os.kill(child, signal.SIGKILL)
            raise AssertionError("the instance outlived its supervisor")
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
