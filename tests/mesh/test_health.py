"""The instance health state machine and the active-check schedule."""

from __future__ import annotations

import random

import pytest

from shoal.errors import ConfigError
from shoal.mesh.health import (
    ActiveCheckSchedule,
    HealthCheckConfig,
    HealthState,
    InstanceHealth,
    Transition,
)

S = HealthState


def moves(transitions: list[Transition]) -> list[tuple[HealthState, HealthState]]:
    return [(t.from_state, t.to_state) for t in transitions]


def serving(config: HealthCheckConfig | None = None) -> InstanceHealth:
    health = InstanceHealth("orders-1", config, now=0.0)
    health.on_check(True, 1.0)
    assert health.state is S.SERVING
    return health


def test_one_passing_check_makes_a_starting_instance_serving() -> None:
    health = InstanceHealth("orders-1", now=0.0)
    assert health.state is S.STARTING
    assert health.on_heartbeat(0.5) == []  # with active checks a heartbeat is not readiness
    assert health.on_check(False, 1.0, "connection refused") == []  # still starting
    [transition] = health.on_check(True, 2.0, "200 OK")
    assert transition == Transition("orders-1", S.STARTING, S.SERVING,
                                    "first passing health check: 200 OK", 2.0)


def test_without_active_checks_the_first_heartbeat_means_ready() -> None:
    health = InstanceHealth("orders-1", HealthCheckConfig(active_checks=False), now=0.0)
    assert moves(health.on_heartbeat(1.0)) == [(S.STARTING, S.SERVING)]
    assert health.on_heartbeat(2.0) == []


def test_unhealthy_after_threshold_failures_and_back_after_threshold_successes() -> None:
    health = serving(HealthCheckConfig(unhealthy_threshold=3, healthy_threshold=2))
    assert health.on_check(False, 2.0) == [] and health.on_check(False, 3.0) == []
    health.on_check(True, 4.0)  # a pass resets the failure count
    assert health.on_check(False, 5.0) == [] and health.on_check(False, 6.0) == []
    [down] = health.on_check(False, 7.0, "HTTP 500")
    assert (down.from_state, down.to_state) == (S.SERVING, S.UNHEALTHY)
    assert down.reason == "3 failed health checks in a row: HTTP 500"
    assert health.on_check(True, 8.0) == []
    [up] = health.on_check(True, 9.0)
    assert (up.to_state, up.reason) == (S.SERVING, "2 passing health checks in a row")


def test_outlier_ejection_and_its_precedence_below_unhealthy() -> None:
    health = serving(HealthCheckConfig(unhealthy_threshold=1, healthy_threshold=1))
    [ejected] = health.on_ejected(2.0, "5 consecutive 5xx")
    assert (ejected.to_state, ejected.reason) == (S.EJECTED, "outlier ejection: 5 consecutive 5xx")
    assert moves(health.on_check(False, 3.0)) == [(S.EJECTED, S.UNHEALTHY)]
    assert moves(health.on_check(True, 4.0)) == [(S.UNHEALTHY, S.EJECTED)]  # still ejected
    assert moves(health.on_unejected(32.0)) == [(S.EJECTED, S.SERVING)]
    assert health.on_unejected(33.0) == []


def test_drain_then_deregister_and_gone_is_terminal() -> None:
    health = serving()
    [drain] = health.on_drain(5.0)
    assert (drain.from_state, drain.to_state, drain.reason) == (S.SERVING, S.DRAINING,
                                                                "drain requested")
    for _ in range(5):  # checks and ejections do not move a draining instance
        assert health.on_check(False, 6.0) == []
    assert health.on_ejected(6.0) == [] and health.state is S.DRAINING
    assert moves(health.on_deregistered(7.0)) == [(S.DRAINING, S.GONE)]
    assert health.on_heartbeat(8.0) == [] and health.on_check(True, 8.0) == []
    assert health.on_drain(8.0) == [] and health.state is S.GONE


def test_heartbeat_ttl_missed_means_gone() -> None:
    health = serving(HealthCheckConfig(heartbeat_ttl="15s"))
    health.on_heartbeat(10.0)
    assert health.heartbeat_deadline == 25.0
    assert health.on_tick(24.9) == []
    [gone] = health.on_tick(25.0)
    assert (gone.from_state, gone.to_state) == (S.SERVING, S.GONE)
    assert gone.reason == "heartbeat TTL 15s missed (last heartbeat 15.0s ago)"
    starting = InstanceHealth("orders-2", now=0.0)  # registration counts as a heartbeat
    assert moves(starting.on_heartbeat_expired(3.0)) == [(S.STARTING, S.GONE)]


def test_states_say_who_gets_traffic() -> None:
    assert [s for s in S if s.healthy] == [S.SERVING]
    assert {s for s in S if s.in_pool} == {S.SERVING, S.EJECTED, S.UNHEALTHY}


def test_active_check_schedule_spreads_and_jitters() -> None:
    schedule = ActiveCheckSchedule("10s", jitter="1s", unhealthy_interval="2s",
                                   rng=random.Random(8))
    firsts = [schedule.first_check_at(100.0) for _ in range(500)]
    assert 100.0 <= min(firsts) < 100.5 and 109.5 < max(firsts) <= 110.0
    nexts = [schedule.next_check_at(100.0) for _ in range(500)]
    assert 110.0 <= min(nexts) < 110.05 and 110.95 < max(nexts) <= 111.0
    assert all(102.0 <= schedule.next_check_at(100.0, healthy=False) <= 103.0
               for _ in range(100))
    a = ActiveCheckSchedule.from_config(HealthCheckConfig(), random.Random(1))
    b = ActiveCheckSchedule.from_config(HealthCheckConfig(), random.Random(1))
    assert [a.next_check_at(0.0) for _ in range(3)] == [b.next_check_at(0.0) for _ in range(3)]
    assert a.unhealthy_interval == a.interval == 10.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"interval": "0s"}, "interval: must be a duration greater than zero"),
    ({"timeout": "often"}, "timeout: expected a duration"),
    ({"healthy_threshold": 0}, "healthy_threshold: must be an integer >= 1"),
    ({"unhealthy_threshold": -3}, "unhealthy_threshold: must be an integer >= 1"),
    ({"path": "healthz"}, "path: must be an HTTP path"),
    ({"heartbeat_ttl": -1}, "heartbeat_ttl: must not be negative"),
])
def test_health_check_config_rejects_bad_values(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        HealthCheckConfig(**kwargs)
