"""The manifest -> Plan adapter, and load reports (leased Store keys)."""

import asyncio
import dataclasses
from pathlib import Path

import pytest

from shoal.config import parse_manifest
from shoal.control.load import LOAD_PREFIX, LoadReporter, load_key, read_inflight
from shoal.control.plan import absolute_url, plan_from_manifest
from shoal.control.plane import instance_argv
from shoal.errors import ConfigError
from shoal.instance import parse_policies
from shoal.store.memory import MemoryStore


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
                    "--instance-id", "a-1", "--mtls", "strict", "--label", "tier=front",
                    "--policies",
                    '{"a":{"retries":{"attempts":2},"load_balancer":{"policy":"least_request"}}}']
    assert parse_policies(argv[-1])["a"] == manifest.services["a"].traffic_policy
    assert not plan.services["a"].guarded  # no policies: or topics: -> no manifest to parse
    guarded = dataclasses.replace(plan.services["a"], guarded=True)
    assert instance_argv(plan, guarded, "a-1", 4242)[-2:] == ["--manifest",
                                                             str(plan.manifest_path)]
    assert plan.gateway is manifest.gateway and plan.admin_listen == "127.0.0.1:0"
    assert [str(a) for a in plan.gateway.listen] == ["127.0.0.1:0"]
    assert plan.gateway.routes.table.routes[0].name == "r"
    other = plan_from_manifest(manifest, gateway_listen="unix:/tmp/g.sock")
    assert [str(a) for a in other.gateway.listen] == ["unix:/tmp/g.sock"]
    assert other.gateway.routes is manifest.gateway.routes
    with pytest.raises(ConfigError, match="--gateway-listen: 'nope' needs a port"):
        plan_from_manifest(manifest, gateway_listen="nope")
    a, b = plan.services["a"], plan.services["b"]
    assert (a.app, a.replicas, a.autoscale) == ("mod:svc", 3, None)
    assert a.traffic == {"retries": {"attempts": 2}, "load_balancer": {"policy": "least_request"}}
    assert a.labels == {"tier": "front"} and a.env == {"X": "1"}
    assert (b.autoscale.min, b.autoscale.max, b.autoscale.target_lag) == (1, 4, 10)
    assert b.autoscale.cooldown == 5.0 and b.autoscale.stabilization == 5.0


async def test_reports_sum_per_service_and_vanish_with_their_lease():
    store = MemoryStore()
    load = {"a1": 3, "a2": 4, "b1": 0}
    reporters = [await LoadReporter(store, service, instance, lambda i=instance: load[i],
                                    interval=0.05, ttl=0.5).start()
                 for service, instance in (("a", "a1"), ("a", "a2"), ("b", "b1"))]
    try:
        assert await read_inflight(store) == {"a": 7, "b": 0}
        load["a1"] = 10
        await asyncio.sleep(0.15)
        assert await read_inflight(store) == {"a": 14, "b": 0}
        assert [r.writes for r in reporters] == [2, 1, 1]  # unchanged figures not rewritten
        await asyncio.sleep(0.6)  # past the ttl: the lease was renewed, the figures stay
        assert await read_inflight(store) == {"a": 14, "b": 0}
        await reporters[0].close()
        assert await read_inflight(store) == {"a": 4, "b": 0}
    finally:
        for reporter in reporters:
            await reporter.close()
    assert await store.list(LOAD_PREFIX) == []


async def test_malformed_or_mismatched_reports_are_skipped():
    store = MemoryStore()
    await store.put(f"{LOAD_PREFIX}a/a1", b"{not json")
    await store.put(f"{LOAD_PREFIX}a/a2", b'{"service": "b", "instance": "x", "inflight": 99}')
    await store.put(f"{LOAD_PREFIX}a/a3", b'{"service": "a", "instance": "a3", "inflight": -5}')
    await store.put(f"{LOAD_PREFIX}a/a4", b'{"service": "a", "instance": "a4", "inflight": 2}')
    assert await read_inflight(store) == {"a": 2}


def test_reporter_refuses_a_ttl_not_above_the_interval():
    with pytest.raises(ConfigError, match="ttl above it"):
        LoadReporter(MemoryStore(), "a", "a1", lambda: 0, interval=1, ttl=1)


@pytest.mark.parametrize("service, instance", [("Bad", "x"), ("a", "x/y"), ("a", "")])
def test_load_keys_refuse_bad_names(service, instance):
    with pytest.raises(ConfigError):
        load_key(service, instance)
