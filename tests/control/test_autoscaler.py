"""The autoscaler's decisions: ceil(metric / target), min..max, cooldown, stabilization."""

import pytest

from shoal.control.autoscaler import ScalePolicy, ServiceScaler
from shoal.errors import ConfigError


def scaler(**kw) -> ServiceScaler:
    kw.setdefault("min", 1)
    kw.setdefault("max", 5)
    kw.setdefault("cooldown", "10s")
    return ServiceScaler("billing", ScalePolicy(**kw))


def test_lag_scales_up_at_once_clamped_to_max():
    s = scaler(target_lag=100)
    d = s.decide(0, 1, lag=250)
    assert (d.current, d.desired, d.direction) == (1, 3, "up")
    assert d.reason == "lag 250 / target 100 per instance -> 3"
    d = s.decide(1, 3, lag=5000)
    assert d.desired == 5 and "clamped to max 5" in d.reason
    assert s.decide(2, 5, lag=5000) is None


def test_down_waits_for_the_cooldown_and_takes_the_windows_highest():
    s = scaler(target_lag=100, cooldown="10s", stabilization="10s")
    assert s.decide(0, 1, lag=400).desired == 4
    assert s.decide(5, 4, lag=0) is None  # cooldown
    assert s.decide(9, 4, lag=250) is None  # 3 < 4, still cooling down
    d = s.decide(10.5, 4, lag=0)  # cooldown over; the window still holds the 3 of t=9
    assert d.desired == 3 and "highest in the last 10s: 3" in d.reason
    assert s.decide(15, 3, lag=0) is None  # cooldown since t=10.5
    d = s.decide(21, 3, lag=0)
    assert d.desired == 1 and d.direction == "down"
    assert "clamped to min 1" in d.reason


def test_a_flapping_metric_does_not_flap_replicas():
    s = scaler(target_inflight=10, cooldown="5s", stabilization="30s")
    s.decide(0, 1, inflight=30)
    changes = 0
    for t in range(1, 30):
        figure = 30 if t % 2 else 0
        d = s.decide(t, 3, inflight=figure)
        changes += d is not None
    assert changes == 0


def test_both_metrics_take_the_larger_and_unknown_is_not_zero():
    s = scaler(target_inflight=10, target_lag=100)
    d = s.decide(0, 1, inflight=25, lag=50)
    assert d.desired == 3 and d.reason.startswith("in-flight 25")
    assert s.decide(100, 3) is None  # no figures at all: keep
    assert s.decide(200, 3, lag=None, inflight=None) is None


def test_out_of_range_counts_are_corrected_without_figures():
    s = scaler(target_lag=10, min=2, max=3)
    d = s.decide(0, 1)
    assert d.desired == 2 and "outside min 2..max 3" in d.reason
    assert s.decide(1, 7).desired == 3


def test_exact_multiples_do_not_round_up():
    s = scaler(target_lag=100)
    assert s.decide(0, 1, lag=300).desired == 3
    assert s.recommend(None, 300.0000000001)[0] == 3


@pytest.mark.parametrize("kw, match", [
    ({"min": -1, "target_lag": 1}, "min must be"),
    ({"min": 3, "max": 2, "target_lag": 1}, "max"),
    ({"max": 0, "target_lag": 1}, "max"),
    ({"max": 2}, "give target_inflight or target_lag"),
    ({"max": 2, "target_lag": 0}, "target_lag must be a number > 0"),
    ({"max": 2, "target_lag": float("nan")}, "target_lag"),
    ({"max": 2, "target_inflight": "10"}, "target_inflight"),
    ({"max": 2, "target_lag": 1, "cooldown": "soon"}, "cooldown"),
    ({"max": True, "target_lag": 1}, "max must be"),
])
def test_bad_policies_name_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        ScalePolicy(**kw)
