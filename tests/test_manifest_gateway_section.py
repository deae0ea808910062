"""The manifest's ``gateway:`` section has one schema: ``shoal validate``, ``shoal up`` and
``shoal gateway --config`` accept and refuse the same sections, with the same error line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal.cli import app

BAD = [
    # a listen address without a port, second in a list
    ("gateway:\n  listen: [127.0.0.1:0, nowhere]\n",
     "bad.yaml, line 2: gateway.listen[1]: 'nowhere' needs a port"),
    # a route whose regex backtracks exponentially (hostile: ReDoS)
    ("gateway:\n  routes:\n    - service: x\n      match: {path: {regex: '(a+)+$'}}\n",
     "bad.yaml, line 4: gateway.routes: "),
    # an alias bomb inside the section (refused by the one YAML loader, shoal.yamlsafe)
    ("gateway:\n  services:\n    a: &a {retries: {attempts: 1}}\n"
     "x-b: &b [" + ", ".join(["*a"] * 400) + "]\n"
     "x-c: &c [" + ", ".join(["*b"] * 400) + "]\n",
     "bad.yaml, line 3: more than 100000 values (alias expansion?)"),
    ("gateway:\n  limits: {max_body_bytes: lots}\n",
     "bad.yaml, line 2: gateway.limits.max_body_bytes: "),
]


def test_one_bad_gateway_section_one_error_through_every_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SHOAL_BROKER", "SHOAL_STORE")}
    gateways = []  # real `shoal gateway` processes, run side by side (each imports for ~1 s)
    for i, (text, _) in enumerate(BAD):
        (tmp_path / f"bad{i}.yaml").write_text(text)
        gateways.append(subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", "gateway", "--config", f"bad{i}.yaml",
             "--store", f"sqlite:///{tmp_path}/s.db"], cwd=tmp_path, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    monkeypatch.chdir(tmp_path)
    try:
        for i, (_, expected) in enumerate(BAD):
            expected = expected.replace("bad.yaml", f"bad{i}.yaml")
            validate = CliRunner().invoke(app, ["validate", f"bad{i}.yaml"])
            assert validate.exit_code == 1, validate.output
            problem, summary = validate.stderr.splitlines()
            assert problem.startswith(expected), problem
            assert summary == f"bad{i}.yaml: invalid (1 problem)"

            up = CliRunner().invoke(app, ["up", f"bad{i}.yaml"])
            assert up.exit_code == 2 and up.stderr.splitlines() == [f"shoal: error: {problem}"]

            _, stderr = gateways[i].communicate(timeout=60)
            assert gateways[i].returncode == 2, stderr
            assert stderr.splitlines() == [f"shoal: error: {problem}"]
    finally:
        for proc in gateways:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_a_section_only_the_gateway_knew_now_validates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shoal.yaml").write_text(
        "gateway:\n"
        "  listen: [127.0.0.1:0, ':9000', unix:/tmp/shoal-gw.sock]\n"
        "  routes_key: my/routes\n  drain: 2s\n"
        "  limits: {max_body_bytes: 1MiB, header_timeout: 2s}\n"
        "  services: {orders: {timeout: 2s}}\n"
        "  routes: [{service: orders}]\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["validate"])
    assert result.exit_code == 0, result.output
    assert ("gateway   127.0.0.1:0, 0.0.0.0:9000, unix:/tmp/shoal-gw.sock (1 route)"
            in result.stdout)
