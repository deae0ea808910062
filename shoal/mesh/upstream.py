"""`Upstream`: one service as a caller sees it, with the whole resilience stack in front.

The proxyless client and the gateway both call services through an ``Upstream``, so every
call takes the same layers, built from one ``TrafficPolicy``:

    timeout -> retry (+ budget, backoff) -> circuit breaker -> balancer (+ outlier
    detection) -> keep-alive pool of the chosen endpoint

The policy objects are the pure ones of ``shoal.mesh.resilience`` and
``shoal.mesh.balancer``; this module only wires them to the clock, the pools and the
endpoint source. Each try goes to another instance when there is one. When the stack
gives up it raises a ``MeshError`` naming the layer and why (no endpoint, circuit open,
retry budget spent, timeout after N tries), or relays the upstream's own error response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shoal.errors import (
    CircuitOpen,
    ConnectError,
    MeshError,
    RetryBudgetExhausted,
    TransportError,
    UpstreamTimeout,
)
from shoal.mesh.endpoint import Endpoint
from shoal.mesh.http1 import Body, ConnectionPool, HeaderList, Response
from shoal.mesh.resilience import (
    CircuitBreaker,
    Failure,
    Outcome,
    OutlierDetector,
    RetryBudget,
    RetryPolicy,
    TrafficPolicy,
    classify,
)
from shoal.observability import metrics as _metrics

EndpointSource = Callable[[], Sequence[Endpoint]]
HealthCheck = Callable[[Endpoint], bool]


@dataclass(slots=True)
class UpstreamStats:
    """Counters of what the stack did, for metrics and tests."""

    requests: int = 0
    tries: int = 0
    retries: int = 0
    failures: int = 0
    ejections: int = 0


class Upstream:
    """Calls to one service: pick an instance, send, retry elsewhere, give up clearly."""

    def __init__(
        self,
        service: str,
        endpoints: EndpointSource,
        policy: TrafficPolicy | None = None,
        *,
        is_healthy: HealthCheck | None = None,
        clock: Callable[[], float] = time.monotonic,
        pool_options: dict[str, float | int] | None = None,
    ) -> None:
        self.service = service
        self.policy = policy or TrafficPolicy()
        self._endpoints = endpoints
        self._is_healthy = is_healthy
        self._clock = clock
        self.balancer = self.policy.load_balancer.build(service=service, clock=clock)
        self.retry = RetryPolicy(self.policy.retries, self.policy.timeouts)
        self.budget = RetryBudget.from_config(self.policy.retries)
        self.breaker = CircuitBreaker(self.policy.circuit_breaker, clock=clock, service=service)
        self.outliers = OutlierDetector(self.policy.outlier_detection)
        self.stats = UpstreamStats()
        self._pools: dict[str, ConnectionPool] = {}
        self._pool_options = {
            "connect_timeout": self.policy.timeouts.connect, **(pool_options or {})
        }
        self._slot_waiters: list[asyncio.Future[None]] = []
        self._hosts_seen: tuple[str, ...] = ()
        self._next_evaluation = clock() + self.policy.outlier_detection.interval  # type: ignore[operator]
        m = _metrics.active()  # metrics read ``stats`` and the breaker when scraped
        self._series = m.upstream(self) if m is not None else None

    # -- the stack ---------------------------------------------------------------------
    async def send(
        self,
        method: str,
        target: str,
        headers: HeaderList = (),
        body: Body = None,
        *,
        hash_key: str | bytes | None = None,
    ) -> Response:
        """Send one request through every layer; the response streams.

        ``body`` is bytes (replayable, so retriable) or an async iterable (streamed, so
        never retried once a try has started sending it).
        """
        start = self._clock()
        self.stats.requests += 1
        self.budget.record_request(start)
        body_size = len(body) if isinstance(body, bytes | bytearray | memoryview) else (
            0 if body is None else None
        )
        tried: list[Endpoint] = []
        attempt = 0
        while True:
            attempt += 1
            timeout = self.retry.try_timeout(self._clock() - start)
            if timeout is not None and timeout <= 0:
                raise UpstreamTimeout(
                    self.service, self.policy.timeouts.request or 0.0, attempts=attempt - 1
                )
            endpoint = self._pick(hash_key, tried)
            await self._take_slot()
            outcome, response, error = await self._try(
                endpoint, method, target, headers, body, timeout
            )
            if response is not None and not self.retry.is_retriable(outcome):
                return response
            refusal = self.retry.refusal(attempt, method, outcome, body_size)
            now = self._clock()
            if refusal is None and not self.budget.try_retry(now):
                refusal = self.budget.explain(now)
                if response is None:
                    raise RetryBudgetExhausted(self.service, refusal) from error
            if refusal is not None:
                if response is not None:
                    return response  # the upstream's own error answer, relayed as it is
                self.stats.failures += 1
                raise self._give_up(outcome, error, attempt, timeout) from error
            if response is not None:
                response.close()
            self.stats.retries += 1
            tried.append(endpoint)
            await asyncio.sleep(self.retry.backoff(attempt))

    def _pick(self, hash_key: str | bytes | None, tried: Sequence[Endpoint]) -> Endpoint:
        endpoints = self._endpoints()
        ids = tuple(e.instance_id for e in endpoints)
        if ids != self._hosts_seen:
            self._hosts_seen = ids
            self.outliers.update_hosts(endpoints)
            for gone in set(self._pools) - {e.address for e in endpoints}:
                pool = self._pools.pop(gone)
                asyncio.get_running_loop().create_task(pool.aclose())
        now = self._clock()
        outliers, healthy = self.outliers, self._is_healthy
        if healthy is None:
            def usable(e: Endpoint) -> bool:
                return not outliers.is_ejected(e, now)
        else:
            def usable(e: Endpoint) -> bool:
                return healthy(e) and not outliers.is_ejected(e, now)
        return self.balancer.pick(endpoints, key=hash_key, exclude=tried, is_healthy=usable)

    async def _take_slot(self) -> None:
        """The breaker's concurrency limit, with a bounded line of waiters."""
        breaker = self.breaker
        while not breaker.allow():
            if breaker.active < breaker.config.max_requests or not breaker.enqueue():
                raise CircuitOpen(
                    self.service, breaker.rejection or "refused", retry_after=breaker.retry_after()
                )
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            finally:
                breaker.dequeue()

    def _release_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _try(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: HeaderList,
        body: Body,
        timeout: float | None,
    ) -> tuple[Outcome, Response | None, BaseException | None]:
        """One try on one endpoint; feeds balancer, breaker and outlier detection."""
        self.stats.tries += 1
        if self._series is not None:
            self._series.picked(endpoint.instance_id)
        pool = self._pools.get(endpoint.address)
        if pool is None:
            pool = self._pools[endpoint.address] = ConnectionPool(
                endpoint.address, **self._pool_options  # type: ignore[arg-type]
            )
        balancer = self.balancer
        balancer.on_start(endpoint)
        began = self._clock()
        response: Response | None = None
        error: BaseException | None = None
        try:
            if timeout is None:
                response = await pool.request(method, target, headers, body)
            else:
                async with asyncio.timeout(timeout):
                    response = await pool.request(method, target, headers, body)
            outcome: Outcome = response.status
        except (TransportError, TimeoutError) as exc:
            error = exc
            outcome = classify(exc) or Failure.RESET
        except BaseException:
            balancer.on_finish(endpoint, self._clock() - began, ok=False)
            self.breaker.on_cancel()
            self._release_slot()
            raise
        now = self._clock()
        failed = not isinstance(outcome, int) or outcome >= 500
        balancer.on_finish(endpoint, now - began, ok=not failed)
        if failed:
            self.breaker.on_failure()
        else:
            self.breaker.on_success()
        self._release_slot()
        if self.outliers.on_result(endpoint, outcome, now) is not None:
            self.stats.ejections += 1
        if now >= self._next_evaluation:  # success-rate ejection, once per interval
            self._next_evaluation = now + self.policy.outlier_detection.interval  # type: ignore[operator]
            self.stats.ejections += len(self.outliers.evaluate(now))
            self.outliers.expire(now)
        return outcome, response, error

    def _give_up(
        self, outcome: Outcome, error: BaseException | None, attempts: int, timeout: float | None
    ) -> MeshError | TransportError:
        if outcome is Failure.TIMEOUT:
            scope = "per-try" if self.policy.retries.per_try_timeout else "request"
            return UpstreamTimeout(self.service, timeout or 0.0, scope=scope, attempts=attempts)
        if isinstance(error, TransportError):
            return error
        return ConnectError(self.service, f"call to {self.service!r} failed: {error!r}")

    async def aclose(self) -> None:
        """Close every pooled connection."""
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            await pool.aclose()
