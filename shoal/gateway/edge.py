"""The gateway's edge checks per route: JWT validation and token-bucket rate limits.

From the gateway section of the manifest::

    edge:
      client_rate_limit: {rate: 100/s, burst: 200}     # per client address, every request
      routes:
        orders:                                        # a route's name
          jwt: {issuer: https://id.example, audience: shop, jwks_file: jwks.json}
          rate_limit: {rate: 50/s, burst: 100}         # the route as a whole
          client_rate_limit: {rate: 5/s, burst: 10}    # per client address on this route

``Gateway(..., edge=EdgePolicy.from_config(...))`` calls ``check(request, route)`` once a
route matched (``route`` None for the built-in ``/events/`` endpoint); it returns None to
let the request through, or the answer: ``401`` (JWT missing or invalid, with the reason
and ``WWW-Authenticate``) or ``429`` with ``Retry-After``. The token buckets are pure
objects on an injected clock.

Decisions, written down once:

* **Only asymmetric JWT algorithms** (RS*, PS*, ES*, EdDSA), the allowed list fixed by the
  config, never by the token: ``alg: none`` and HMAC-with-a-public-key confusion are
  refused before any signature check. ``exp``, ``iss`` and ``aud`` are required.
* **Keys** come from a PEM public key file, a JWKS file, or a JWKS URL (fetched at start
  and refreshed in the background, off the request path, at most 1 MiB).
* **Client address** is the TCP peer, not ``X-Forwarded-For`` (which clients can write).
  Per-client buckets are kept for at most ``MAX_CLIENTS`` addresses (least recently seen
  evicted: an evicted client starts again with a full bucket).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import re
import ssl
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

from shoal.errors import ConfigError
from shoal.gateway.server import Request, Response

__all__ = ["EdgePolicy", "JwtRejected", "JwtValidator", "RateLimiter", "TokenBucket",
           "server_tls_context"]

log = logging.getLogger("shoal.gateway")

MAX_TOKEN_BYTES = 8 * 1024
MAX_JWKS_BYTES = 1024 * 1024
MAX_CLIENTS = 100_000
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
              "ES512", "EdDSA")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}


# -- rate limits (pure) -----------------------------------------------------------------------
@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take`` returns 0 or the wait needed."""

    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float) -> float:
        """Take one token at ``now``: 0.0 if granted, else seconds until one is there."""
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        elif now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass(frozen=True, slots=True)
class Limit:
    """A rate limit's configuration."""

    rate: float
    burst: float

    @classmethod
    def from_config(cls, data: Any, where: str) -> Limit:
        """``{rate: 50/s, burst: 100}``; ``rate`` as ``N/s``, ``N/m``, ``N/h`` or a number."""
        if not isinstance(data, Mapping) or set(data) - {"rate", "burst"} or "rate" not in data:
            raise ConfigError(f"{where}: expected {{rate: 50/s, burst: 100}}, got {data!r:.80}")
        raw = data["rate"]
        rate: float | None = None
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            rate = float(raw)
        elif isinstance(raw, str) and len(raw) < 32 and (m := _RATE.match(raw)):
            rate = float(m.group(1)) / _PER[m.group(2)]
        if rate is None or not 0 < rate < 1e9 or not math.isfinite(rate):
            raise ConfigError(f"{where}.rate: expected a positive rate like '50/s' or '300/m', "
                              f"got {raw!r:.40}")
        burst = data.get("burst", max(1.0, rate))
        if isinstance(burst, bool) or not isinstance(burst, int | float) or \
                not 1 <= burst < 1e9:
            raise ConfigError(f"{where}.burst: expected a number >= 1, got {burst!r:.40}")
        return cls(rate, float(burst))


class RateLimiter:
    """Token buckets per key (one key: a route as a whole; addresses: per client)."""

    def __init__(self, limit: Limit, *, max_keys: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.max_keys = max_keys
        self.clock = clock
        self.limited = 0
        self._buckets: collections.OrderedDict[Any, TokenBucket] = collections.OrderedDict()

    def check(self, key: Any = None) -> float:
        """0.0 if a request of ``key`` may pass now, else seconds to wait."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = TokenBucket(self.limit.rate, self.limit.burst)
            if len(buckets) > self.max_keys:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
        wait = bucket.take(self.clock())
        if wait:
            self.limited += 1
        return wait


# -- JWT --------------------------------------------------------------------------------------
class JwtRejected(Exception):
    """A token was refused; ``reason`` is a stable token for the answer."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class JwtValidator:
    """Validates bearer tokens: allowed algorithms, signature, ``exp``, ``iss``, ``aud``."""

    def __init__(self, *, issuer: str, audience: str | list[str],
                 keys: Mapping[str | None, Any] | None = None,
                 algorithms: tuple[str, ...] = ASYMMETRIC, leeway: float = 30.0,
                 jwks_url: str | None = None, refresh: float = 300.0) -> None:
        self.issuer = issuer
        self.audience = audience
        self.algorithms = algorithms
        self.leeway = leeway
        self.keys: dict[str | None, Any] = dict(keys or {})  # kid -> key (None: no kid)
        self.jwks_url = jwks_url
        self.refresh = refresh
        self.rejected: collections.Counter[str] = collections.Counter()

    @classmethod
    def from_config(cls, data: Any, where: str) -> JwtValidator:
        """From ``{issuer, audience, keys_file | jwks_file | jwks_url, algorithms?, leeway?}``."""
        known = {"issuer", "audience", "keys_file", "jwks_file", "jwks_url", "algorithms",
                 "leeway", "refresh"}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        for key in data:
            if key not in known:
                raise ConfigError(f"{where}: unknown key {key!r:.40}; expected one of "
                                  f"{', '.join(sorted(known))}")
        issuer, audience = data.get("issuer"), data.get("audience")
        if not isinstance(issuer, str) or not issuer:
            raise ConfigError(f"{where}.issuer: required, a string")
        if not (isinstance(audience, str) and audience) and not (
                isinstance(audience, list) and audience
                and all(isinstance(a, str) and a for a in audience)):
            raise ConfigError(f"{where}.audience: required, a string or a list of strings")
        sources = [k for k in ("keys_file", "jwks_file", "jwks_url") if k in data]
        if len(sources) != 1:
            raise ConfigError(f"{where}: give exactly one of keys_file, jwks_file, jwks_url")
        algorithms = data.get("algorithms", list(ASYMMETRIC))
        if not isinstance(algorithms, list) or not algorithms or \
                any(a not in ASYMMETRIC for a in algorithms):
            raise ConfigError(f"{where}.algorithms: expected a list from {', '.join(ASYMMETRIC)}"
                              f" (symmetric and 'none' are refused), got {algorithms!r:.80}")
        leeway = data.get("leeway", 30)
        if isinstance(leeway, bool) or not isinstance(leeway, int | float) or \
                not 0 <= leeway <= 600:
            raise ConfigError(f"{where}.leeway: expected seconds 0-600, got {leeway!r:.40}")
        validator = cls(issuer=issuer, audience=audience, algorithms=tuple(algorithms),
                        leeway=float(leeway), jwks_url=data.get("jwks_url"))
        source = sources[0]
        if source == "keys_file":
            validator.keys = {None: _load_pem_key(data["keys_file"], f"{where}.keys_file")}
        elif source == "jwks_file":
            path = data["jwks_file"]
            validator.keys = parse_jwks(_read(path, f"{where}.jwks_file"),
                                        f"{where}.jwks_file ({path})")
        elif not isinstance(validator.jwks_url, str) or \
                not validator.jwks_url.startswith(("https://", "http://")):
            raise ConfigError(f"{where}.jwks_url: expected an http(s) URL")
        return validator

    def validate(self, authorization: bytes | None) -> dict[str, Any]:
        """The claims of a valid ``Bearer`` token, else ``JwtRejected``."""
        try:
            return self._validate(authorization)
        except JwtRejected as exc:
            self.rejected[exc.reason] += 1
            raise

    def _validate(self, authorization: bytes | None) -> dict[str, Any]:
        if authorization is None:
            raise JwtRejected("missing-token", "this route needs 'Authorization: Bearer <JWT>'")
        if len(authorization) > MAX_TOKEN_BYTES:
            raise JwtRejected("malformed-token", f"the token is over {MAX_TOKEN_BYTES} bytes")
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            raise JwtRejected("missing-token", "expected 'Authorization: Bearer <JWT>'")
        text = token.strip().decode("latin-1")
        try:
            header = jwt.get_unverified_header(text)
        except jwt.PyJWTError:
            raise JwtRejected("malformed-token", "the token is not a JWT") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise JwtRejected("algorithm-refused", f"algorithm {str(alg)[:20]!r} is not allowed "
                              f"(allowed: {', '.join(self.algorithms)})")
        kid = header.get("kid")
        key = self.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            key = self.keys.get(None) if len(self.keys) == 1 or kid is None else None
            if key is None and len(self.keys) == 1:
                key = next(iter(self.keys.values()))
        if key is None:
            raise JwtRejected("unknown-key", f"no key {str(kid)[:64]!r} in the route's key set")
        try:
            return jwt.decode(  # type: ignore[no-any-return]
                text, key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                leeway=self.leeway, options={"require": ["exp", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise JwtRejected("token-expired", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise JwtRejected("token-not-yet-valid", "the token is not valid yet") from None
        except jwt.InvalidIssuerError:
            raise JwtRejected("wrong-issuer", "the token's issuer is not accepted") from None
        except jwt.InvalidAudienceError:
            raise JwtRejected("wrong-audience", "the token's audience is not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise JwtRejected("missing-claim", f"the token lacks the {exc.claim!r} claim") \
                from None
        except jwt.InvalidSignatureError:
            raise JwtRejected("bad-signature", "the token's signature does not verify") from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise JwtRejected("invalid-token", f"the token is invalid: {exc}"[:200]) from None

    async def refresh_forever(self) -> None:
        """Fetch the JWKS URL now and every ``refresh`` seconds (off the request path)."""
        if not self.jwks_url:
            return
        while True:
            try:
                raw = await asyncio.to_thread(_fetch, self.jwks_url)
                self.keys = parse_jwks(raw, self.jwks_url)
            except (OSError, ConfigError) as exc:
                log.error("gateway: could not refresh JWKS from %s: %s", self.jwks_url, exc)
            await asyncio.sleep(self.refresh)


def parse_jwks(raw: bytes, where: str) -> dict[str | None, Any]:
    """``{kid: key}`` from a JWKS document; ``ConfigError`` naming ``where`` if malformed."""
    if len(raw) > MAX_JWKS_BYTES:
        raise ConfigError(f"{where}: JWKS larger than {MAX_JWKS_BYTES} bytes")
    try:
        data = json.loads(raw)
        keyset = jwt.PyJWKSet.from_dict(data)
    except (ValueError, jwt.PyJWTError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{where}: not a usable JWKS: {exc}"[:300]) from None
    keys: dict[str | None, Any] = {}
    for k in keyset.keys:
        if k.key_type == "oct":
            raise ConfigError(f"{where}: symmetric (oct) keys are refused")
        keys[k.key_id] = k.key
    return keys


def _read(path: Any, where: str) -> bytes:
    if not isinstance(path, str):
        raise ConfigError(f"{where}: expected a file path")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_JWKS_BYTES:
        raise ConfigError(f"{where}: {path} is larger than {MAX_JWKS_BYTES} bytes")
    return data


def _load_pem_key(path: Any, where: str) -> Any:
    data = _read(path, where)
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {path} is not a PEM public key ({exc})") from None


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:  # http(s) only: checked at load
        data: bytes = resp.read(MAX_JWKS_BYTES + 1)
    return data


# -- TLS termination --------------------------------------------------------------------------
def server_tls_context(cert_file: str, key_file: str, *,
                       where: str = "gateway.tls") -> ssl.SSLContext:
    """A context terminating TLS for outside clients (``HttpServer(ssl=...)``) from PEM
    files: TLS 1.2 or later, no client certificate asked; errors name the file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for what, path in (("cert", cert_file), ("key", key_file)):
        if not isinstance(path, str) or not os.path.isfile(path):
            raise ConfigError(f"{where}.{what}: {path!r:.200} is not a readable file")
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{where}: cannot load certificate {cert_file} with key {key_file}: "
                          f"{exc}") from None
    return ctx


# -- the policy the proxy calls ---------------------------------------------------------------
@dataclass(slots=True)
class RouteEdge:
    """What the edge checks on one route."""

    jwt: JwtValidator | None = None
    route_limit: RateLimiter | None = None
    client_limit: RateLimiter | None = None


@dataclass(slots=True)
class EdgePolicy:
    """Edge checks for every route, by route name, and a per-client limit for all."""

    routes: dict[str, RouteEdge] = field(default_factory=dict)
    client_limit: RateLimiter | None = None

    @classmethod
    def from_config(cls, data: Any, *, where: str = "gateway.edge",
                    clock: Callable[[], float] = time.monotonic) -> EdgePolicy:
        """From the ``edge`` section; a ``ConfigError`` names the route and key."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping) or set(data) - {"client_rate_limit", "routes"}:
            raise ConfigError(f"{where}: expected a mapping with client_rate_limit and/or "
                              f"routes, got {data!r:.80}")
        policy = cls()
        if data.get("client_rate_limit") is not None:
            policy.client_limit = RateLimiter(
                Limit.from_config(data["client_rate_limit"], f"{where}.client_rate_limit"),
                clock=clock)
        routes = data.get("routes") or {}
        if not isinstance(routes, Mapping):
            raise ConfigError(f"{where}.routes: expected a mapping of route name -> checks")
        for name, spec in routes.items():
            what = f"{where}.routes.{name!s:.60}"
            if not isinstance(spec, Mapping) or \
                    set(spec) - {"jwt", "rate_limit", "client_rate_limit"}:
                raise ConfigError(f"{what}: expected a mapping with jwt, rate_limit and/or "
                                  f"client_rate_limit, got {spec!r:.80}")
            edge = RouteEdge()
            if spec.get("jwt") is not None:
                edge.jwt = JwtValidator.from_config(spec["jwt"], f"{what}.jwt")
            if spec.get("rate_limit") is not None:
                edge.route_limit = RateLimiter(
                    Limit.from_config(spec["rate_limit"], f"{what}.rate_limit"), clock=clock)
            if spec.get("client_rate_limit") is not None:
                edge.client_limit = RateLimiter(Limit.from_config(
                    spec["client_rate_limit"], f"{what}.client_rate_limit"), clock=clock)
            policy.routes[str(name)] = edge
        return policy

    def check_routes(self, names: set[str | None], where: str = "gateway.edge") -> None:
        """Refuse edge entries for route names the route table does not have."""
        for name in self.routes:
            if name not in names:
                raise ConfigError(f"{where}.routes.{name}: no route has this name")

    async def refresh_keys(self) -> None:
        """Keep every JWKS URL's keys fresh, until cancelled."""
        tasks = [asyncio.ensure_future(e.jwt.refresh_forever())
                 for e in self.routes.values() if e.jwt is not None and e.jwt.jwks_url]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t

    def check(self, request: Request, route: Any) -> Response | None:
        """None to let ``request`` through on ``route`` (None: no route), else the answer."""
        client = request.client[0] if isinstance(request.client, tuple) else request.client
        if self.client_limit is not None:
            wait = self.client_limit.check(client)
            if wait:
                return _too_many("client-rate-limit", wait, "this client address")
        edge = self.routes.get(route.name) if route is not None and route.name else None
        if edge is None:
            return None
        if edge.client_limit is not None:
            wait = edge.client_limit.check(client)
            if wait:
                return _too_many("route-client-rate-limit", wait,
                                 f"this client address on {route.label}")
        if edge.jwt is not None:
            try:
                edge.jwt.validate(request.headers.get(b"authorization"))
            except JwtRejected as exc:
                return Response.error(401, exc.reason, f"{route.label}: {exc}", layer="jwt",
                                      headers=[(b"www-authenticate", b'Bearer error='
                                                b'"invalid_token"')])
        if edge.route_limit is not None:
            wait = edge.route_limit.check()
            if wait:
                return _too_many("route-rate-limit", wait, route.label)
        return None


def _too_many(reason: str, wait: float, what: str) -> Response:
    seconds = max(1, math.ceil(wait))
    return Response.error(429, reason, f"rate limit of {what} exceeded; retry in {seconds}s",
                          layer="rate-limit",
                          headers=[(b"retry-after", str(seconds).encode())])
