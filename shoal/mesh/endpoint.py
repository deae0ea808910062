"""One instance of a service as the mesh sees it, and the live numbers balancers keep on it.

``Endpoint`` is an immutable value (the registry makes a new one when an instance changes);
``EndpointStats`` is the mutable per-instance state a balancer owns, keyed by
``instance_id`` so that it survives a weight or label change of the same instance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shoal.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An addressable instance of ``service``: ``"host:port"`` or a unix socket path."""

    instance_id: str
    service: str
    address: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    weight: int = 1
    registered_at: float = 0.0  # informational (wall clock); slow start uses the balancer's clock

    def __post_init__(self) -> None:
        if not self.instance_id:
            raise ConfigError("endpoint.instance_id: must not be empty")
        if not self.address:
            raise ConfigError(f"endpoint {self.instance_id!r}: address must not be empty")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int) or self.weight < 1:
            raise ConfigError(
                f"endpoint {self.instance_id!r}: weight must be an integer >= 1, "
                f"got {self.weight!r}")
        host, _, port = self.address.rpartition(":")
        if not self.is_unix and not (host and port.isdigit()):
            raise ConfigError(
                f"endpoint {self.instance_id!r}: address must be 'host:port' or a unix "
                f"socket path, got {self.address!r}")

    @property
    def is_unix(self) -> bool:
        """True when ``address`` is a unix socket path (``/run/x.sock`` or ``unix:/run/x``)."""
        return self.address.startswith(("/", "unix:", "./"))

    @property
    def socket_path(self) -> str:
        """The filesystem path of a unix socket address."""
        return self.address.removeprefix("unix:")

    @property
    def host_port(self) -> tuple[str, int]:
        """``(host, port)`` of a TCP address; IPv6 hosts may be written ``[::1]:80``."""
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(slots=True)
class EndpointStats:
    """Live numbers on one endpoint, owned and updated by one balancer."""

    active: int = 0  # requests started and not yet finished (Finagle's "pending")
    requests: int = 0  # finished requests
    failures: int = 0  # finished requests that failed
    rtt_estimate: float | None = None  # peak-EWMA round trip, seconds (None: never seen)
    rtt_stamp: float = 0.0  # clock time rtt_estimate was last decayed or updated
