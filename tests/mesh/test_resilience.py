"""Retry policy and budget, circuit breaker, outlier detection and their config loader."""

from __future__ import annotations

import random

import pytest

from shoal.errors import CircuitOpen, ConfigError, ConnectError, ConnectionLost, ProtocolError
from shoal.mesh.balancer import PeakEwmaBalancer
from shoal.mesh.endpoint import Endpoint
from shoal.mesh.health import HealthCheckConfig
from shoal.mesh.resilience import (
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitState,
    Failure,
    OutlierDetection,
    OutlierDetector,
    Retries,
    RetryBudget,
    RetryPolicy,
    SlidingWindowCounter,
    Timeouts,
    TrafficPolicy,
    classify,
    load_config,
    load_traffic_policy,
    status_of,
)

KiB = 1024


class FakeClock:
    """Monotonic seconds that move only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- retry policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("retry_on", "method", "outcome", "body", "expected"), [
    # defaults: connect-failure, reset, gateway-error
    (None, "GET", Failure.CONNECT_FAILURE, 0, True),
    (None, "GET", Failure.RESET, 0, True),
    (None, "GET", Failure.TIMEOUT, 0, True),
    (None, "GET", 503, 0, True),
    (None, "GET", 504, 0, True),
    (None, "GET", 500, 0, False),
    (None, "GET", 404, 0, False),
    (None, "GET", 200, 0, False),
    # non-idempotent: only when the upstream provably saw nothing
    (None, "POST", Failure.CONNECT_FAILURE, 10, True),
    (None, "POST", Failure.RESET, 10, False),
    (None, "post", 503, 10, False),
    (None, "PUT", 503, 10, True),
    (None, "DELETE", Failure.TIMEOUT, 0, True),
    # bodies beyond the buffer limit are streamed, never replayed
    (None, "PUT", 503, 64 * KiB, True),
    (None, "PUT", 503, 64 * KiB + 1, False),
    (None, "PUT", Failure.CONNECT_FAILURE, None, False),
    # explicit conditions
    (["5xx"], "GET", 500, 0, True),
    (["5xx"], "GET", Failure.RESET, 0, True),
    (["connect-failure"], "GET", Failure.RESET, 0, False),
    (["connect-failure"], "GET", Failure.CONNECT_FAILURE, 0, True),
    ("reset,connect-failure", "GET", 503, 0, False),
    (["gateway-error"], "GET", 502, 0, True),
    (["gateway-error"], "GET", 501, 0, False),
])
def test_should_retry_matrix(retry_on, method, outcome, body, expected) -> None:
    retries = Retries() if retry_on is None else Retries(retry_on=retry_on)
    assert RetryPolicy(retries).should_retry(1, method, outcome, body) is expected


def test_should_retry_attempts_codes_and_non_idempotent_opt_in() -> None:
    policy = RetryPolicy(Retries(attempts=2, retriable_status_codes=[409]))
    assert policy.max_tries == 3
    assert policy.should_retry(1, "GET", 409, 0) and policy.should_retry(2, "GET", 503, 0)
    assert not policy.should_retry(3, "GET", 503, 0)
    assert policy.refusal(3, "GET", 503, 0) == "all 3 tries used"
    assert "not idempotent" in policy.refusal(1, "POST", 503, 0)
    assert "request_buffer_limit=65536" in policy.refusal(1, "GET", 503, 70_000)
    assert "not covered by retry_on" in policy.refusal(1, "GET", 500, 0)
    assert RetryPolicy(Retries(retry_non_idempotent=True)).should_retry(1, "POST", 503, 0)
    assert not RetryPolicy(Retries(attempts=0)).should_retry(1, "GET", 503, 0)


def test_backoff_is_fully_jittered_exponential_capped_at_250ms() -> None:
    policy = RetryPolicy(rng=random.Random(9))
    for attempt, ceiling in [(1, 0.025), (2, 0.075), (3, 0.175), (4, 0.250), (50, 0.250)]:
        draws = [policy.backoff(attempt) for _ in range(2000)]
        assert 0.0 <= min(draws) < ceiling * 0.02
        assert ceiling * 0.98 < max(draws) <= ceiling
    first, second = RetryPolicy(rng=random.Random(4)), RetryPolicy(rng=random.Random(4))
    assert [first.backoff(2) for _ in range(5)] == [second.backoff(2) for _ in range(5)]


def test_try_timeout_is_cut_to_what_is_left_of_the_request_timeout() -> None:
    policy = RetryPolicy(Retries(per_try_timeout="2s"), Timeouts(request="5s"))
    assert policy.try_timeout(0.0) == 2.0
    assert policy.try_timeout(4.0) == pytest.approx(1.0)
    assert policy.try_timeout(6.0) == pytest.approx(-1.0)  # out of time
    assert RetryPolicy(Retries(), Timeouts(request=None)).try_timeout(100.0) is None
    assert RetryPolicy(Retries(), Timeouts(request="15s")).try_timeout(5.0) == 10.0


def test_classify_transport_errors() -> None:
    assert classify(ConnectError("h:1", "refused")) is Failure.CONNECT_FAILURE
    assert classify(ConnectionRefusedError()) is Failure.CONNECT_FAILURE
    assert classify(ConnectionLost("h:1", "eof", request_sent=False)) is Failure.CONNECT_FAILURE
    assert classify(ConnectionLost("h:1", "eof", request_sent=True)) is Failure.RESET
    assert classify(ProtocolError("h:1", "bad status line")) is Failure.RESET
    assert classify(TimeoutError()) is Failure.TIMEOUT
    assert classify(ValueError("bug")) is None
    assert [status_of(o) for o in (Failure.RESET, Failure.TIMEOUT, 404)] == [503, 504, 404]


# -- retry budget ---------------------------------------------------------------------------------


def spend(budget: RetryBudget, now: float) -> int:
    n = 0
    while budget.try_retry(now):
        n += 1
    return n


def test_retry_budget_allows_20_percent_plus_3_per_second() -> None:
    budget = RetryBudget(percent=20, min_retries_per_second=3, window="10s")
    assert spend(budget, 0.0) == 30  # no traffic: the floor, 3/s over the 10 s window
    assert not budget.can_retry(0.5)
    assert "30 retries for 0 requests in the last 10s" in budget.explain(0.5)

    busy = RetryBudget()
    for i in range(1000):
        busy.record_request(i / 100)  # 100 rps for 10 s
    assert spend(busy, 9.99) == 200 + 30


def test_retry_budget_window_slides() -> None:
    budget = RetryBudget(percent=20, min_retries_per_second=0, window="10s")
    for _ in range(50):
        budget.record_request(0.0)
    assert spend(budget, 1.0) == 10
    for _ in range(50):
        budget.record_request(6.0)
    assert spend(budget, 7.0) == 10  # 100 requests in window: 20 allowed, 10 used
    assert spend(budget, 10.5) == 0  # the t=0 requests left the window, their retries too
    assert spend(budget, 16.5) == 0  # everything left; no requests, no floor
    budget.record_request(16.5)
    assert not budget.can_retry(16.5)  # 0.2 of a retry is not a retry
    assert RetryBudget.from_config(Retries(budget_percent=50)).percent == 50.0


def test_sliding_window_counter() -> None:
    counter = SlidingWindowCounter(10.0, buckets=10)
    counter.add(0.0, 5)
    counter.add(4.2)
    counter.add(4.0)
    assert counter.total(9.9) == 7
    assert counter.total(10.0) == 2  # the [0, 1) slice expired
    counter.add(3.0)  # the clock stepped back: counted in the latest slice
    assert counter.total(13.9) == 3 and counter.total(14.0) == 0
    counter.add(4.5)  # back into a slice that expired whole: counted, no stale slice used
    assert counter.total(4.5) == 1
    counter.add(20.0)
    counter.add(20.5)  # the newest slice again (the short way)
    assert counter.total(20.9) == 2 and counter.total(29.9) == 2 and counter.total(31.0) == 0


# -- circuit breaker ------------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_half_opens_and_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(CircuitBreakerConfig(consecutive_failures=3, open_interval="5s"),
                             clock=clock, service="payments")
    for outcome in ["fail", "fail", "ok", "fail", "fail"]:  # a success resets the count
        assert breaker.allow()
        breaker.on_failure() if outcome == "fail" else breaker.on_success()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.allow()
    breaker.on_failure()
    assert breaker.state is CircuitState.OPEN
    assert not breaker.allow() and "open after 3 consecutive failures" in breaker.rejection
    clock.advance(2.0)
    with pytest.raises(CircuitOpen, match=r"circuit breaker: call to 'payments' rejected: "
                                          r"circuit open.*retry in 3s") as info:
        breaker.acquire()
    assert info.value.retry_after == pytest.approx(3.0)
    clock.advance(3.0)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow()  # the one probe
    assert not breaker.allow() and "probe request(s) are in flight" in breaker.rejection
    breaker.on_success()
    assert breaker.state is CircuitState.CLOSED
    assert all(breaker.allow() for _ in range(10))


def test_breaker_failed_probe_reopens_and_n_probes_must_all_succeed() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(CircuitBreakerConfig(consecutive_failures=1, open_interval="1s",
                                                  half_open_requests=2), clock=clock)
    breaker.allow()
    breaker.on_failure()
    clock.advance(1.0)
    assert breaker.allow() and breaker.allow() and not breaker.allow()
    breaker.on_success()
    breaker.on_failure()
    assert breaker.state is CircuitState.OPEN and breaker.retry_after() == pytest.approx(1.0)
    clock.advance(1.0)
    assert breaker.allow()
    breaker.on_cancel()  # a cancelled probe frees its slot without a verdict
    assert breaker.allow()
    breaker.on_success()
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow()
    breaker.on_success()
    assert breaker.state is CircuitState.CLOSED and breaker.active == 0


def test_breaker_concurrency_and_pending_limits() -> None:
    breaker = CircuitBreaker(CircuitBreakerConfig(max_requests=2, max_pending_requests=1,
                                                  consecutive_failures=0), clock=FakeClock())
    assert breaker.allow() and breaker.allow()
    assert not breaker.allow() and breaker.rejection == "max_requests=2 requests in flight"
    assert breaker.enqueue() and not breaker.enqueue()
    assert "max_pending_requests=1" in breaker.rejection
    breaker.on_success()
    breaker.dequeue()
    assert breaker.allow() and breaker.pending == 0
    for _ in range(50):  # consecutive_failures=0: never opens
        breaker.on_failure()
        breaker.allow()
    assert breaker.state is CircuitState.CLOSED


# -- outlier detection ----------------------------------------------------------------------------


def hosts(n: int) -> list[Endpoint]:
    return [Endpoint(f"i{k}", "orders", f"10.0.0.{k}:80") for k in range(n)]


def fail(detector: OutlierDetector, host, now: float, times: int = 5, outcome=503):
    result = None
    for _ in range(times):
        result = detector.on_result(host, outcome, now) or result
    return result


def test_outlier_ejection_time_grows_30_60_90_and_caps_at_300s() -> None:
    detector = OutlierDetector()
    endpoints = hosts(10)
    detector.update_hosts(endpoints)
    target = endpoints[0]
    now = 0.0
    durations = []
    for _ in range(12):
        ejection = fail(detector, target, now)
        assert ejection is not None and ejection.reason == "5 consecutive 5xx"
        durations.append(ejection.until - ejection.at)
        assert detector.is_ejected(target, ejection.until - 0.001)
        now = ejection.until
        assert not detector.is_ejected(target, now)
        assert detector.expire(now) == ["i0"] and detector.expire(now) == []
    assert durations == [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]


def test_outlier_counter_resets_on_success_and_multiplier_decays() -> None:
    detector = OutlierDetector()
    endpoints = hosts(10)
    detector.update_hosts(endpoints)
    a = endpoints[0]
    assert fail(detector, a, 0.0, times=4) is None
    detector.on_result(a, 200, 0.0)
    assert fail(detector, a, 0.0, times=4) is None
    first = fail(detector, a, 0.0, times=1)
    assert first is not None and first.until == 30.0
    assert detector.on_result(a, 503, 10.0) is None  # results while ejected are ignored
    assert fail(detector, a, 35.0).times == 2  # 5 s after: still 2nd in a row (60 s)
    # 95 -> 125: 30 s un-ejected = 3 intervals of 10 s: multiplier 2 -> 0, so 30 s again
    third = fail(detector, a, 125.0)
    assert third.times == 1 and third.until - third.at == 30.0


def test_outlier_local_failures_count_as_5xx_and_gateway_check_is_opt_in() -> None:
    detector = OutlierDetector()
    endpoints = hosts(10)
    detector.update_hosts(endpoints)
    assert fail(detector, endpoints[0], 0.0, outcome=Failure.CONNECT_FAILURE) is not None
    strict = OutlierDetector(OutlierDetection(consecutive_5xx=0, consecutive_gateway_failure=3))
    strict.update_hosts(endpoints)
    assert fail(strict, endpoints[1], 0.0, times=10, outcome=500) is None
    ejection = fail(strict, endpoints[1], 0.0, times=3, outcome=Failure.TIMEOUT)
    assert ejection.reason == "3 consecutive gateway errors"


def test_outlier_max_ejection_percent_and_at_least_one() -> None:
    detector = OutlierDetector(OutlierDetection(max_ejection_percent=10))
    endpoints = hosts(20)
    detector.update_hosts(endpoints)
    ejections = [fail(detector, host, 0.0) for host in endpoints[:5]]
    assert [e is not None for e in ejections] == [True, True, False, False, False]  # 10% of 20
    assert detector.ejected(1.0) == {"i0", "i1"}
    small = OutlierDetector(OutlierDetection(max_ejection_percent=10))
    three = hosts(3)
    small.update_hosts(three)
    assert fail(small, three[0], 0.0) is not None  # one may always be ejected
    assert fail(small, three[1], 0.0) is None
    assert fail(small, three[1], 31.0) is not None  # the first came back: room again


def test_outlier_success_rate_ejection() -> None:
    config = OutlierDetection(consecutive_5xx=0, success_rate=True, success_rate_minimum_hosts=5,
                              success_rate_request_volume=100, max_ejection_percent=50)
    detector = OutlierDetector(config)
    endpoints = hosts(6)
    detector.update_hosts(endpoints)
    rng = random.Random(3)
    for host in endpoints:
        error_rate = 0.5 if host.instance_id == "i5" else 0.01
        for _ in range(200):
            detector.on_result(host, 500 if rng.random() < error_rate else 200, 1.0)
    ejections = detector.evaluate(10.0)
    assert [e.instance_id for e in ejections] == ["i5"]
    assert ejections[0].reason.startswith("success rate 48.0% below 54.4%")
    assert ejections[0].until == 40.0
    assert detector.evaluate(20.0) == []  # counts start afresh each interval
    too_few = OutlierDetector(config)
    too_few.update_hosts(endpoints)
    for host in endpoints[:4]:
        for _ in range(200):
            too_few.on_result(host, 500 if host.instance_id == "i0" else 200, 1.0)
    assert too_few.evaluate(10.0) == []  # fewer than success_rate_minimum_hosts with volume


def test_outlier_detector_feeds_the_balancer_health_predicate() -> None:
    detector = OutlierDetector()
    endpoints = hosts(10)
    detector.update_hosts(endpoints)
    fail(detector, endpoints[3], 0.0)
    balancer = PeakEwmaBalancer(rng=random.Random(1), clock=lambda: 5.0)
    chosen = {balancer.pick(endpoints, is_healthy=lambda e: not detector.is_ejected(e, 5.0))
              .instance_id for _ in range(300)}
    assert "i3" not in chosen and len(chosen) == 9


# -- config ---------------------------------------------------------------------------------------


def test_load_traffic_policy_from_a_plain_dict() -> None:
    policy = load_traffic_policy({
        "timeouts": {"request": "3s", "connect": 0.5},
        "retries": {"attempts": 3, "per_try_timeout": "500ms", "retry_on": "5xx,reset",
                    "retriable_status_codes": [409], "budget_percent": 25},
        "circuit_breaker": {"max_requests": 100, "consecutive_failures": 7,
                            "open_interval": "1m"},
        "outlier_detection": {"consecutive_5xx": 3, "base_ejection_time": "10s",
                              "max_ejection_percent": 50},
        "load_balancer": {"policy": "peak_ewma", "decay": "5s"},
    })
    assert policy.timeouts == Timeouts(request=3.0, connect=0.5)
    assert policy.retries.per_try_timeout == 0.5 and policy.retries.retry_on == ("5xx", "reset")
    assert policy.retries.request_buffer_limit == 65536
    assert policy.circuit_breaker.open_interval == 60.0
    assert policy.outlier_detection.base_ejection_time == 10.0
    assert policy.load_balancer.policy == "peak_ewma"
    assert isinstance(policy.load_balancer.build(), PeakEwmaBalancer)
    assert load_traffic_policy(None) == TrafficPolicy() == load_traffic_policy({})
    assert TrafficPolicy().timeouts.request == 15.0 and TrafficPolicy().retries.attempts == 2


@pytest.mark.parametrize(("data", "message"), [
    ({"retry": {}}, r"traffic_policy\.retry: unknown key \(did you mean 'retries'\?\)"),
    ({"retries": {"perTryTimeout": "1s"}},
     r"traffic_policy\.retries\.perTryTimeout: unknown key \(did you mean 'per_try_timeout'"),
    ({"timeouts": {"request": "soon"}},
     r"traffic_policy\.timeouts\.request: expected a duration like '250ms'"),
    ({"timeouts": {"request": "-1s"}}, r"traffic_policy\.timeouts\.request: expected a duration"),
    ({"timeouts": {"connect": 0}}, r"timeouts\.connect: must be a duration greater than zero"),
    ({"retries": {"attempts": -1}}, r"traffic_policy\.retries\.attempts: must be an integer >= 0"),
    ({"retries": {"attempts": "3"}}, r"retries\.attempts: must be an integer >= 0, got '3'"),
    ({"retries": {"attempts": True}}, r"retries\.attempts: must be an integer"),
    ({"retries": {"retry_on": ["5xx", "sometimes"]}},
     r"retries\.retry_on: unknown condition 'sometimes'"),
    ({"retries": {"retriable_status_codes": [700]}}, r"retries\.retriable_status_codes"),
    ({"retries": {"budget_percent": 120}},
     r"retries\.budget_percent: must be a number between 0 and 100"),
    ({"retries": {"request_buffer_limit": "lots"}}, r"retries\.request_buffer_limit: expected a"),
    ({"retries": {"backoff_base_interval": "1s", "backoff_max_interval": "100ms"}},
     r"backoff_max_interval: must not be shorter"),
    ({"circuit_breaker": {"max_requests": 0}}, r"circuit_breaker\.max_requests: must be an "
                                               r"integer >= 1"),
    ({"outlier_detection": {"max_ejection_percent": -5}},
     r"outlier_detection\.max_ejection_percent: must be a number between 0 and 100"),
    ({"outlier_detection": {"consecutive_5xx": -1}}, r"outlier_detection\.consecutive_5xx"),
    ({"outlier_detection": {"success_rate": "yes"}}, r"success_rate: must be true or false"),
    ({"load_balancer": {"policy": "fastest"}},
     r"traffic_policy\.load_balancer\.policy: unknown load-balancing policy 'fastest'"),
    ({"load_balancer": {"policy": "round_robin", "decay": "1s"}},
     r"traffic_policy\.load_balancer\.decay: unknown option for load-balancing policy"),
    ({"load_balancer": {"policy": "peak_ewma", "decay": "0s"}},
     r"traffic_policy\.load_balancer\.decay: must be a duration greater than zero"),
    ({"retries": ["attempts", 3]}, r"traffic_policy\.retries: expected a mapping"),
    ("fast", r"traffic_policy: expected a mapping of settings, got str"),
])
def test_load_traffic_policy_rejects_malformed_input(data, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_traffic_policy(data)


def test_load_config_works_for_other_config_classes() -> None:
    config = load_config(HealthCheckConfig, {"interval": "5s", "healthy_threshold": 1},
                         where="services.orders.health_check")
    assert config.interval == 5.0 and config.unhealthy_interval == 5.0
    with pytest.raises(ConfigError, match=r"services\.orders\.health_check\.intervall: unknown "
                                          r"key \(did you mean 'interval'\?\)"):
        load_config(HealthCheckConfig, {"intervall": "5s"}, where="services.orders.health_check")
