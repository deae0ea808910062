"""The manifest -> Plan adapter, and the load figures the autoscaler keeps."""

from pathlib import Path

import pytest

from shoal.config import parse_manifest
from shoal.control.plan import absolute_url, plan_from_manifest
from shoal.control.plane import instance_argv
from shoal.control.scaling import LoadFigures
from shoal.load import LoadReport


@pytest.mark.parametrize("url, expected", [
    ("sqlite:///.shoal/events.db", "sqlite:////base/.shoal/events.db"),
    ("sqlite:///x.db?fsync=1", "sqlite:////base/x.db?fsync=1"),
    ("sqlite:////abs/events.db", "sqlite:////abs/events.db"),
    ("memory://shop", "memory://shop"),
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
])
def test_relative_sqlite_paths_become_absolute(url, expected):
    assert absolute_url(url, Path("/base")) == expected


def test_plan_from_manifest(tmp_path):
    manifest = parse_manifest("""
broker: sqlite:///data/events.db
gateway:
  listen: 127.0.0.1:0
  routes: [{name: r, match: {path: {prefix: /a}}, service: a}]
services:
  a:
    app: mod:svc
    replicas: 3
    load_balancer: least_request
    policy: {retries: {attempts: 2}}
    labels: {tier: front}
    env: {X: "1"}
  b:
    app: mod:other
    autoscale: {min: 1, max: 4, target_lag: 10, cooldown: 5s}
""", tmp_path / "shoal.yaml")
    plan = plan_from_manifest(manifest, cwd=Path("/run"), admin_listen="127.0.0.1:0")
    assert plan.broker == "sqlite:////run/data/events.db"
    assert plan.store == "sqlite:////run/data/store.db"
    assert plan.base_dir == tmp_path.resolve()
    assert plan.manifest_path == (tmp_path / "shoal.yaml").resolve()
    argv = instance_argv(plan, plan.services["a"], "a-1", 4242, python="py")
    assert argv == ["py", "-m", "shoal.instance", "--app", "mod:svc", "--listen",
                    "127.0.0.1:4242", "--broker", plan.broker, "--store", plan.store,
                    "--instance-id", "a-1", "--label", "tier=front",
                    "--manifest", str(plan.manifest_path)]
    assert plan.gateway_listen == "127.0.0.1:0" and plan.admin_listen == "127.0.0.1:0"
    assert plan.routes[0]["service"] == "a"
    a, b = plan.services["a"], plan.services["b"]
    assert (a.app, a.replicas, a.autoscale) == ("mod:svc", 3, None)
    assert a.traffic == {"retries": {"attempts": 2}, "load_balancer": {"policy": "least_request"}}
    assert a.labels == {"tier": "front"} and a.env == {"X": "1"}
    assert (b.autoscale.min, b.autoscale.max, b.autoscale.target_lag) == (1, 4, 10)
    assert b.autoscale.cooldown == 5.0 and b.autoscale.stabilization == 5.0


def report(instance: str, service: str = "a", peak: int = 0, at: float = 100.0) -> LoadReport:
    return LoadReport(service=service, instance=instance, inflight_requests=0,
                      peak_inflight_requests=peak, inflight_events=0, peak_inflight_events=0,
                      requests=0, events=0, interval=1.0, at=at)


def test_load_figures_sum_fresh_peaks_of_live_instances():
    figures = LoadFigures(max_age=5)
    assert figures.inflight("a", {"a1"}, 100) is None  # no report: unknown, not zero
    figures.observe(report("a1", peak=3))
    figures.observe(report("a2", peak=4))
    figures.observe(report("b1", "b", peak=50))
    figures.observe(report("a1", peak=9, at=99))  # older than the one held: ignored
    assert figures.inflight("a", {"a1", "a2"}, 101) == 7
    assert figures.inflight("a", {"a1"}, 101) == 3  # a2 is not a live instance
    assert figures.inflight("a", {"a1", "a2"}, 106) is None  # every report too old
    figures.forget("a1")
    assert figures.inflight("a", {"a1", "a2"}, 101) == 4
