"""``shoal up``, ``ps`` and ``scale`` on bad input: one line naming what, exit status 2."""

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from shoal.cli import app
from shoal.commands.up import _manifest_of
from shoal.control.plane import ControlPlane, Plan, ServicePlan
from shoal.control.restart import RestartPolicy

FAKE = str(Path(__file__).with_name("fake_service.py"))
CRASH = str(Path(__file__).with_name("fake_instance.py"))
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_up_refuses_an_invalid_manifest_naming_file_line_and_key(tmp_path):
    manifest = tmp_path / "shoal.yaml"
    manifest.write_text("services:\n  orders:\n    app: orders:svc\n    replicas: two\n")
    result = runner.invoke(app, ["up", str(manifest)])
    assert result.exit_code == 2
    assert f"{manifest}, line 4: services.orders.replicas" in result.stderr


def test_up_refuses_a_missing_manifest(tmp_path):
    result = runner.invoke(app, ["up", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml" in result.stderr


def test_ps_and_scale_without_a_running_admin_api_say_so():
    url = f"http://127.0.0.1:{_free_port()}"
    for args in (["ps", "--admin", url], ["scale", "billing", "2", "--admin", url]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert "cannot reach the admin API" in result.stderr
        assert "is `shoal up` running?" in result.stderr


def test_ps_finds_the_admin_api_in_the_manifest(tmp_path):
    port = _free_port()
    manifest = tmp_path / "shoal.yaml"
    manifest.write_text(f"admin: {{listen: 127.0.0.1:{port}}}\n")
    result = runner.invoke(app, ["ps", str(manifest)])
    assert result.exit_code == 2 and f"http://127.0.0.1:{port}/api/instances" in result.stderr


async def test_ps_and_scale_against_a_running_plane(tmp_path):
    plan = Plan(broker=f"sqlite:///{tmp_path}/events.db", store=f"sqlite:///{tmp_path}/store.db",
                services={"echo": ServicePlan("echo", "unused:app")}, base_dir=tmp_path,
                gateway=None, admin_listen="127.0.0.1:0",
                restart=RestartPolicy(initial_backoff="20ms", crash_loop_exits=2, jitter=0.0))

    def launch(service: str, instance_id: str, port: int) -> list[str]:
        if instance_id == "echo-3":  # this one crash loops
            return [sys.executable, CRASH, "crash", str(port)]
        return [sys.executable, FAKE, service, instance_id, str(port), plan.store]

    plane = ControlPlane(plan, output=None, launch=launch)
    await plane.start(ready_timeout=20)
    try:
        admin = plane.admin_url
        result = await asyncio.to_thread(runner.invoke, app, ["ps", "--admin", admin])
        assert result.exit_code == 0, result.output
        assert "echo-1" in result.stdout and "serving" in result.stdout
        result = await asyncio.to_thread(runner.invoke, app,
                                         ["scale", "echo", "2", "--admin", admin])
        assert result.exit_code == 0 and result.stdout.strip() == "echo: 1 -> 2 replicas"
        result = await asyncio.to_thread(runner.invoke, app,
                                         ["scale", "nope", "2", "--admin", admin])
        assert result.exit_code == 2 and "'nope': not in the manifest" in result.stderr
        result = await asyncio.to_thread(runner.invoke, app,
                                         ["scale", "echo", "1000", "--admin", admin])
        assert result.exit_code == 2 and "replicas: expected an integer 0..64" in result.stderr
        await asyncio.to_thread(runner.invoke, app, ["scale", "echo", "3", "--admin", admin])
        crashing = plane.supervisor.instances["echo-3"]
        for _ in range(200):
            if crashing.life.state.value == "failed":
                break
            await asyncio.sleep(0.025)
        result = await asyncio.to_thread(runner.invoke, app, ["ps", "--admin", admin])
        assert "echo-3 failed: crash loop: 2 exits in a row" in result.stdout
        assert "  | RuntimeError: no database" in result.stdout
    finally:
        await plane.close()


def test_up_with_an_app_that_cannot_load_fails_at_once_naming_it(tmp_path):
    manifest = tmp_path / "shoal.yaml"
    manifest.write_text("admin: {listen: 127.0.0.1:0}\ngateway: {listen: 127.0.0.1:0}\n"
                        "broker: sqlite:///" + str(tmp_path) + "/events.db\n"
                        "services:\n  ghost: {app: 'nosuch:svc'}\n")
    result = runner.invoke(app, ["up", str(manifest), "--ready-timeout", "30"])
    assert result.exit_code == 2
    assert "instance ghost-1 failed: exit status 2: a configuration error" in result.stderr
    assert "no module named 'nosuch'" in result.stderr


def test_the_early_fork_server_runs_where_the_manifest_argument_says():
    assert _manifest_of([]) == Path("shoal.yaml")
    assert _manifest_of(["shop/shoal.yaml", "--gateway-listen", "127.0.0.1:0"]) == Path(
        "shop/shoal.yaml")
    assert _manifest_of(["--admin-listen", "127.0.0.1:0", "--ready-timeout=5", "m.yaml"]
                        ) == Path("m.yaml")
    assert _manifest_of(["--ready-timeout", "5"]) == Path("shoal.yaml")


def test_the_ready_figure_counts_from_the_start_of_the_process():
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", "import time; time.sleep(0.3); from "
                          "shoal.commands.up import _process_age; print(_process_age())"],
                         capture_output=True, text=True, timeout=60, check=True)
    wall = time.monotonic() - started
    assert 0.3 <= float(out.stdout) <= wall + 0.02  # /proc's start time: 1/CLK_TCK steps
