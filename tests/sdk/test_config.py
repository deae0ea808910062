"""shoal.config: the manifest schema, its error messages, and hostile manifests."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.config import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestError,
    load_manifest,
    parse_manifest,
)
from shoal.errors import ConfigError
from tests.conftest import ROOT

FULL = """\
broker: sqlite:///.shoal/events.db
store: sqlite:///.shoal/store.db
admin: {listen: 127.0.0.1:9001}
gateway:
  listen: 0.0.0.0:9000
  routes:
    - name: orders
      match: {path: {prefix: /orders}}
      service: orders
      timeout: 2s
security: {mtls: permissive}
services:
  orders:
    app: shop.orders:svc
    replicas: 2
    autoscale: {min: 1, max: 5, target_inflight: 10, cooldown: 45s}
    load_balancer: peak_ewma
    policy:
      timeouts: {request: 2s}
      retries: {attempts: 2, per_try_timeout: 500ms}
      circuit_breaker: {max_pending_requests: 100}
    labels: {tier: front}
    env: {LOG_LEVEL: info}
  billing:
    app: shop.billing:svc
    autoscale: {max: 4, target_lag: 100}
"""


def issues(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, Path("shoal.yaml"))
    return [str(i) for i in info.value.issues]


def test_full_manifest_loads_with_values_defaults_and_lines(tmp_path: Path) -> None:
    path = tmp_path / "shoal.yaml"
    path.write_text(FULL)
    m = load_manifest(path)
    assert m.path == path and m.directory == tmp_path
    assert m.broker == "sqlite:///.shoal/events.db" and m.store_url == "sqlite:///.shoal/store.db"
    assert m.admin.listen == "127.0.0.1:9001" and [str(a) for a in m.gateway.listen] == [
        "0.0.0.0:9000"]
    assert m.security.mtls == "permissive"
    assert len(m.gateway.routes.table) == 1
    orders = m.services["orders"]
    assert orders.replicas == 2 and orders.labels == {"tier": "front"}
    assert orders.autoscale is not None and orders.autoscale.cooldown == 45.0
    assert orders.autoscale.target_inflight == 10
    policy = orders.traffic_policy
    assert policy.load_balancer.policy == "peak_ewma"
    assert policy.timeouts.request == 2.0 and policy.retries.attempts == 2
    assert orders.policy_config()["load_balancer"] == {"policy": "peak_ewma"}
    billing = m.services["billing"]
    assert billing.replicas == 1 and billing.autoscale is not None
    assert (billing.autoscale.min, billing.autoscale.cooldown) == (1, 30.0)
    assert m.line_of("services.orders.replicas") == 15
    assert m.line_of("gateway.routes[0]") == 7


def test_empty_manifest_means_every_default() -> None:
    for text in ("", "# nothing\n", "{}\n"):
        m = parse_manifest(text)
        assert m.broker == "sqlite:///.shoal/events.db"
        assert m.store_url == "sqlite:///.shoal/store.db"
        assert m.services == {} and len(m.gateway.routes.table) == 0
        assert m.security.mtls == "strict" and m.admin.listen == "127.0.0.1:8081"
    assert parse_manifest("broker: memory://x\n").store_url == "memory://x"
    assert parse_manifest("security: {mtls: off}\n").security.mtls == "off"  # YAML's `off`
    assert isinstance(parse_manifest("", "x.yaml"), Manifest)


@pytest.mark.parametrize(("text", "expected"), [
    ("brokr: memory://x\n",
     "shoal.yaml, line 1: brokr: unknown key (did you mean 'broker'?)"),
    ("services:\n  a:\n    app: m:s\n    replica: 2\n",
     "line 4: services.a.replica: unknown key (did you mean 'replicas'?)"),
    ("services:\n  a:\n    app: m:s\n    autoscale: {max: 2, target_lag: 1, coldown: 1s}\n",
     "line 4: services.a.autoscale.coldown: unknown key (did you mean 'cooldown'?)"),
    ("gateway:\n  lisen: x:1\n", "line 2: gateway.lisen: unknown key (did you mean 'listen'?)"),
    ("services:\n  a:\n    app: m:s\n    replicas: two\n",
     "line 4: services.a.replicas: expected an integer, got 'two'"),
    ("services:\n  a:\n    app: m:s\n    replicas: -1\n",
     "line 4: services.a.replicas: input should be greater than or equal to 0, got -1"),
    ("services:\n  a: {replicas: 1}\n", "line 2: services.a.app: required, but missing"),
    ("services:\n  a:\n    app: nocolon\n",
     "line 3: services.a.app: expected module:attribute"),
    ("services:\n  Bad_Name:\n    app: m:s\n", "line 2: services.Bad_Name: service name"),
    ("services:\n  a:\n    app: m:s\n    autoscale: {min: 3, max: 2, target_lag: 5}\n",
     "line 4: services.a.autoscale: min (3) must not exceed max (2)"),
    ("services:\n  a:\n    app: m:s\n    autoscale: {max: 2}\n",
     "services.a.autoscale: give target_inflight or target_lag"),
    ("services:\n  a:\n    app: m:s\n    autoscale: {max: 2, target_lag: 1, cooldown: soon}\n",
     "services.a.autoscale.cooldown: expected a duration like '250ms'"),
    ("services:\n  a:\n    app: m:s\n    policy:\n      retries: {atempts: 2}\n",
     "line 5: services.a.policy.retries.atempts: unknown key (did you mean 'attempts'?)"),
    ("services:\n  a:\n    app: m:s\n    load_balancer: fastest\n",
     "services.a.load_balancer"),
    ("services:\n  a:\n    app: m:s\n    labels: {tier: 1}\n",
     "line 4: services.a.labels.tier: expected a string, got an integer"),
    ("services:\n  a:\n    app: m:s\n    env: {1BAD: x}\n",
     "services.a.env: environment variable name '1BAD' is invalid"),
    ("services: [a, b]\n", "line 1: services: expected a mapping, got a list"),
    ("security: {mtls: maybe}\n",
     "line 1: security.mtls: expected 'strict', 'permissive' or 'off', got 'maybe'"),
    ("admin: {listen: 127.0.0.1:70000}\n", "admin.listen: port must be 0..65535"),
    ("admin: {listen: nowhere}\n", "admin.listen: expected HOST:PORT"),
    ("broker: 42\n", "line 1: broker: must be a URL string"),
    ("store: notaurl\n", "line 1: store: must be a URL like"),
    ("gateway:\n  routes:\n    - name: r\n      service: a\n      match: {path: {prefx: /}}\n",
     "line 5: gateway.routes: route 'r' (routes[0]): match.path.prefx: unknown key "
     "(did you mean 'prefix'?)"),  # the gateway section's one schema: shoal.gateway.config
    ("gateway:\n  routes: {a: 1}\n", "gateway.routes: expected a list"),
    ("services:\n  int:\n    app: m:s\n    replicas: x\n",
     "line 4: services.int.replicas: expected an integer"),  # a key named like a marker
    ("services:\n  a:\n    app: m:s\n    labels: {str: [1]}\n",
     "line 4: services.a.labels.str: expected a string, got a list"),
])
def test_errors_name_file_line_key_and_what_was_expected(text: str, expected: str) -> None:
    found = issues(text)
    assert any(expected in i for i in found), found
    assert all(i.startswith("shoal.yaml") for i in found)


def test_every_problem_is_reported_at_once() -> None:
    text = ("brokr: x\nadmin: {listen: bad}\nservices:\n  a:\n    app: bad\n"
            "    replicas: x\n  B: {app: m:s}\n")
    found = issues(text)
    assert len(found) == 5, found
    assert [i.split(":")[0] for i in found] == [
        "shoal.yaml, line 1", "shoal.yaml, line 2", "shoal.yaml, line 5",
        "shoal.yaml, line 6", "shoal.yaml, line 7"]


@pytest.mark.parametrize(("text", "expected"), [
    ("broker: {\n", "line 2: not valid YAML"),
    ("just a string\n", "line 1: the manifest must be a mapping"),
    ("- 1\n- 2\n", "not a list"),
    ("a: 1\n---\nb: 2\n", "not valid YAML"),
    ("broker: !!python/object/apply:os.system [echo hi]\n",
     "line 1: unsupported tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("services: !custom {}\n", "unsupported tag '!custom'"),
    ("broker: !custom 5\n", "line 1: unsupported tag '!custom' (plain YAML only"),
    ("broker: memory://a\nbroker: memory://b\n",
     "line 2: broker: given twice (first on line 1)"),
    ("services:\n  a: {app: m:s}\n  a: {app: m:t}\n", "line 3: services.a: given twice"),
    ("[" * 5000 + "]" * 5000, "line 1: nested more than 64 levels deep"),
    ("a:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 1200)),
     "line 65: nested more than 64 levels deep"),
    ("\t- x\n", "not valid YAML"),
])
def test_malformed_and_hostile_yaml(text: str, expected: str) -> None:
    found = issues(text)
    assert any(expected in i for i in found), found


def test_billion_laughs_is_refused_quickly() -> None:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    started = time.monotonic()
    found = issues("\n".join(lines) + "\n")
    assert time.monotonic() - started < 2
    assert any("more than 100000 values (alias expansion?)" in i for i in found), found


def test_modest_anchors_and_merge_keys_are_fine() -> None:
    m = parse_manifest("x-defaults: &d\n  app: m:s\n  replicas: 2\nservices:\n"
                       "  a: *d\n  b: {<<: *d, replicas: 3}\n")
    assert m.services["a"].replicas == 2 and m.services["b"].replicas == 3


def test_deep_flow_nesting_in_a_big_file_is_refused_fast() -> None:
    text = "services:\n  a: " + "[" * (MAX_MANIFEST_BYTES // 2)
    started = time.monotonic()
    assert any("nested more than 64" in i for i in issues(text))
    assert time.monotonic() - started < 2
    ok = "x-deep: " + "[" * 64 + "]" * 64 + "\n"
    assert parse_manifest(ok).services == {}


def test_oversized_unreadable_and_binary_files(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# padding\n" * (10 * 1024 * 1024 // 10))  # 10 MB
    started = time.monotonic()
    with pytest.raises(ManifestError, match=r"big.yaml: larger than the limit of 1048576 bytes"):
        load_manifest(big)
    assert time.monotonic() - started < 1
    just_over = tmp_path / "over.yaml"
    just_over.write_bytes(b"#" * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(ManifestError, match="larger than"):
        load_manifest(just_over)
    with pytest.raises(ManifestError, match=r"missing\.yaml: no such file"):
        load_manifest(tmp_path / "missing.yaml")
    with pytest.raises(ManifestError, match="is a directory"):
        load_manifest(tmp_path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"broker: memory://x\nstore: \xff\xfe\n")
    with pytest.raises(ManifestError, match=r"bin.yaml, line 2: not valid UTF-8"):
        load_manifest(binary)
    assert issubclass(ManifestError, ConfigError)


def test_shoal_validate_prints_ok_and_summary_or_every_problem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shoal.yaml").write_text(FULL)
    (tmp_path / "bad.yaml").write_text("brokr: x\nservices:\n  a: {app: m:s, replicas: x}\n")
    ok = subprocess.run([sys.executable, "-m", "shoal.cli", "validate"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK shoal.yaml\n")
    assert "gateway   0.0.0.0:9000 (1 route)" in ok.stdout
    assert "orders" in ok.stdout and "autoscale 1..5 on 10 in flight" in ok.stdout
    assert "billing" in ok.stdout and "lag 100" in ok.stdout
    monkeypatch.chdir(tmp_path)
    bad = CliRunner().invoke(app, ["validate", "bad.yaml"])
    assert bad.exit_code == 1 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "bad.yaml, line 1: brokr: unknown key (did you mean 'broker'?); expected one of "
        "admin, broker, gateway, security, services, store",
        "bad.yaml, line 3: services.a.replicas: expected an integer, got 'x'",
        "bad.yaml: invalid (2 problems)"]
    assert ROOT.exists()
