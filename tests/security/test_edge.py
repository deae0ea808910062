"""The gateway edge: JWT with hostile tokens, token buckets, TLS termination, and the
whole path on real sockets (client -TLS-> gateway -mTLS-> service)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from shoal.control.ca import CertificateAuthority
from shoal.errors import ConfigError
from shoal.gateway.edge import (
    EdgePolicy,
    JwtRejected,
    JwtValidator,
    Limit,
    RateLimiter,
    TokenBucket,
    server_tls_context,
)
from shoal.gateway.proxy import Gateway
from shoal.gateway.routes import RouteTable
from shoal.gateway.server import HttpServer, Request, Response
from shoal.mesh.http1 import ConnectionPool
from shoal.mesh.registry import EndpointCache, Instance, Registry
from shoal.mesh.security import MeshTLS
from shoal.store import connect_store
from tests.helpers import eventually
from tests.security.conftest import issue

ISSUER, AUDIENCE = "https://id.example", "shop"
KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def token(key: Any = KEY, alg: str = "ES256", headers: dict[str, Any] | None = None,
          **claims: Any) -> bytes:
    now = int(time.time())  # a day: parametrized tokens are made at collection, not run
    body = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 86400, "iat": now, "sub": "alice",
            **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return b"Bearer " + jwt.encode(body, key, algorithm=alg, headers=headers).encode()


def _b64(data: dict[str, Any]) -> bytes:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=")


@pytest.fixture
def keys_file(tmp_path: Path) -> str:
    path = tmp_path / "jwt.pub"
    path.write_bytes(public_pem(KEY))
    return str(path)


@pytest.fixture
def validator(keys_file: str) -> JwtValidator:
    return JwtValidator.from_config({"issuer": ISSUER, "audience": AUDIENCE,
                                     "keys_file": keys_file}, "jwt")


def test_a_valid_token_passes(validator: JwtValidator) -> None:
    assert validator.validate(token())["sub"] == "alice"


def _alg_none() -> bytes:
    now = int(time.time())
    return b"Bearer " + _b64({"alg": "none", "typ": "JWT"}) + b"." + _b64(
        {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300}) + b"."


def _hmac_with_public_key() -> bytes:
    # algorithm confusion: HS256 keyed with the (public) verification key
    now = int(time.time())
    import hashlib
    import hmac
    signing = _b64({"alg": "HS256", "typ": "JWT"}) + b"." + _b64(
        {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300})
    mac = hmac.new(public_pem(KEY), signing, hashlib.sha256).digest()
    return b"Bearer " + signing + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")


@pytest.mark.parametrize(("header", "reason"), [
    (None, "missing-token"),
    (b"Basic YWxpY2U6c2VjcmV0", "missing-token"),
    (b"Bearer ", "missing-token"),
    (b"Bearer garbage", "malformed-token"),
    (b"Bearer a.b.c", "malformed-token"),
    (b"Bearer " + b"A" * 9000, "malformed-token"),
    (b"Bearer \xff\xfe.\x00.x", "malformed-token"),
    (_alg_none(), "algorithm-refused"),
    (_hmac_with_public_key(), "algorithm-refused"),
    (token(iss="https://evil.example"), "wrong-issuer"),
    (token(aud="other"), "wrong-audience"),
    (token(exp=int(time.time()) - 3600), "token-expired"),
    (token(nbf=int(time.time()) + 3600), "token-not-yet-valid"),
    (token(exp=None), "missing-claim"),
    (token(key=OTHER_KEY), "bad-signature"),
    (token(key=rsa.generate_private_key(65537, 2048), alg="RS256"), "invalid-token"),
])
def test_hostile_tokens_are_refused_with_a_reason(validator: JwtValidator, header: bytes | None,
                                                  reason: str) -> None:
    with pytest.raises(JwtRejected) as info:
        validator.validate(header)
    assert info.value.reason == reason, str(info.value)
    assert validator.rejected[reason] == 1


def test_jwks_file_selects_the_key_by_kid(tmp_path: Path) -> None:
    jwks = {"keys": [
        {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key())), "kid": "k1"},
        {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(OTHER_KEY.public_key())), "kid": "k2"},
    ]}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    v = JwtValidator.from_config({"issuer": ISSUER, "audience": [AUDIENCE, "x"],
                                  "jwks_file": str(path)}, "jwt")
    assert v.validate(token(OTHER_KEY, headers={"kid": "k2"}))["sub"] == "alice"
    with pytest.raises(JwtRejected, match="signature"):
        v.validate(token(OTHER_KEY, headers={"kid": "k1"}))
    with pytest.raises(JwtRejected, match="no key 'k9'"):
        v.validate(token(headers={"kid": "k9"}))


@pytest.mark.parametrize(("config", "message"), [
    ({"audience": "a", "keys_file": "x"}, "issuer: required"),
    ({"issuer": "i", "keys_file": "x"}, "audience: required"),
    ({"issuer": "i", "audience": "a"}, "exactly one of"),
    ({"issuer": "i", "audience": "a", "keys_file": "/nonexistent"}, "cannot read"),
    ({"issuer": "i", "audience": "a", "keys_file": "x", "algorithms": ["HS256"]},
     "symmetric and 'none' are refused"),
    ({"issuer": "i", "audience": "a", "keys_file": "x", "algorithms": ["none"]}, "refused"),
    ({"issuer": "i", "audience": "a", "jwks_url": "file:///etc/passwd"}, "http"),
    ({"issuer": "i", "audience": "a", "keys_file": "x", "leeway": -1}, "leeway"),
    ({"issuer": "i", "audience": "a", "keys_file": "x", "extra": 1}, "unknown key"),
])
def test_bad_jwt_config_is_named(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JwtValidator.from_config(config, "gateway.edge.routes.orders.jwt")


@pytest.mark.parametrize("content", [b"{", b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}',
                                     b"x" * (1024 * 1024 + 1), b'{"keys": 5}'])
def test_hostile_jwks_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="jwks_file"):
        JwtValidator.from_config({"issuer": "i", "audience": "a", "jwks_file": str(path)},
                                 "jwt")


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(10.0) == pytest.approx(0.5)
    assert bucket.take(10.25) == pytest.approx(0.25)
    assert bucket.take(10.5) == 0.0
    assert bucket.take(100.0) == 0.0 and bucket.tokens == pytest.approx(2.0)  # capped at burst


def test_per_client_buckets_are_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(Limit(1.0, 1), max_keys=2, clock=lambda: now[0])
    assert limiter.check("a") == 0.0 and limiter.check("a") == pytest.approx(1.0)
    limiter.check("b")
    limiter.check("c")  # evicts 'a', the least recently seen
    assert len(limiter._buckets) == 2 and limiter.limited == 1


@pytest.mark.parametrize(("spec", "message"), [
    ({"burst": 3}, "expected {rate"), ({"rate": "fast"}, "rate"), ({"rate": 0}, "rate"),
    ({"rate": "5/d"}, "rate"), ({"rate": "5/s", "burst": 0}, "burst"),
    ({"rate": "5/s", "burst": True}, "burst"), ({"rate": float("nan")}, "rate"),
    ({"rate": "1/s", "extra": 1}, "expected {rate"),
])
def test_bad_limits_are_named(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EdgePolicy.from_config({"routes": {"orders": {"rate_limit": spec}}})


def test_edge_entries_for_unknown_routes_are_refused() -> None:
    edge = EdgePolicy.from_config({"routes": {"ordrs": {"rate_limit": {"rate": "1/s"}}}})
    with pytest.raises(ConfigError, match="ordrs: no route has this name"):
        edge.check_routes({"orders", None})


def test_tls_termination_names_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.tls\.cert"):
        server_tls_context(str(tmp_path / "missing.pem"), str(tmp_path / "k.pem"))
    (tmp_path / "c.pem").write_text("not a cert")
    (tmp_path / "k.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="cannot load certificate"):
        server_tls_context(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))


# -- the whole path -----------------------------------------------------------------------
@pytest.fixture
async def store() -> AsyncIterator[Any]:
    s = await connect_store(f"memory://{uuid.uuid4().hex}")
    yield s
    await s.close()


def edge_files(tmp_path: Path) -> tuple[str, str, ssl.SSLContext]:
    """A certificate for the gateway's public name, and a client context trusting it."""
    public_ca = CertificateAuthority.create(trust_domain="public.test")
    ident = issue(public_ca, "gateway")
    cert, key = tmp_path / "edge.crt", tmp_path / "edge.key"
    cert.write_bytes(ident.certificate_pem)
    key.write_bytes(ident.key_pem)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cadata=ident.bundle_pem.decode())
    return str(cert), str(key), client


async def test_edge_tls_jwt_and_rate_limits_in_front_of_an_mtls_service(
        tmp_path: Path, store: Any, keys_file: str, ca: CertificateAuthority) -> None:
    seen: list[str | None] = []

    def billing(request: Request) -> Response:
        seen.append(request.peer_identity)
        return Response(b"charged")

    backend = HttpServer(billing, ssl=MeshTLS(issue(ca, "billing")).server_context)
    await backend.start("127.0.0.1", 0)
    await Registry(store).register(Instance(id="billing-1", service="billing",
                                            address=f"127.0.0.1:{backend.port}"))
    cache = await EndpointCache(store).start()
    routes = RouteTable.from_config([
        {"name": "charge", "match": {"path": {"prefix": "/charge"}}, "service": "billing"},
        {"name": "open", "match": {"path": {"prefix": "/open"}}, "service": "billing"},
    ])
    edge = EdgePolicy.from_config({
        "client_rate_limit": {"rate": "1000/s", "burst": 1000},
        "routes": {"charge": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE,
                                      "keys_file": keys_file},
                              "rate_limit": {"rate": "1/h", "burst": 2}}},
    })
    edge.check_routes({r.name for r in routes.routes})
    gateway = Gateway(routes, cache, tls=MeshTLS(issue(ca, "gateway")), edge=edge)
    cert, key, client_ctx = edge_files(tmp_path)
    front = HttpServer(gateway.handle, ssl=server_tls_context(cert, key))
    await front.start("127.0.0.1", 0)
    client = ConnectionPool(("127.0.0.1", front.port), ssl=client_ctx)
    try:
        resp = await client.request("GET", "/charge")
        body = await resp.json()
        assert resp.status == 401 and body["reason"] == "missing-token"
        assert resp.header("www-authenticate") == b'Bearer error="invalid_token"'
        resp = await client.request("GET", "/charge", [("authorization", _alg_none())])
        assert resp.status == 401 and (await resp.json())["reason"] == "algorithm-refused"
        for _ in range(2):
            resp = await client.request("GET", "/charge", [("authorization", token())])
            assert (resp.status, await resp.aread()) == (200, b"charged")
        resp = await client.request("GET", "/charge", [("authorization", token())])
        body = await resp.json()
        assert resp.status == 429 and body["reason"] == "route-rate-limit"
        assert int(resp.header("retry-after")) > 1000  # 1/h: about an hour
        resp = await client.request("GET", "/open")  # no checks on this route
        assert resp.status == 200
        assert seen == ["spiffe://shoal.local/svc/gateway"] * 3  # mTLS gateway -> service
    finally:
        await client.aclose()
        await front.shutdown()
        await gateway.aclose()
        await cache.close()
        await backend.shutdown()


async def test_per_client_limit_answers_429_with_retry_after(store: Any) -> None:
    cache = await EndpointCache(store).start()
    now = [0.0]
    edge = EdgePolicy.from_config({"client_rate_limit": {"rate": "2/s", "burst": 2}},
                                  clock=lambda: now[0])
    gateway = Gateway(RouteTable.from_config([]), cache, edge=edge)
    front = HttpServer(gateway.handle)
    await front.start("127.0.0.1", 0)
    client = ConnectionPool(("127.0.0.1", front.port))
    try:
        statuses = []
        for _ in range(3):
            resp = await client.request("GET", "/nothing")
            await resp.aread()
            statuses.append(resp.status)
        assert statuses == [404, 404, 429]
        assert resp.header("retry-after") == b"1"
        now[0] += 0.5
        resp = await client.request("GET", "/nothing")
        assert resp.status == 404
    finally:
        await client.aclose()
        await front.shutdown()
        await gateway.aclose()
        await cache.close()


async def test_jwks_url_keys_are_fetched_off_the_request_path(tmp_path: Path) -> None:
    from aiohttp import web

    jwks = {"keys": [{**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key())),
                      "kid": "k1"}]}
    async def serve_jwks(request: web.Request) -> web.Response:
        return web.json_response(jwks)

    app = web.Application()
    app.router.add_get("/jwks.json", serve_jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    edge = EdgePolicy.from_config({"routes": {"orders": {"jwt": {
        "issuer": ISSUER, "audience": AUDIENCE,
        "jwks_url": f"http://127.0.0.1:{port}/jwks.json"}}}})
    validator = edge.routes["orders"].jwt
    assert validator is not None
    with pytest.raises(JwtRejected, match="no key"):  # not fetched yet: refused, not blocked
        validator.validate(token(headers={"kid": "k1"}))
    task = asyncio.get_running_loop().create_task(edge.refresh_keys())
    try:
        await eventually(lambda: "k1" in validator.keys, what="JWKS fetched")
        assert validator.validate(token(headers={"kid": "k1"}))["sub"] == "alice"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()
