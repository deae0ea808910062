"""Load-balancing strategies: pure objects fed with endpoints, an injected clock and random.

Every strategy has the same three calls, so the proxyless client and the gateway wrap a
request the same way::

    ep = balancer.pick(endpoints, key=hash_key, exclude=tried, is_healthy=routable)
    balancer.on_start(ep)
    ...                                    # send the request to ep.address
    balancer.on_finish(ep, latency, ok)

One balancer serves one upstream service. ``pick`` first decides the *pool*, the same way
for every strategy (Envoy's semantics, written down once):

* **Health and panic.** ``is_healthy`` (default: all healthy) splits the endpoints. If fewer
  than ``panic_threshold`` percent (default 50) are healthy, the balancer *panics* and
  balances over all of them: spreading load over some failing instances beats crushing the
  few healthy ones. ``panic_threshold=0`` disables panic mode. Endpoints that must get no
  traffic at all (starting, draining, gone) are not passed in.
* **Exclusion.** ``exclude`` (endpoints or instance ids) removes instances a retry already
  tried. If that leaves nothing, the exclusion is ignored: retrying a tried instance beats
  failing a request that still has attempts left.
* **Slow start.** An endpoint that joins the healthy set after the balancer's first pick
  (newly registered, or back from ejection) ramps its weight over ``slow_start_window``:
  ``weight * max(min_weight_percent/100, (age / window) ** (1 / aggression))`` (Envoy's
  formula). The endpoints of the first pick are taken as warm. Strategies that ignore
  weights (plain round robin) and consistent hashing (where weights move keys) ignore it.

Time is the injected ``clock`` (monotonic seconds), randomness the injected ``rng``.
"""

from __future__ import annotations

import abc
import hashlib
import inspect
import math
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from shoal.errors import ConfigError, NoEndpoint
from shoal.mesh.endpoint import Endpoint, EndpointStats
from shoal.units import parse_duration

_NONE_EXCLUDED: set[str] = set()  # never mutated
Clock = Callable[[], float]
HealthPredicate = Callable[[Endpoint], bool]
HashKey = str | bytes | int


def _seconds(value: float | str, name: str, *, positive: bool = False) -> float:
    seconds = parse_duration(value, name=name)
    if seconds is None or (positive and seconds <= 0):
        raise ConfigError(f"{name}: must be a duration greater than zero, got {value!r}")
    return seconds


def _number(value: object, name: str, *, low: float = 0.0, high: float = math.inf,
            integer: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        bounds = f">= {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
        raise ConfigError(f"{name}: must be {kind} {bounds}, got {value!r}")
    return value


class Balancer(abc.ABC):
    """Common pool selection, slow start and per-endpoint stats; strategies add ``_choose``."""

    name: ClassVar[str]

    def __init__(self, *, service: str = "", clock: Clock = time.monotonic,
                 rng: random.Random | None = None, panic_threshold: float = 50.0,
                 slow_start_window: float | str = 0.0, slow_start_aggression: float = 1.0,
                 slow_start_min_weight_percent: float = 10.0) -> None:
        self.service = service
        self.panicking = False  # the last pick balanced over unhealthy endpoints too
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._panic_threshold = _number(panic_threshold, "panic_threshold", high=100.0)
        self._slow_start_window = _seconds(slow_start_window, "slow_start_window")
        self._aggression = _number(slow_start_aggression, "slow_start_aggression", low=1e-9)
        self._min_weight = _number(slow_start_min_weight_percent,
                                   "slow_start_min_weight_percent", high=100.0) / 100.0
        self._stats: dict[str, EndpointStats] = {}
        self._warm_since: dict[str, float] = {}
        self._members: frozenset[str] = frozenset()
        self._healthy: frozenset[str] | None = None
        self._tracked: tuple[Sequence[Endpoint], Sequence[Endpoint]] | None = None
        self._plain_select = type(self)._select is Balancer._select
        self._observes = type(self)._observe is not Balancer._observe  # latency-aware

    # -- the interface ---------------------------------------------------------------------

    def pick(self, endpoints: Sequence[Endpoint], *, key: HashKey | None = None,
             exclude: Collection[Endpoint | str] = (),
             is_healthy: HealthPredicate | None = None,
             healthy: Sequence[Endpoint] | None = None) -> Endpoint:
        """The endpoint for the next request; raises ``NoEndpoint`` if there is none.

        ``healthy``, when given, is the healthy subset of ``endpoints`` already computed
        (``is_healthy`` is then not called); a caller that keeps both lists while nothing
        changes lets the balancer skip its membership bookkeeping.
        """
        now = self._clock()
        pool = self._pool(endpoints, is_healthy, now, healthy)
        if not exclude:
            return self._choose(pool, key, now) if self._plain_select else \
                self._select(pool, _NONE_EXCLUDED, key, now)
        excluded = {e if isinstance(e, str) else e.instance_id for e in exclude}
        return self._select(pool, excluded, key, now)

    def on_start(self, endpoint: Endpoint) -> None:
        """A request to ``endpoint`` was sent (call once per ``pick`` that is used)."""
        stats = self._stats.get(endpoint.instance_id)
        if stats is None:
            stats = self.stats(endpoint)
        stats.active += 1

    def on_finish(self, endpoint: Endpoint, latency: float, ok: bool = True) -> None:
        """The request to ``endpoint`` ended after ``latency`` seconds, successfully or not."""
        stats = self._stats.get(endpoint.instance_id)
        if stats is None:
            stats = self.stats(endpoint)
        if stats.active > 0:
            stats.active -= 1
        stats.requests += 1
        if not ok:
            stats.failures += 1
        if self._observes:
            self._observe(stats, latency if latency > 0.0 else 0.0, ok)

    def stats(self, endpoint: Endpoint | str) -> EndpointStats:
        """The live numbers this balancer keeps on ``endpoint``."""
        key = endpoint if isinstance(endpoint, str) else endpoint.instance_id
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = EndpointStats()
        return stats

    def effective_weight(self, endpoint: Endpoint, now: float | None = None) -> float:
        """``endpoint.weight``, scaled down while the endpoint is in its slow-start window."""
        weight = float(endpoint.weight)
        since = self._warm_since.get(endpoint.instance_id)
        if since is None:
            return weight
        age = (self._clock() if now is None else now) - since
        if age >= self._slow_start_window:
            del self._warm_since[endpoint.instance_id]
            return weight
        ramp = (max(age, 0.001) / self._slow_start_window) ** (1.0 / self._aggression)
        return weight * max(self._min_weight, ramp)

    # -- for strategies --------------------------------------------------------------------

    def _select(self, pool: Sequence[Endpoint], excluded: set[str], key: HashKey | None,
                now: float) -> Endpoint:
        if excluded:
            hosts = [ep for ep in pool if ep.instance_id not in excluded]
            return self._choose(hosts or pool, key, now)
        return self._choose(pool, key, now)

    @abc.abstractmethod
    def _choose(self, hosts: Sequence[Endpoint], key: HashKey | None, now: float) -> Endpoint:
        """Pick one of ``hosts`` (never empty)."""

    def _observe(self, stats: EndpointStats, latency: float, ok: bool) -> None:  # noqa: B027
        """Hook: a request finished (``stats.active`` already decremented)."""

    def _forget(self, members: frozenset[str]) -> None:  # noqa: B027
        """Hook: drop per-endpoint state of instances no longer in ``members``."""

    # -- pool selection --------------------------------------------------------------------

    def _pool(self, endpoints: Sequence[Endpoint], is_healthy: HealthPredicate | None,
              now: float, healthy: Sequence[Endpoint] | None = None) -> Sequence[Endpoint]:
        self.panicking = False
        if not endpoints:
            raise NoEndpoint(self.service or "<unknown>", "no instances are registered")
        if healthy is None:
            healthy = endpoints if is_healthy is None else [
                ep for ep in endpoints if is_healthy(ep)]
        tracked = self._tracked
        if tracked is None or tracked[0] is not endpoints or tracked[1] is not healthy:
            self._track_members(endpoints, healthy, now)
            self._tracked = (endpoints, healthy)  # the same two lists again: nothing changed
        if len(healthy) * 100.0 < self._panic_threshold * len(endpoints):
            self.panicking = True
            return endpoints
        if not healthy:
            raise NoEndpoint(self.service or endpoints[0].service,
                             f"all {len(endpoints)} instances are unhealthy and panic mode is "
                             "off (panic_threshold=0)")
        return healthy

    def _track_members(self, endpoints: Sequence[Endpoint], healthy: Sequence[Endpoint],
                       now: float) -> None:
        members = frozenset(ep.instance_id for ep in endpoints)
        if members != self._members:
            self._members = members
            self._stats = {k: s for k, s in self._stats.items() if k in members or s.active}
            self._forget(members)
        if self._slow_start_window <= 0:
            return
        up = members if healthy is endpoints else frozenset(ep.instance_id for ep in healthy)
        if self._healthy is not None and up != self._healthy:
            for joined in up - self._healthy:
                self._warm_since[joined] = now
            for left in self._healthy - up:
                self._warm_since.pop(left, None)
        self._healthy = up


class _IdentityCache:
    """One value computed from one list, valid while the same list object comes back."""

    __slots__ = ("key", "value")

    def __init__(self, key: Sequence[Endpoint], value: Any) -> None:
        self.key = key
        self.value = value

    def get(self, key: Sequence[Endpoint]) -> Any:
        return self.value if key is self.key else None


class RoundRobinBalancer(Balancer):
    """Each endpoint in turn (ordered by instance id), ignoring weights; random first turn."""

    name = "round_robin"

    def __init__(self, **base: Any) -> None:
        super().__init__(**base)
        self._next: int | None = None
        self._sorted: tuple[Sequence[Endpoint], Sequence[Endpoint]] = ((), ())

    def _choose(self, hosts: Sequence[Endpoint], key: HashKey | None, now: float) -> Endpoint:
        cached = self._sorted
        if cached[0] is hosts:
            ordered = cached[1]
        else:
            ordered = sorted(hosts, key=_instance_id) if len(hosts) > 1 else hosts
            self._sorted = (hosts, ordered)
        if self._next is None:
            self._next = self._rng.randrange(len(ordered))
        endpoint = ordered[self._next % len(ordered)]
        self._next += 1
        return endpoint


class SmoothWeightedSchedule:
    """nginx's smooth weighted round robin: weights 5,1,1 give ``a a b a c a a``."""

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def next(self, hosts: Sequence[Endpoint], weights: Sequence[float]) -> Endpoint:
        """The next endpoint; ties go to the earlier one in ``hosts``."""
        current = self._current
        total = 0.0
        best = hosts[0]
        best_value = -math.inf
        for endpoint, weight in zip(hosts, weights, strict=True):
            value = current.get(endpoint.instance_id, 0.0) + weight
            current[endpoint.instance_id] = value
            total += weight
            if value > best_value:
                best, best_value = endpoint, value
        current[best.instance_id] = best_value - total
        return best

    def forget(self, members: frozenset[str]) -> None:
        """Drop the state of endpoints not in ``members``."""
        self._current = {k: v for k, v in self._current.items() if k in members}


class WeightedRoundRobinBalancer(Balancer):
    """nginx's smooth weighted round robin over effective (slow-start scaled) weights."""

    name = "weighted_round_robin"

    def __init__(self, **base: Any) -> None:
        super().__init__(**base)
        self._schedule = SmoothWeightedSchedule()

    def _choose(self, hosts: Sequence[Endpoint], key: HashKey | None, now: float) -> Endpoint:
        return self._schedule.next(hosts, [self.effective_weight(ep, now) for ep in hosts])

    def _forget(self, members: frozenset[str]) -> None:
        self._schedule.forget(members)


class RandomBalancer(Balancer):
    """A random endpoint, with probability proportional to its effective weight."""

    name = "random"

    def _choose(self, hosts: Sequence[Endpoint], key: HashKey | None, now: float) -> Endpoint:
        if len(hosts) == 1:
            return hosts[0]
        weights = [self.effective_weight(ep, now) for ep in hosts]
        return self._rng.choices(hosts, weights)[0]


class LeastRequestBalancer(Balancer):
    """Envoy's least request: power of two choices, or load-scaled weights if weights differ.

    Equal weights: sample ``choice_count`` distinct endpoints, take the one with fewest active
    requests. Unequal weights (or slow start in progress): smooth weighted round robin over
    ``weight / (active + 1) ** active_request_bias``.
    """

    name = "least_request"

    def __init__(self, *, choice_count: int = 2, active_request_bias: float = 1.0,
                 **base: Any) -> None:
        super().__init__(**base)
        self._choice_count = _number(choice_count, "choice_count", low=1, integer=True)
        self._bias = _number(active_request_bias, "active_request_bias")
        self._schedule = SmoothWeightedSchedule()
        self._equal_weights = _IdentityCache((), None)  # hosts list -> all weights equal?

    def _choose(self, hosts: Sequence[Endpoint], key: HashKey | None, now: float) -> Endpoint:
        n = len(hosts)
        if n == 1:
            return hosts[0]
        if not self._warm_since:  # no slow start in progress: weights are the endpoints'
            equal = self._equal_weights.get(hosts)
            if equal is None:
                self._equal_weights = _IdentityCache(hosts, len({ep.weight for ep in hosts}) == 1)
                equal = self._equal_weights.value
            weights = None
        else:
            weights = [self.effective_weight(ep, now) for ep in hosts]
            equal = min(weights) == max(weights)
        if equal:
            stats = self._stats
            if self._choice_count == 2:  # the default: two distinct random endpoints
                rand = self._rng.random
                i = int(rand() * n)
                j = int(rand() * (n - 1))
                if j >= i:
                    j += 1
                a, b = hosts[i], hosts[j]
                sa, sb = stats.get(a.instance_id), stats.get(b.instance_id)
                return b if (sb.active if sb else 0) < (sa.active if sa else 0) else a
            sample = self._rng.sample(hosts, min(self._choice_count, n))
            return min(sample, key=lambda ep: self.stats(ep).active)
        if weights is None:
            weights = [self.effective_weight(ep, now) for ep in hosts]
        loads = [w / (self.stats(ep).active + 1) ** self._bias
                 for ep, w in zip(hosts, weights, strict=True)]
        return self._schedule.next(hosts, loads)

    def _forget(self, members: frozenset[str]) -> None:
        self._schedule.forget(members)


class PeakEwmaBalancer(Balancer):
    """Finagle's / Linkerd's peak EWMA: two random choices, lower latency x load wins.

    cost = rtt_estimate * (active + 1) / effective_weight. The estimate jumps up to any
    slower observation at once (the *peak*) and otherwise decays towards observations, and
    towards zero while idle, with time constant ``decay``, so a slow endpoint is probed again
    after a while. An unseen endpoint starts at ``default_rtt``. A failed request counts as
    ``max(latency, penalty)`` where penalty is ``failure_penalty_factor`` x the current
    estimate, clamped to ``[failure_penalty, failure_penalty * failure_penalty_factor]``:
    an instance that fails fast must not look fast. Set ``failure_penalty`` near the per-try
    timeout.
    """

    name = "peak_ewma"

    def __init__(self, *, decay: float | str = "10s", default_rtt: float | str = "30ms",
                 failure_penalty: float | str = "250ms", failure_penalty_factor: float = 5.0,
                 choice_count: int = 2, **base: Any) -> None:
        super().__init__(**base)
        self._tau = _seconds(decay, "decay", positive=True)
        self._default_rtt = _seconds(default_rtt, "default_rtt")
        self._penalty = _seconds(failure_penalty, "failure_penalty")
        self._penalty_factor = _number(failure_penalty_factor, "failure_penalty_factor", low=1)
        self._choice_count = _number(choice_count, "choice_count", low=1, integer=True)

    def rtt_estimate(self, endpoint: Endpoint, now: float | None = None) -> float:
        """The current (time-decayed) peak-EWMA round trip of ``endpoint``, in seconds."""
        return self._update(self.stats(endpoint), 0.0, self._clock() if now is None else now)

    def cost(self, endpoint: Endpoint, now: float | None = None) -> float:
        """The load score P2C compares: lower is better."""
        now = self._clock() if now is None else now
        stats = self.stats(endpoint)
        rtt = self._update(stats, 0.0, now)
        return rtt * (stats.active + 1) / self.effective_weight(endpoint, now)

    def _choose(self, hosts: Sequence[Endpoint], key: HashKey | None, now: float) -> Endpoint:
        if len(hosts) == 1:
            return hosts[0]
        sample = self._rng.sample(hosts, min(self._choice_count, len(hosts)))
        return min(sample, key=lambda ep: self.cost(ep, now))

    def _observe(self, stats: EndpointStats, latency: float, ok: bool) -> None:
        now = self._clock()
        if not ok:
            current = self._update(stats, 0.0, now)
            penalty = min(max(self._penalty, current * self._penalty_factor),
                          self._penalty * self._penalty_factor)
            latency = max(latency, penalty)
        self._update(stats, latency, now)

    def _update(self, stats: EndpointStats, rtt: float, now: float) -> float:
        estimate = stats.rtt_estimate
        if estimate is None:
            estimate, stats.rtt_stamp = self._default_rtt, now
        if rtt > estimate:
            estimate = rtt
        else:
            w = math.exp(-max(now - stats.rtt_stamp, 0.0) / self._tau)
            estimate = estimate * w + rtt * (1.0 - w)
        stats.rtt_estimate, stats.rtt_stamp = estimate, max(now, stats.rtt_stamp)
        return estimate


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def hash_key(key: HashKey) -> int:
    """A stable 64-bit hash of a request key (the same in every process, unlike ``hash``)."""
    if isinstance(key, int):
        key = str(key)
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class MaglevTable:
    """Google's Maglev lookup table over some endpoints, with Envoy's weighted population."""

    def __init__(self, endpoints: Sequence[Endpoint], size: int) -> None:
        self.endpoints = tuple(sorted(endpoints, key=_instance_id))
        self.size = size
        self.slots = self._populate([ep.instance_id for ep in self.endpoints],
                                    [ep.weight for ep in self.endpoints], size)

    def lookup(self, key_hash: int, exclude: Collection[str] = ()) -> Endpoint:
        """The endpoint owning ``key_hash``; the next slot's owner while it is in ``exclude``."""
        start = key_hash % self.size
        endpoint = self.endpoints[self.slots[start]]
        if not exclude or endpoint.instance_id not in exclude:
            return endpoint
        if any(ep.instance_id not in exclude for ep in self.endpoints):
            for step in range(1, self.size):
                other = self.endpoints[self.slots[(start + step) % self.size]]
                if other.instance_id not in exclude:
                    return other
        return endpoint

    @staticmethod
    def _populate(ids: Sequence[str], weights: Sequence[int], size: int) -> list[int]:
        offsets, skips = [], []
        for instance_id in ids:
            digest = hashlib.blake2b(instance_id.encode(), digest_size=16).digest()
            offsets.append(int.from_bytes(digest[:8], "big") % size)
            skips.append(int.from_bytes(digest[8:], "big") % (size - 1) + 1)
        positions = list(offsets)  # offset + skip * next, kept modulo size
        targets = [0] * len(ids)
        top = max(weights)
        table = [-1] * size
        filled, iteration = 0, 1
        while filled < size:
            for i, weight in enumerate(weights):
                # Envoy: a host of weight top/k places one entry every k iterations
                if iteration * weight < targets[i]:
                    continue
                targets[i] += top
                c, skip = positions[i], skips[i]
                while table[c] >= 0:
                    c += skip
                    if c >= size:
                        c -= size
                table[c] = i
                c += skip
                positions[i] = c - size if c >= size else c
                filled += 1
                if filled == size:
                    break
            iteration += 1
        return table


class MaglevBalancer(Balancer):
    """Consistent hashing with a Maglev table: the same key goes to the same endpoint.

    Removing one of n endpoints moves about 1/n of the keys (those it owned) and very few
    others. The table is built from the healthy (or, in panic, the whole) pool, so a retry's
    exclusions do not rebuild it: an excluded owner hands the key to the next slot's owner.
    Without a key the pick is random (weighted). Slow start does not apply.
    """

    name = "consistent_hash"

    def __init__(self, *, table_size: int = 65537, **base: Any) -> None:
        super().__init__(**base)
        self._table_size = _number(table_size, "table_size", low=3, integer=True)
        if not _is_prime(table_size):
            raise ConfigError(f"table_size: must be a prime number (e.g. 65537), got {table_size}")
        self._table: MaglevTable | None = None
        self._table_key: tuple[tuple[str, int, str], ...] = ()

    def table(self, pool: Sequence[Endpoint]) -> MaglevTable:
        """The lookup table for ``pool``, rebuilt only when its members or weights change."""
        signature = tuple(sorted((ep.instance_id, ep.weight, ep.address) for ep in pool))
        if self._table is None or signature != self._table_key:
            self._table = MaglevTable(pool, self._table_size)
            self._table_key = signature
        return self._table

    def _select(self, pool: Sequence[Endpoint], excluded: set[str], key: HashKey | None,
                now: float) -> Endpoint:
        if key is None:
            return super()._select(pool, excluded, key, now)
        return self.table(pool).lookup(hash_key(key), excluded)

    def _choose(self, hosts: Sequence[Endpoint], key: HashKey | None, now: float) -> Endpoint:
        if len(hosts) == 1:
            return hosts[0]
        return self._rng.choices(hosts, [float(ep.weight) for ep in hosts])[0]

    def effective_weight(self, endpoint: Endpoint, now: float | None = None) -> float:
        """The configured weight: slow start would move keys, so it does not apply."""
        return float(endpoint.weight)


def _instance_id(endpoint: Endpoint) -> str:
    return endpoint.instance_id


BALANCERS: dict[str, type[Balancer]] = {
    cls.name: cls
    for cls in (RoundRobinBalancer, WeightedRoundRobinBalancer, RandomBalancer,
                LeastRequestBalancer, PeakEwmaBalancer, MaglevBalancer)
}

_RUNTIME_ARGUMENTS = frozenset({"service", "clock", "rng"})


def balancer_options(config_name: str) -> frozenset[str]:
    """The option names the strategy ``config_name`` accepts from configuration."""
    cls = _balancer_class(config_name)
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        for param in inspect.signature(klass.__init__).parameters.values():
            if param.kind is inspect.Parameter.KEYWORD_ONLY:
                names.add(param.name)
    return frozenset(names - _RUNTIME_ARGUMENTS)


def make_balancer(config_name: str, **options: Any) -> Balancer:
    """A balancer from its config name (``"least_request"``, ...) and options.

    ``service``, ``clock`` and ``rng`` may be passed too; any other unknown option is a
    ``ConfigError`` naming it.
    """
    allowed = balancer_options(config_name)
    for option in options:
        if option not in allowed and option not in _RUNTIME_ARGUMENTS:
            raise ConfigError(
                f"{option}: unknown option for load-balancing policy {config_name!r}; "
                f"expected one of {', '.join(sorted(allowed))}")
    return _balancer_class(config_name)(**options)


def _balancer_class(config_name: str) -> type[Balancer]:
    cls = BALANCERS.get(config_name)
    if cls is None:
        raise ConfigError(f"policy: unknown load-balancing policy {config_name!r}; expected "
                          f"one of {', '.join(BALANCERS)}")
    return cls


@dataclass(frozen=True, slots=True)
class LoadBalancerConfig:
    """``load_balancer:`` config: a policy name, its options and the hash key source.

    Least request is the default, as in Istio: it needs no tuning and reacts to load, where
    round robin does not. In YAML the options sit next to ``policy``:
    ``{policy: peak_ewma, decay: 10s}``.
    """

    policy: str = "least_request"
    hash_header: str | None = None  # consistent_hash: the request header holding the key
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.hash_header is not None and (
                not isinstance(self.hash_header, str) or not self.hash_header):
            raise ConfigError(f"hash_header: must be a header name, got {self.hash_header!r}")
        make_balancer(self.policy, **self.options)  # validates name and options

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoadBalancerConfig:
        """From ``{policy: ..., hash_header: ..., <option>: ...}``."""
        options = dict(data)
        policy = options.pop("policy", cls.policy)
        hash_header = options.pop("hash_header", None)
        if not isinstance(policy, str):
            raise ConfigError(f"policy: must be a policy name, got {policy!r}")
        return cls(policy=policy, hash_header=hash_header, options=options)

    def build(self, *, service: str = "", clock: Clock = time.monotonic,
              rng: random.Random | None = None) -> Balancer:
        """A fresh balancer for one upstream service."""
        return make_balancer(self.policy, service=service, clock=clock, rng=rng, **self.options)
