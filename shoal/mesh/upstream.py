"""`Upstream`: one service as a caller sees it, with the whole resilience stack in front.

The proxyless client and the gateway both call services through an ``Upstream``, so every
call takes the same layers, built from one ``TrafficPolicy``:

    timeout -> retry (+ budget, backoff) -> circuit breaker -> balancer (+ outlier
    detection) -> keep-alive pool of the chosen endpoint

The policy objects are the pure ones of ``shoal.mesh.resilience`` and
``shoal.mesh.balancer``; this module only wires them to the clock, the pools and the
endpoint source. Each try goes to another instance when there is one.

The circuit breaker's consecutive-failure count is kept per *request*, not per try: the
tries that fail when one instance dies (every request in flight on it at once) are retried
elsewhere and succeed, and must not open the service's circuit; a dying instance is the
outlier detector's business. A try still takes and frees a breaker slot (concurrency
limits), and a failed half-open probe reopens the circuit at once.

The hot path does the least it can per call: the endpoint source must return a *new list
object* whenever membership or health changes (``EndpointCache.endpoints`` and the
gateway's subsets do), so the healthy subset is computed once per list and the balancer
skips its membership bookkeeping while the list stays the same; the predicate is asked per
call only while outlier detection has an instance ejected. Per-try timeouts share one
timer (``shoal.mesh.deadlines``) instead of arming a loop timer per try. ``start`` runs the
first try with no task when an idle pooled connection is there (``shoal.mesh.fast_try``):
the same steps, split into ``_try_begin``, ``_try_end`` and ``_verdict``, which ``send``'s
loop uses too; a retry after it goes on in ``send``'s loop, in a task. When the stack
gives up it raises a ``MeshError`` naming the layer and why (no endpoint, circuit open,
retry budget spent, timeout after N tries), or relays the upstream's own error response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from shoal.errors import (
    CircuitOpen,
    ConnectError,
    MeshError,
    RetryBudgetExhausted,
    TransportError,
    UpstreamTimeout,
)
from shoal.mesh.deadlines import Deadlines
from shoal.mesh.endpoint import Endpoint
from shoal.mesh.fast_try import FastTry
from shoal.mesh.http1 import Body, ConnectionPool, HeaderList, Response
from shoal.mesh.resilience import (
    CircuitBreaker,
    Ejection,
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
        on_ejection: Callable[[str, Ejection, float], None] | None = None,
    ) -> None:
        self.service = service
        self._on_ejection = on_ejection  # (service, ejection, seconds left): share it
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
        self._list_seen: Sequence[Endpoint] | None = None  # the source's last list object
        self._healthy: Sequence[Endpoint] | None = None  # its healthy subset (None: not yet)
        self._deadlines: Deadlines | None = None  # per-try timeouts (made on first use)
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
        return await self._send(method, target, headers, body, hash_key, self._begin(), 0, [],
                                None)

    def start(
        self,
        method: str,
        target: str,
        headers: HeaderList,
        body: bytes | None,
        deliver: Callable[[Response | BaseException | Awaitable[Response]], None],
        *,
        hash_key: str | bytes | None = None,
    ) -> FastTry | Awaitable[Response]:
        """``send`` without a task for the common case: when the first try can go out at
        once on an idle pooled connection, write it and return its ``FastTry`` (its
        ``deliver(result)`` is called later with the response, the ``MeshError`` or
        ``TransportError`` the stack gave up with, or an awaitable that goes on retrying).
        Otherwise return the awaitable that does what ``send`` does, from where this
        stopped (the endpoint already picked is kept)."""
        begun = self._begin()
        timeout = self.retry.try_timeout(0.0)
        try:
            endpoint = self._pick(hash_key, ())
        except MeshError:
            return self._send(method, target, headers, body, hash_key, begun, 0, [], None)
        if timeout is not None and timeout <= 0:
            return self._send(method, target, headers, body, hash_key, begun, 0, [], endpoint)
        pool = self._pool(endpoint)
        conn = pool.take_idle()
        if conn is None:
            return self._send(method, target, headers, body, hash_key, begun, 0, [], endpoint)
        if not self.breaker.allow():
            pool.give_back(conn)
            return self._send(method, target, headers, body, hash_key, begun, 0, [], endpoint)
        attempt = FastTry(self, endpoint, method, target, headers, body, hash_key, begun,
                          timeout, deliver)
        began = self._try_begin(endpoint)
        try:
            conn.send_nowait(method.encode("latin-1"), target.encode("latin-1"), headers, body,
                             attempt)
        except TransportError:  # dead after all (take_idle polled it): a new connection
            self._try_cancelled(endpoint, began)
            self.stats.tries -= 1
            return self._send(method, target, headers, body, hash_key, begun, 0, [], endpoint)
        except BaseException:  # a bad header: raised, as ``send`` would
            self._try_cancelled(endpoint, began)
            raise
        attempt.sent(conn, began)
        return attempt

    def _begin(self) -> float:
        """Count a new request; its start time."""
        start = self._clock()
        self.stats.requests += 1
        self.budget.record_request(start)
        return start

    async def _send(self, method: str, target: str, headers: HeaderList, body: Body,
                    hash_key: str | bytes | None, start: float, attempt: int,
                    tried: list[Endpoint], picked: Endpoint | None) -> Response:
        """The retry loop, from try ``attempt + 1`` (``picked``: its endpoint, if chosen)."""
        body_size = len(body) if isinstance(body, bytes | bytearray | memoryview) else (
            0 if body is None else None
        )
        while True:
            attempt += 1
            timeout = self.retry.try_timeout(self._clock() - start)
            if timeout is not None and timeout <= 0:
                self.breaker.count_failure()
                raise UpstreamTimeout(
                    self.service, self.policy.timeouts.request or 0.0, attempts=attempt - 1
                )
            if picked is not None:
                endpoint, picked = picked, None
            else:
                endpoint = self._pick(hash_key, tried)
            if not self.breaker.allow():  # a slot at once is the usual case: no await
                await self._wait_for_slot()
            outcome, response, error = await self._try(
                endpoint, method, target, headers, body, timeout
            )
            final = self._verdict(attempt, method, outcome, response, error, body_size, timeout)
            if final is not None:
                return final
            tried.append(endpoint)
            await asyncio.sleep(self.retry.backoff(attempt))

    async def _resume(self, method: str, target: str, headers: HeaderList, body: Body,
                      hash_key: str | bytes | None, start: float, attempt: int,
                      tried: list[Endpoint]) -> Response:
        """Retry after a ``FastTry`` that failed (``_send`` after the backoff)."""
        await asyncio.sleep(self.retry.backoff(attempt))
        return await self._send(method, target, headers, body, hash_key, start, attempt, tried,
                                None)

    def _verdict(self, attempt: int, method: str, outcome: Outcome, response: Response | None,
                 error: BaseException | None, body_size: int | None,
                 timeout: float | None) -> Response | None:
        """After try ``attempt``: the response to return, None to retry, or raise."""
        if response is not None and not self.retry.is_retriable(outcome):
            if outcome >= 500:  # type: ignore[operator]
                self.breaker.count_failure()
            return response
        refusal = self.retry.refusal(attempt, method, outcome, body_size)
        now = self._clock()
        if refusal is None and not self.budget.try_retry(now):
            refusal = self.budget.explain(now)
            if response is None:
                self.breaker.count_failure()
                raise RetryBudgetExhausted(self.service, refusal) from error
        if refusal is not None:
            if response is None or outcome >= 500:  # type: ignore[operator]
                self.breaker.count_failure()  # the request failed, after every try
            if response is not None:
                return response  # the upstream's own error answer, relayed as it is
            self.stats.failures += 1
            raise self._give_up(outcome, error, attempt, timeout) from error
        if response is not None:
            response.close()
        self.stats.retries += 1
        return None

    def _pick(self, hash_key: str | bytes | None, tried: Sequence[Endpoint]) -> Endpoint:
        endpoints = self._endpoints()
        if endpoints is not self._list_seen:
            self._endpoints_changed(endpoints)
        now = self._clock()
        outliers, healthy = self.outliers, self._is_healthy
        if outliers.none_ejected(now):  # the usual case: the cached healthy list will do
            routable = self._healthy
            if routable is None:
                routable = self._healthy = endpoints if healthy is None else [
                    e for e in endpoints if healthy(e)]
            return self.balancer.pick(endpoints, key=hash_key, exclude=tried, healthy=routable)
        if healthy is None:
            def usable(e: Endpoint) -> bool:
                return not outliers.is_ejected(e, now)
        else:
            def usable(e: Endpoint) -> bool:
                return healthy(e) and not outliers.is_ejected(e, now)
        return self.balancer.pick(endpoints, key=hash_key, exclude=tried, is_healthy=usable)

    def _endpoints_changed(self, endpoints: Sequence[Endpoint]) -> None:
        """A new endpoint list: forget the cached healthy list, follow membership."""
        self._list_seen = endpoints
        self._healthy = None
        ids = tuple(e.instance_id for e in endpoints)
        if ids != self._hosts_seen:
            self._hosts_seen = ids
            self.outliers.update_hosts(endpoints)
            for gone in set(self._pools) - {e.address for e in endpoints}:
                pool = self._pools.pop(gone)
                asyncio.get_running_loop().create_task(pool.aclose())

    async def _wait_for_slot(self) -> None:
        """The breaker refused a slot: refuse the call, or wait in the bounded line of
        waiters (only when ``max_requests`` is what refused) until it allows one."""
        breaker = self.breaker
        while True:
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
            if breaker.allow():
                return

    def _release_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    def _pool(self, endpoint: Endpoint) -> ConnectionPool:
        pool = self._pools.get(endpoint.address)
        if pool is None:
            pool = self._pools[endpoint.address] = ConnectionPool(
                endpoint.address, **self._pool_options  # type: ignore[arg-type]
            )
        return pool

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
        pool = self._pool(endpoint)
        began = self._try_begin(endpoint)
        response: Response | None = None
        error: BaseException | None = None
        try:
            if timeout is None:
                response = await pool.request(method, target, headers, body)
            else:
                # Not ``asyncio.timeout``: a loop timer armed and disarmed per try costs
                # more than the rest of the stack (see ``shoal.mesh.deadlines``).
                deadlines = self.deadlines()
                expiry = deadlines.start(
                    asyncio.current_task(deadlines.loop), timeout)  # type: ignore[arg-type]
                try:
                    response = await pool.request(method, target, headers, body)
                except asyncio.CancelledError:
                    if expiry.expired():
                        raise TimeoutError from None  # ours, and nobody else cancelled
                    raise
                finally:
                    deadlines.finish(expiry)
            outcome: Outcome = response.status
        except (TransportError, TimeoutError) as exc:
            error = exc
            outcome = classify(exc) or Failure.RESET
        except BaseException:
            self._try_cancelled(endpoint, began)
            raise
        self._try_end(endpoint, began, outcome)
        return outcome, response, error

    def deadlines(self) -> Deadlines:
        """The per-try timeouts' one timer (made on first use)."""
        deadlines = self._deadlines
        if deadlines is None:
            deadlines = self._deadlines = Deadlines(asyncio.get_running_loop())
        return deadlines

    def _try_begin(self, endpoint: Endpoint) -> float:
        """A try on ``endpoint`` starts: count it; its start time."""
        self.stats.tries += 1
        if self._series is not None:
            self._series.picked(endpoint.instance_id)
        self.balancer.on_start(endpoint)
        return self._clock()

    def _try_cancelled(self, endpoint: Endpoint, began: float) -> None:
        """A try ended without a verdict (cancelled): free what it took."""
        self.balancer.on_finish(endpoint, self._clock() - began, ok=False)
        self.breaker.on_cancel()
        self._release_slot()

    def _try_end(self, endpoint: Endpoint, began: float, outcome: Outcome) -> None:
        """A try's outcome: feed balancer, breaker and outlier detection."""
        now = self._clock()
        failed = not isinstance(outcome, int) or outcome >= 500
        balancer = self.balancer
        balancer.on_finish(endpoint, now - began, ok=not failed)
        if failed:  # the request's verdict (after its retries) is counted in ``_verdict``
            self.breaker.on_failure(counted=False)
        else:
            self.breaker.on_success()
        self._release_slot()
        ejection = self.outliers.on_result(endpoint, outcome, now)
        if ejection is not None:
            self._ejected(ejection, now)
        if now >= self._next_evaluation:  # success-rate ejection, once per interval
            self._next_evaluation = now + self.policy.outlier_detection.interval  # type: ignore[operator]
            for ejection in self.outliers.evaluate(now):
                self._ejected(ejection, now)
            self.outliers.expire(now)

    def _ejected(self, ejection: Ejection, now: float) -> None:
        self.stats.ejections += 1
        if self._on_ejection is not None:
            self._on_ejection(self.service, ejection, ejection.until - now)

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
        if self._deadlines is not None:
            self._deadlines.close()
            self._deadlines = None
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            await pool.aclose()
