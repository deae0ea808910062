"""The restart policy: backoff, reset after a stable run, crash loop -> FAILED."""

import random

import pytest

from shoal.control.restart import InstanceLife, LifeState, RestartPolicy
from shoal.errors import ConfigError


def life(**kw) -> InstanceLife:
    policy = RestartPolicy(initial_backoff="100ms", max_backoff="1s", jitter=0.0,
                           stable_after="10s", crash_loop_exits=4, **kw)
    return InstanceLife(policy, random.Random(1))


def test_backoff_doubles_up_to_the_cap_then_crash_loop_fails_with_last_lines():
    slot = life()
    now, delays = 0.0, []
    for _ in range(3):
        slot.on_spawn(now)
        verdict = slot.on_exit(now + 1, 1, ["boom"])
        assert verdict.state is LifeState.BACKOFF
        delays.append(round(verdict.restart_at - (now + 1), 3))
        now = verdict.restart_at
    assert delays == [0.1, 0.2, 0.4]
    slot.on_spawn(now)
    verdict = slot.on_exit(now + 1, -9, ["Traceback", "KeyError: 'x'"])
    assert verdict.state is LifeState.FAILED is slot.state
    assert verdict.restart_at is None
    assert verdict.last_lines == ("Traceback", "KeyError: 'x'")
    assert "crash loop: 4 exits" in verdict.reason and "SIGKILL" in verdict.reason


def test_cap_applies():
    slot = life(multiplier=100.0)
    slot.on_spawn(0)
    slot.on_exit(1, 1)
    slot.on_spawn(2)
    verdict = slot.on_exit(3, 1)
    assert verdict.restart_at == pytest.approx(3 + 1.0)


def test_a_stable_run_resets_the_backoff():
    slot = life()
    slot.on_spawn(0)
    slot.on_exit(1, 1)
    slot.on_spawn(2)
    slot.on_exit(3, 1)
    slot.on_spawn(4)
    slot.on_ready(4.5)
    assert slot.state is LifeState.RUNNING
    verdict = slot.on_exit(100, -9)  # ran 96 s: stable
    assert verdict.restart_at == pytest.approx(100.1)
    assert slot.unstable_exits == 1 and slot.restarts == 3
    assert "killed by SIGKILL after 96.0s" in verdict.reason


def test_an_exit_we_asked_for_is_not_restarted():
    slot = life()
    slot.on_spawn(0)
    slot.on_stop_requested()
    verdict = slot.on_exit(1, 0)
    assert verdict.state is LifeState.STOPPED and verdict.restart_at is None
    assert slot.restarts == 0


def test_jitter_stays_within_its_fraction():
    policy = RestartPolicy(initial_backoff=1, max_backoff=1, jitter=0.2)
    slot = InstanceLife(policy, random.Random(7))
    for i in range(50):
        slot.on_spawn(i * 100)
        verdict = slot.on_exit(i * 100 + 50, 1)  # stable: always the first backoff
        assert 0.8 <= verdict.restart_at - (i * 100 + 50) <= 1.2


def test_reset_forgets_crashes():
    slot = life()
    for i in range(3):
        slot.on_spawn(i)
        slot.on_exit(i + 0.5, 1)
    slot.reset()
    slot.on_spawn(10)
    assert slot.on_exit(10.5, 1).state is LifeState.BACKOFF


@pytest.mark.parametrize("kw", [
    {"initial_backoff": "0s"}, {"initial_backoff": "fast"}, {"max_backoff": "10ms"},
    {"multiplier": 0.5}, {"jitter": 1.0}, {"jitter": -0.1}, {"crash_loop_exits": 0},
    {"crash_loop_exits": True}, {"stable_after": -1},
])
def test_bad_policies_are_refused_by_name(kw):
    with pytest.raises(ConfigError, match=r"restart policy|must not be negative|expected a dur"):
        RestartPolicy(**kw)
