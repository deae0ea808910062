"""The one exception hierarchy of Shoal: every error names what went wrong and where."""

from __future__ import annotations


class ShoalError(Exception):
    """Root of every error Shoal raises on purpose."""


class ConfigError(ShoalError, ValueError):
    """A URL, duration, size or manifest value is not what was expected."""


class InvalidEvent(ShoalError, ValueError):
    """A CloudEvent envelope is malformed; ``attribute`` names the offending attribute."""

    def __init__(self, attribute: str, message: str) -> None:
        super().__init__(f"{attribute}: {message}")
        self.attribute = attribute


class TopicError(ShoalError):
    """A topic does not exist, or cannot be created as asked."""


class PublishError(ShoalError):
    """An event could not be appended to the log."""


class StoreError(ShoalError):
    """The coordination store refused or failed an operation."""


class LeaseExpired(StoreError):
    """A lease ran out (or was revoked) before it was kept alive."""


class SecurityError(ShoalError):
    """An identity, certificate or authorization problem; the message names which."""


class CertificateError(SecurityError):
    """A certificate, key, CSR or trust bundle is malformed, expired or not acceptable."""


class Forbidden(SecurityError):
    """An authorization policy refused an action; ``rule`` names the rule that decided."""

    status = 403

    def __init__(self, message: str, *, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


class TransportError(ShoalError):
    """A call to an endpoint failed below HTTP semantics; ``address`` names the endpoint."""

    layer = "upstream"  # what a relaying proxy names in its ``shoal-error`` header
    status = 502  # the status a relaying proxy answers with

    def __init__(self, address: str, message: str) -> None:
        super().__init__(message)
        self.address = address


class ConnectError(TransportError):
    """No connection could be opened (refused, unreachable, timed out): nothing was sent."""


class ConnectionLost(TransportError):
    """The connection broke mid-exchange; ``request_sent`` False means a retry is always safe."""

    def __init__(self, address: str, message: str, *, request_sent: bool) -> None:
        super().__init__(address, message)
        self.request_sent = request_sent


class ProtocolError(TransportError):
    """The peer answered with something that is not valid HTTP/1.1 (or exceeds our limits)."""


class MeshError(ShoalError):
    """A call through the mesh gave up; the message names the layer that gave up and why.

    ``layer`` and ``status`` are what a relaying proxy puts in its ``shoal-error`` header
    and status line, so no caller ever sees an opaque 503.
    """

    layer = "mesh"
    status = 503


class NoEndpoint(MeshError):
    """The balancer had no instance of ``service`` to send the call to."""

    layer = "balancer"

    def __init__(self, service: str, reason: str) -> None:
        super().__init__(f"balancer: no endpoint for service {service!r}: {reason}")
        self.service = service
        self.reason = reason


class CircuitOpen(MeshError):
    """The circuit breaker of ``service`` refused the call (open, or a concurrency limit hit)."""

    layer = "circuit-breaker"

    def __init__(self, service: str, reason: str, *, retry_after: float | None = None) -> None:
        hint = f"; retry in {retry_after:.3g}s" if retry_after else ""
        super().__init__(f"circuit breaker: call to {service!r} rejected: {reason}{hint}")
        self.service = service
        self.reason = reason
        self.retry_after = retry_after


class RetryBudgetExhausted(MeshError):
    """A retry was warranted but the retry budget of ``service`` is spent."""

    layer = "retry-budget"

    def __init__(self, service: str, reason: str) -> None:
        super().__init__(f"retry budget: not retrying call to {service!r}: {reason}")
        self.service = service
        self.reason = reason


class UpstreamTimeout(MeshError, TimeoutError):
    """A call to ``service`` ran out of time; ``scope`` is ``"request"`` or ``"per-try"``."""

    layer = "timeout"
    status = 504

    def __init__(self, service: str, timeout: float, *, scope: str = "request",
                 attempts: int = 1) -> None:
        tries = f" after {attempts} attempt(s)" if attempts > 1 else ""
        super().__init__(
            f"timeout: {scope} timeout of {timeout:.3g}s for call to {service!r} expired{tries}")
        self.service = service
        self.timeout = timeout
        self.scope = scope
        self.attempts = attempts
