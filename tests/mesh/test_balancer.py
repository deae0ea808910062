"""Load-balancing strategies, deterministically: a fake clock and seeded random."""

from __future__ import annotations

import heapq
import random
from collections import Counter

import pytest

from shoal.errors import ConfigError, NoEndpoint
from shoal.mesh.balancer import (
    BALANCERS,
    LeastRequestBalancer,
    LoadBalancerConfig,
    MaglevBalancer,
    MaglevTable,
    PeakEwmaBalancer,
    RandomBalancer,
    RoundRobinBalancer,
    WeightedRoundRobinBalancer,
    balancer_options,
    hash_key,
    make_balancer,
)
from shoal.mesh.endpoint import Endpoint


class FakeClock:
    """Monotonic seconds that move only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ep(name: str, weight: int = 1, port: int = 8000) -> Endpoint:
    return Endpoint(instance_id=name, service="orders", address=f"10.0.0.1:{port}",
                    weight=weight)


def picks(balancer, endpoints, n: int, **kwargs) -> list[str]:
    return [balancer.pick(endpoints, **kwargs).instance_id for _ in range(n)]


# -- endpoint ---------------------------------------------------------------------------------


def test_endpoint_addresses_and_validation() -> None:
    tcp = Endpoint("a", "orders", "[::1]:8080", labels={"zone": "z1"}, weight=3)
    assert tcp.host_port == ("::1", 8080) and not tcp.is_unix
    unix = Endpoint("b", "orders", "unix:/run/orders.sock")
    assert unix.is_unix and unix.socket_path == "/run/orders.sock"
    assert hash(tcp) == hash(Endpoint("a", "orders", "[::1]:8080", labels={}, weight=3))
    with pytest.raises(ConfigError, match="weight must be an integer >= 1"):
        Endpoint("a", "orders", "h:1", weight=0)
    with pytest.raises(ConfigError, match="'host:port' or a unix socket path"):
        Endpoint("a", "orders", "localhost")
    with pytest.raises(ConfigError, match="instance_id"):
        Endpoint("", "orders", "h:1")


# -- round robin and smooth weighted round robin -------------------------------------------------


def test_smooth_weighted_round_robin_matches_nginx_sequence() -> None:
    balancer = WeightedRoundRobinBalancer(clock=FakeClock(), rng=random.Random(1))
    endpoints = [ep("a", 5), ep("b", 1), ep("c", 1)]
    assert picks(balancer, endpoints, 14) == list("aabacaa" * 2)


def test_weighted_round_robin_is_exact_over_a_cycle() -> None:
    balancer = WeightedRoundRobinBalancer(clock=FakeClock())
    endpoints = [ep("a", 3), ep("b", 2), ep("c", 1)]
    assert Counter(picks(balancer, endpoints, 600)) == {"a": 300, "b": 200, "c": 100}


def test_round_robin_cycles_in_instance_order_from_a_random_start() -> None:
    endpoints = [ep("c"), ep("a"), ep("b")]
    sequence = picks(RoundRobinBalancer(rng=random.Random(3)), endpoints, 6)
    assert sorted(sequence[:3]) == ["a", "b", "c"] and sequence[3:] == sequence[:3]
    assert "".join(sequence) in "abcabcabc"
    starts = {picks(RoundRobinBalancer(rng=random.Random(seed)), endpoints, 1)[0]
              for seed in range(20)}
    assert starts == {"a", "b", "c"}  # clients do not all start on the same instance


def test_random_respects_weights() -> None:
    balancer = RandomBalancer(rng=random.Random(42))
    counts = Counter(picks(balancer, [ep("a", 3), ep("b", 1)], 8000))
    assert 0.72 < counts["a"] / 8000 < 0.78


# -- least request ----------------------------------------------------------------------------


def test_least_request_p2c_prefers_the_idle_endpoint() -> None:
    balancer = LeastRequestBalancer(rng=random.Random(5))
    busy, idle = ep("busy"), ep("idle")
    for _ in range(3):
        balancer.on_start(busy)
    assert set(picks(balancer, [busy, idle], 100)) == {"idle"}

    three = [ep("a"), ep("b"), ep("c")]
    for endpoint in three[:2]:
        for _ in range(5):
            balancer.on_start(endpoint)
    counts = Counter(picks(balancer, three, 3000))
    # c wins whenever it is one of the two sampled: 2/3 of picks; a and b split the rest
    assert 0.63 < counts["c"] / 3000 < 0.70
    balancer.on_finish(three[0], 0.01)
    assert balancer.stats(three[0]).active == 4 and balancer.stats(three[0]).requests == 1


def test_least_request_unequal_weights_use_active_request_bias() -> None:
    heavy, light = ep("heavy", 2), ep("light", 1)
    balancer = LeastRequestBalancer(rng=random.Random(5))
    assert Counter(picks(balancer, [heavy, light], 300)) == {"heavy": 200, "light": 100}
    # 3 in flight on heavy: 2 / (3 + 1) = 0.5 vs 1 / 1 -> light gets two thirds
    for _ in range(3):
        balancer.on_start(heavy)
    assert Counter(picks(balancer, [heavy, light], 300)) == {"heavy": 100, "light": 200}
    unbiased = LeastRequestBalancer(active_request_bias=0.0)
    for _ in range(3):
        unbiased.on_start(heavy)
    assert Counter(picks(unbiased, [heavy, light], 300)) == {"heavy": 200, "light": 100}


# -- peak EWMA --------------------------------------------------------------------------------


def run_sequential(balancer, clock, latency: dict[str, float], ok: dict[str, bool],
                   n: int) -> list[str]:
    endpoints = [ep(name, port=8000 + i) for i, name in enumerate(latency)]
    sequence = []
    for _ in range(n):
        chosen = balancer.pick(endpoints)
        balancer.on_start(chosen)
        clock.advance(latency[chosen.instance_id])
        balancer.on_finish(chosen, latency[chosen.instance_id], ok[chosen.instance_id])
        sequence.append(chosen.instance_id)
    return sequence


def test_peak_ewma_moves_traffic_away_from_a_slow_endpoint_within_a_few_requests() -> None:
    clock = FakeClock()
    balancer = PeakEwmaBalancer(clock=clock, rng=random.Random(7))
    sequence = run_sequential(balancer, clock, {"fast": 0.010, "slow": 0.200},
                              {"fast": True, "slow": True}, 300)
    assert sequence[:5].count("slow") <= 1
    assert sequence[5:].count("slow") == 0


def test_peak_ewma_balances_by_latency_times_load_under_concurrency() -> None:
    """12 requests always in flight: the slower endpoint takes the overflow, not half."""
    clock = FakeClock()
    balancer = PeakEwmaBalancer(clock=clock, rng=random.Random(11))
    latency = {"fast": 0.010, "slow": 0.050}
    endpoints = [ep("fast", port=1), ep("slow", port=2)]
    in_flight: list[tuple[float, int, Endpoint]] = []
    counts: Counter[str] = Counter()
    for i in range(4000):
        while len(in_flight) >= 12:
            done_at, _, done = heapq.heappop(in_flight)
            clock.now = done_at
            balancer.on_finish(done, latency[done.instance_id])
        chosen = balancer.pick(endpoints)
        balancer.on_start(chosen)
        counts[chosen.instance_id] += 1
        heapq.heappush(in_flight, (clock.now + latency[chosen.instance_id], i, chosen))
    share = counts["slow"] / 4000
    assert 0.02 < share < 0.35, counts


def test_peak_ewma_does_not_prefer_a_fast_failing_endpoint() -> None:
    latency, ok = {"ok": 0.020, "broken": 0.001}, {"ok": True, "broken": False}
    clock = FakeClock()
    penalized = PeakEwmaBalancer(clock=clock, rng=random.Random(7))
    assert run_sequential(penalized, clock, latency, ok, 300).count("broken") <= 3
    # control: without the failure penalty the 1 ms errors would attract nearly everything
    clock = FakeClock()
    naive = PeakEwmaBalancer(clock=clock, rng=random.Random(7), failure_penalty=0,
                             failure_penalty_factor=1.0)
    assert run_sequential(naive, clock, latency, ok, 300).count("broken") > 250


def test_peak_ewma_estimate_defaults_peaks_and_decays() -> None:
    clock = FakeClock()
    balancer = PeakEwmaBalancer(clock=clock, decay="10s", default_rtt="30ms")
    new = ep("new")
    assert balancer.rtt_estimate(new) == pytest.approx(0.030)  # unseen endpoint
    balancer.on_start(new)
    balancer.on_finish(new, 0.200)
    assert balancer.rtt_estimate(new) == pytest.approx(0.200)  # peak: jumps up at once
    clock.advance(10.0)
    assert balancer.rtt_estimate(new) == pytest.approx(0.200 * 0.36788, rel=1e-4)  # e^-1
    balancer.on_start(new)
    balancer.on_start(new)
    assert balancer.cost(new) == pytest.approx(0.200 * 0.36788 * 3, rel=1e-4)
    # a failure counts as at least the penalty, however fast it came back
    failing = ep("failing")
    balancer.on_start(failing)
    balancer.on_finish(failing, 0.001, ok=False)
    assert balancer.rtt_estimate(failing) == pytest.approx(0.250)
    balancer.on_start(failing)
    balancer.on_finish(failing, 0.001, ok=False)
    assert balancer.rtt_estimate(failing) == pytest.approx(1.250)  # 5x, capped at 5 x 250 ms
    assert balancer.stats(failing).failures == 2


# -- consistent hashing (Maglev) --------------------------------------------------------------


def test_maglev_is_stable_even_and_order_independent() -> None:
    endpoints = [ep(f"i{n}", port=9000 + n) for n in range(10)]
    balancer = MaglevBalancer(table_size=5003)
    owners = {key: balancer.pick(endpoints, key=key).instance_id
              for key in (f"user-{k}" for k in range(5000))}
    again = MaglevBalancer(table_size=5003)
    assert all(again.pick(endpoints[::-1], key=k).instance_id == v for k, v in owners.items())
    load = Counter(owners.values())
    assert len(load) == 10 and max(load.values()) < 1.25 * 500 and min(load.values()) > 0.75 * 500
    table = MaglevTable(endpoints, 5003)
    assert Counter(table.slots).most_common()[0][1] - min(Counter(table.slots).values()) <= 1
    assert hash_key("user-1") == hash_key(b"user-1")


@pytest.mark.parametrize("n", [5, 10, 30])
def test_maglev_removing_one_endpoint_moves_about_one_nth_of_keys(n: int) -> None:
    endpoints = [ep(f"instance-{i}", port=9000 + i) for i in range(n)]
    keys = [f"session-{k}" for k in range(20000)]
    balancer = MaglevBalancer()  # the default 65537-slot table
    before = {k: balancer.pick(endpoints, key=k).instance_id for k in keys}
    removed = endpoints[n // 2].instance_id
    after = {k: balancer.pick(endpoints[: n // 2] + endpoints[n // 2 + 1:], key=k).instance_id
             for k in keys}
    moved = sum(before[k] != after[k] for k in keys) / len(keys)
    moved_elsewhere = sum(before[k] != after[k] and before[k] != removed for k in keys)
    assert moved < 1 / n + 0.02, moved
    assert moved_elsewhere / len(keys) < 0.02
    assert all(after[k] != removed for k in keys)


def test_maglev_weights_exclusion_and_keyless_picks() -> None:
    heavy, light = ep("heavy", weight=3, port=1), ep("light", weight=1, port=2)
    table = MaglevTable([heavy, light], 65537)
    assert Counter(table.slots)[0] == pytest.approx(3 * 65537 / 4, rel=0.01)  # sorted: heavy=0

    endpoints = [ep(f"i{n}", port=n + 1) for n in range(4)]
    balancer = MaglevBalancer(table_size=1009, rng=random.Random(2))
    owner = balancer.pick(endpoints, key="cart-7")
    retry = balancer.pick(endpoints, key="cart-7", exclude=[owner])
    assert retry != owner
    assert balancer.pick(endpoints, key="cart-7", exclude=[owner.instance_id]) == retry
    assert balancer.pick(endpoints, key="cart-7", exclude=endpoints) == owner  # all tried
    assert len(set(picks(balancer, endpoints, 200))) == 4  # no key: random
    with pytest.raises(ConfigError, match="prime"):
        MaglevBalancer(table_size=65536)


# -- pool selection: exclusion, panic, slow start -----------------------------------------------


def test_exclude_skips_tried_endpoints_and_falls_back_when_all_were_tried() -> None:
    endpoints = [ep("a"), ep("b"), ep("c")]
    for name in BALANCERS:
        balancer = make_balancer(name, rng=random.Random(4), clock=FakeClock())
        for _ in range(30):
            assert balancer.pick(endpoints, exclude=["a", endpoints[1]]).instance_id == "c"
        assert balancer.pick(endpoints, exclude=endpoints).instance_id in {"a", "b", "c"}


def test_no_endpoint_names_the_service_and_reason() -> None:
    with pytest.raises(NoEndpoint, match="balancer: no endpoint for service 'orders': no "
                                         "instances are registered"):
        RoundRobinBalancer(service="orders").pick([])
    never_panic = RoundRobinBalancer(panic_threshold=0)
    with pytest.raises(NoEndpoint, match="all 2 instances are unhealthy"):
        never_panic.pick([ep("a"), ep("b")], is_healthy=lambda e: False)


def test_panic_threshold_balances_over_all_when_too_few_are_healthy() -> None:
    endpoints = [ep(name) for name in "abcd"]
    balancer = RoundRobinBalancer(rng=random.Random(0))
    half = set(picks(balancer, endpoints, 8, is_healthy=lambda e: e.instance_id in "ab"))
    assert half == {"a", "b"} and not balancer.panicking  # 50% healthy: not below threshold
    quarter = set(picks(balancer, endpoints, 8, is_healthy=lambda e: e.instance_id == "a"))
    assert quarter == {"a", "b", "c", "d"} and balancer.panicking
    stricter = RoundRobinBalancer(panic_threshold=80)
    assert len(set(picks(stricter, endpoints, 8, is_healthy=lambda e: e.instance_id != "d"))) == 4
    calm = RoundRobinBalancer(panic_threshold=0)
    assert set(picks(calm, endpoints, 8, is_healthy=lambda e: e.instance_id == "a")) == {"a"}


def test_slow_start_ramps_a_new_endpoint_over_the_window() -> None:
    clock = FakeClock()
    balancer = WeightedRoundRobinBalancer(clock=clock, slow_start_window="10s")
    old, new = ep("old", port=1), ep("new", port=2)
    balancer.pick([old])  # the first membership is warm
    assert balancer.effective_weight(old) == 1.0
    balancer.pick([old, new])  # new joins at t=0
    assert balancer.effective_weight(new) == pytest.approx(0.1)  # min_weight_percent floor
    clock.advance(2.5)
    assert balancer.effective_weight(new) == pytest.approx(0.25)
    clock.advance(2.5)
    assert balancer.effective_weight(new) == pytest.approx(0.5)
    # in [5 s, 5.5 s) 'new' (weight 0.5..0.55) gets about a third of the traffic
    share = Counter(picks(balancer, [old, new], 300))["new"] / 300
    assert 0.30 <= share <= 0.36
    clock.advance(5.0)
    assert balancer.effective_weight(new) == 1.0


def test_slow_start_aggression_and_rejoin_after_being_unhealthy() -> None:
    clock = FakeClock()
    balancer = LeastRequestBalancer(clock=clock, slow_start_window="20s",
                                    slow_start_aggression=2.0, rng=random.Random(1))
    a, b = ep("a", port=1), ep("b", port=2)
    balancer.pick([a, b])
    clock.advance(1.0)
    balancer.pick([a, b], is_healthy=lambda e: e is not b)  # b ejected ...
    clock.advance(30.0)
    balancer.pick([a, b])  # ... and back: ramps again
    clock.advance(5.0)
    assert balancer.effective_weight(b) == pytest.approx((5 / 20) ** 0.5)
    assert balancer.effective_weight(a) == 1.0


def test_stats_of_removed_endpoints_are_dropped() -> None:
    balancer = LeastRequestBalancer(rng=random.Random(1))
    a, b = ep("a", port=1), ep("b", port=2)
    balancer.pick([a, b])
    balancer.on_start(a)
    balancer.on_finish(a, 0.01)
    balancer.on_start(b)
    balancer.pick([ep("c", port=3)])
    assert set(balancer._stats) == {"b"}  # b still has a request in flight


# -- factory and config -------------------------------------------------------------------------


def test_make_balancer_names_and_options() -> None:
    assert {name: type(make_balancer(name)).__name__ for name in BALANCERS} == {
        "round_robin": "RoundRobinBalancer",
        "weighted_round_robin": "WeightedRoundRobinBalancer",
        "random": "RandomBalancer",
        "least_request": "LeastRequestBalancer",
        "peak_ewma": "PeakEwmaBalancer",
        "consistent_hash": "MaglevBalancer",
    }
    assert {"decay", "default_rtt", "slow_start_window", "panic_threshold"} <= balancer_options(
        "peak_ewma")
    assert isinstance(make_balancer("peak_ewma", decay="5s", service="orders"),
                      PeakEwmaBalancer)
    with pytest.raises(ConfigError, match="policy: unknown load-balancing policy 'fastest'"):
        make_balancer("fastest")
    with pytest.raises(ConfigError, match="table_size: unknown option for load-balancing "
                                          "policy 'round_robin'"):
        make_balancer("round_robin", table_size=7)
    with pytest.raises(ConfigError, match="decay: expected a duration"):
        make_balancer("peak_ewma", decay="soon")
    with pytest.raises(ConfigError, match="choice_count: must be an integer >= 1"):
        make_balancer("least_request", choice_count=-2)
    with pytest.raises(ConfigError, match="panic_threshold: must be a number between 0 and 100"):
        make_balancer("random", panic_threshold=150)


def test_load_balancer_config_from_dict() -> None:
    config = LoadBalancerConfig.from_dict({"policy": "consistent_hash", "hash_header": "x-user",
                                           "table_size": 1009})
    balancer = config.build(service="carts", rng=random.Random(1))
    assert isinstance(balancer, MaglevBalancer) and balancer.service == "carts"
    assert config.hash_header == "x-user"
    assert isinstance(LoadBalancerConfig().build(), LeastRequestBalancer)
    with pytest.raises(ConfigError, match="slow_start: unknown option"):
        LoadBalancerConfig.from_dict({"policy": "random", "slow_start": "30s"})
