"""`MeshClient`: the proxyless client inside every Python service.

``await mesh.request("POST", "http://billing/charge", json=...)`` resolves ``billing``
through the registry's endpoint cache, balances, and applies the resilience layers of an
``Upstream`` (one per service, built from that service's ``TrafficPolicy``). No sidecar,
no extra hop: the call goes straight from this process to the chosen instance.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import msgspec

from shoal.errors import ConfigError
from shoal.mesh.ejections import EjectionReporter
from shoal.mesh.http1 import Body, Response
from shoal.mesh.registry import EndpointCache
from shoal.mesh.resilience import TrafficPolicy
from shoal.mesh.upstream import Upstream
from shoal.observability import tracing as _tracing
from shoal.store.base import Store
from shoal.store.connect import connect_store

if TYPE_CHECKING:  # cryptography (~40 ms of imports) only when mTLS is on
    from shoal.mesh.security.tls import MeshTLS

_json = msgspec.json.Encoder()


class MeshClient:
    """Calls services by name: ``http://<service>/<path>``."""

    def __init__(
        self,
        cache: EndpointCache,
        *,
        policies: Mapping[str, TrafficPolicy] | None = None,
        default_policy: TrafficPolicy | None = None,
        store: Store | None = None,
        ejections: EjectionReporter | None = None,
        tls: MeshTLS | None = None,
    ) -> None:
        self.cache = cache
        self.ejections = ejections  # shares this client's outlier ejections with the registry
        self.tls = tls  # mutual TLS to every service (strict/permissive mTLS), else plaintext
        self.policies = dict(policies or {})
        self.default_policy = default_policy or TrafficPolicy()
        self._upstreams: dict[str, Upstream] = {}
        self._store = store  # closed with the client when we opened it

    @classmethod
    async def connect(cls, store: str | Store | None = None, **options: Any) -> MeshClient:
        """A client on the registry in ``store`` (URL or Store; default: the local one)."""
        owned = None
        if not isinstance(store, Store):
            store = owned = await connect_store(store)
        cache = await EndpointCache(store).start()
        options.setdefault("ejections", EjectionReporter(store))
        return cls(cache, store=owned, **options)

    def upstream(self, service: str) -> Upstream:
        """The call stack to ``service`` (made on first use)."""
        upstream = self._upstreams.get(service)
        if upstream is None:
            cache = self.cache
            upstream = self._upstreams[service] = Upstream(
                service,
                lambda: cache.endpoints(service),
                self.policies.get(service, self.default_policy),
                is_healthy=cache.is_healthy,
                on_ejection=None if self.ejections is None else self.ejections.report,
                pool_options=None if self.tls is None else
                {"ssl": self.tls.client_context(service)},  # type: ignore[dict-item]
            )
        return upstream

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | list[tuple[str, str]] | None = None,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        content: Body = None,
        hash_key: str | None = None,
    ) -> Response:
        """Send a request to a service by name; the response body streams.

        ``hash_key`` feeds consistent hashing (else the policy's ``hash_header``).
        """
        service, target = split_service_url(url)
        if params:
            target += ("&" if "?" in target else "?") + urlencode(params)
        pairs = list(headers.items() if isinstance(headers, Mapping) else headers or [])
        if json is not None:
            if content is not None:
                raise ConfigError("request: give json or content, not both")
            content = _json.encode(json)
            pairs.append(("content-type", "application/json"))
        if not any(k.lower() == "host" for k, _ in pairs):
            pairs.append(("host", service))
        upstream = self.upstream(service)
        if hash_key is None and upstream.policy.load_balancer.hash_header:
            wanted = upstream.policy.load_balancer.hash_header.lower()
            hash_key = next((v for k, v in pairs if k.lower() == wanted), None)
        if _tracing.tracer is not None:  # a client span; its context goes in traceparent
            given = next((v for k, v in pairs if k.lower() == "traceparent"), None)
            carried = _tracing.unsampled_here() if given is None else _tracing.unsampled(given)
            if carried is None:
                with _tracing.client_scope(service, method, target, given) as scope:
                    pairs = [(k, v) for k, v in pairs if k.lower() != "traceparent"]
                    pairs.append(("traceparent", scope.traceparent))
                    resp = await upstream.send(method, target, pairs, content,
                                               hash_key=hash_key)
                    scope.set_status(resp.status)
                    return resp
            if carried is not given:  # unrecorded: no span, the trace goes on in the header
                pairs = [(k, v) for k, v in pairs if k.lower() != "traceparent"]
                pairs.append(("traceparent", carried))
        return await upstream.send(method, target, pairs, content, hash_key=hash_key)

    async def get(self, url: str, **kwargs: Any) -> Response:
        """``request("GET", url, ...)``."""
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> Response:
        """``request("POST", url, ...)``."""
        return await self.request("POST", url, **kwargs)

    async def aclose(self) -> None:
        """Close pooled connections, the endpoint cache, and the store if we opened it."""
        for upstream in self._upstreams.values():
            await upstream.aclose()
        self._upstreams.clear()
        if self.ejections is not None:
            await self.ejections.aclose()
        await self.cache.close()
        if self._store is not None:
            await self._store.close()

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def split_service_url(url: str) -> tuple[str, str]:
    """``("billing", "/charge?x=1")`` from ``"http://billing/charge?x=1"``."""
    if not isinstance(url, str) or len(url) > 8192:
        raise ConfigError(f"mesh url: expected a string like 'http://billing/charge', got {url!r}")
    return _split(url)


@functools.lru_cache(maxsize=4096)  # services call the same few URLs over and over
def _split(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "") or not parts.hostname:
        raise ConfigError(f"mesh url {url!r}: expected http://<service>/<path>")
    if parts.port is not None:
        raise ConfigError(
            f"mesh url {url!r}: address services by name, without a port"
        )
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return parts.hostname, target
