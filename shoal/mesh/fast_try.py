"""``FastTry``: the first try of an ``Upstream`` request, run without a task.

``Upstream.start`` writes the request on an idle pooled connection and hands the exchange
to a ``FastTry``, which the connection calls back (``ExchangeListener``) when the response
has arrived, partly arrived or failed. The try's outcome then goes through the very same
steps as a try in ``Upstream.send``: balancer, breaker and outlier accounting
(``_try_end``), then the retry verdict (``_verdict``). The result is handed to
``deliver``: the response, the error the stack gave up with, or, when the verdict is to
retry, the coroutine that goes on retrying (the caller runs it in a task).

A ``FastTry`` also looks like a task to whoever may cancel it: the per-try deadline
(``shoal.mesh.deadlines``, whose expiry is a timeout) and the gateway's server (a client
that left: the exchange is aborted and the try counted as cancelled).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from shoal.errors import MeshError, TransportError
from shoal.mesh.deadlines import Deadlines, Expiry
from shoal.mesh.endpoint import Endpoint
from shoal.mesh.http1 import HeaderList, Http1Connection, Response
from shoal.mesh.resilience import Failure, Outcome, classify

if TYPE_CHECKING:
    from shoal.mesh.upstream import Upstream

__all__ = ["Deliver", "FastTry"]

Deliver = Callable[[Response | BaseException | Awaitable[Response]], None]


def _delivered(result: object) -> None:
    """Stands in for ``deliver`` once it was called (never called again)."""


class FastTry:
    """One try in flight on one pooled connection; ends by calling ``deliver`` once,
    unless cancelled by its caller."""

    answer_later = True  # the gateway's server: the answer comes through a callback

    __slots__ = ("_began", "_body", "_conn", "_deadlines", "_deliver", "_endpoint", "_expiry",
                 "_finished",
                 "_hash_key", "_headers", "_method", "_resp", "_start", "_target", "_timeout",
                 "_upstream")

    def __init__(self, upstream: Upstream, endpoint: Endpoint, method: str, target: str,
                 headers: HeaderList, body: bytes | None, hash_key: str | bytes | None,
                 start: float, timeout: float | None, deliver: Deliver) -> None:
        self._upstream = upstream
        self._endpoint = endpoint
        self._method = method
        self._target = target
        self._headers = headers
        self._body = body
        self._hash_key = hash_key
        self._start = start
        self._timeout = timeout
        self._deliver = deliver
        self._conn: Http1Connection | None = None
        self._began = 0.0
        self._expiry: Expiry | None = None
        self._deadlines: Deadlines | None = None
        self._resp: Response | None = None
        self._finished = False

    def sent(self, conn: Http1Connection, began: float) -> None:
        """The request was written on ``conn`` at ``began``: arm the per-try deadline."""
        self._conn = conn
        self._began = began
        if self._timeout is not None:
            deadlines = self._deadlines = self._upstream.deadlines()
            self._expiry = deadlines.start(self, self._timeout)  # type: ignore[arg-type]

    # -- task-like: for the deadline and the server ------------------------------------
    def done(self) -> bool:
        """True once the try ended (delivered or cancelled)."""
        return self._finished

    def cancel(self, msg: object = None) -> bool:
        """Abort the exchange: a timeout if the deadline fired, else a cancelled try."""
        if self._finished:
            return False
        conn = self._conn
        if conn is not None:
            conn._abort_exchange()  # no callback follows
        expiry = self._expiry
        if expiry is not None and expiry.fired:
            self._settle(Failure.TIMEOUT, None, TimeoutError())
        else:
            self._end()
            self._deliver = _delivered
            self._upstream._try_cancelled(self._endpoint, self._began)
        return True

    # -- ExchangeListener ------------------------------------------------------------------
    def on_head(self, resp: Response) -> None:
        self._resp = resp

    def on_complete(self, resp: Response) -> None:
        self._settle(resp.status, resp, None)

    def on_partial(self, resp: Response) -> None:
        self._settle(resp.status, resp, None)

    def on_failed(self, exc: BaseException, resp: Response | None) -> None:
        if resp is not None:  # the head had come: the try succeeded, the body will fail
            self._settle(resp.status, resp, None)
        else:
            self._settle(classify(exc) or Failure.RESET, None, exc)

    # -- the verdict -------------------------------------------------------------------
    def _end(self) -> None:
        """Finished: drop what refers back to us (the expiry names us as its task), so
        that no reference cycle is left for the garbage collector."""
        self._finished = True
        self._resp = self._conn = None
        expiry, self._expiry = self._expiry, None
        if expiry is not None:
            self._deadlines.finish(expiry)  # type: ignore[union-attr]

    def _settle(self, outcome: Outcome, response: Response | None,
                error: BaseException | None) -> None:
        if self._finished:
            return
        self._end()
        deliver, self._deliver = self._deliver, _delivered
        upstream = self._upstream
        upstream._try_end(self._endpoint, self._began, outcome)
        body_size = 0 if self._body is None else len(self._body)
        try:
            final = upstream._verdict(1, self._method, outcome, response, error, body_size,
                                      self._timeout)
        except (MeshError, TransportError) as exc:
            deliver(exc)
            return
        if final is not None:
            deliver(final)
            return
        deliver(upstream._resume(self._method, self._target, self._headers, self._body,
                                       self._hash_key, self._start, 1, [self._endpoint]))
