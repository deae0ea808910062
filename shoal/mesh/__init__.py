"""The mesh: registry and discovery, load balancing, resilience, and the proxyless client."""

from shoal.mesh.client import MeshClient
from shoal.mesh.endpoint import Endpoint
from shoal.mesh.registry import EndpointCache, Instance, Registry
from shoal.mesh.resilience import TrafficPolicy, load_traffic_policy
from shoal.mesh.upstream import Upstream


def __getattr__(name: str) -> object:
    if name == "HTTPXTransport":  # imports httpx, which only this adapter needs
        from shoal.mesh.httpx_transport import HTTPXTransport

        return HTTPXTransport
    raise AttributeError(name)


__all__ = [
    "Endpoint",
    "EndpointCache",
    "HTTPXTransport",
    "Instance",
    "MeshClient",
    "Registry",
    "TrafficPolicy",
    "Upstream",
    "load_traffic_policy",
]
