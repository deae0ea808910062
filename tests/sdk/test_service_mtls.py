"""shoal.Service under mutual TLS, in-process with real sockets: the certificate from the
CA's signer over the Store, strict refusing plaintext, permissive taking both, the
authorization policy deciding with the caller's verified identity, topic policies."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from shoal.control.ca import CLOCK_SKEW, LEAF_LIFETIME, CertificateAuthority, CertificateSigner
from shoal.errors import Forbidden
from shoal.mesh.client import MeshClient
from shoal.mesh.security.asgi_server import peer_identity
from shoal.mesh.security.authz import AuthorizationPolicy
from shoal.mesh.security.tls import MeshTLS
from shoal.mesh.security.topics import TopicPolicy
from shoal.service import Service
from shoal.store.connect import connect_store
from tests.security.conftest import issue

POLICY = [{"name": "no-admin", "action": "deny", "paths": [{"prefix": "/admin"}]},
          {"name": "callers", "action": "allow", "from": ["front"]}]


def make_back() -> Service:
    back = Service("back")

    @back.get("/who")
    async def who(request: Request) -> JSONResponse:
        return JSONResponse({"peer": peer_identity(request.scope)})

    @back.get("/admin/x")
    async def admin(request: Request) -> JSONResponse:  # pragma: no cover - denied
        return JSONResponse({"secret": True})

    return back


@contextlib.asynccontextmanager
async def mesh(url: str) -> AsyncIterator[tuple[object, CertificateAuthority]]:
    """A memory store with the CA's signer answering CSRs."""
    store = await connect_store(url)
    ca = CertificateAuthority.create()
    signer = asyncio.create_task(CertificateSigner(store, lambda: ca).run())
    try:
        yield store, ca
    finally:
        signer.cancel()
        await asyncio.gather(signer, return_exceptions=True)
        await store.close()


async def raw(address: str, data: bytes, context: ssl.SSLContext | None = None) -> bytes:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), ssl=context,
                                                   server_hostname="" if context else None)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


GET = b"GET /who HTTP/1.1\r\nhost: back\r\nconnection: close\r\n\r\n"


async def test_strict_service_gets_its_identity_refuses_plaintext_and_authorizes() -> None:
    url = "memory://svc-mtls-strict"
    async with mesh(url) as (store, ca):
        back, front = make_back(), Service("front")
        policy = AuthorizationPolicy.from_config("back", POLICY)
        await back.start(broker=url, store=store, mtls="strict", authorization=policy)
        await front.start(broker=url, store=store, mtls="strict")
        try:
            assert back.tls is not None and str(back.tls.identity.spiffe_id) == \
                "spiffe://shoal.local/svc/back"
            # a call between services: mutual TLS, the caller's identity seen and allowed
            resp = await front.call("back", "GET", "/who")
            assert resp.status == 200
            assert (await resp.json()) == {"peer": "spiffe://shoal.local/svc/front"}
            denied = await front.call("back", "GET", "/admin/x")
            body = await denied.json()
            assert denied.status == 403 and body["reason"] == "no-admin"
            assert denied.header("shoal-error") == b"authz; no-admin"
            # another identity of the mesh, allowed by no rule: 403 naming default-deny
            stranger = MeshTLS(issue(ca, "stranger"))
            async with await MeshClient.connect(store, tls=stranger) as client:
                other = await client.get("http://back/who")
                assert other.status == 403
                assert (await other.json())["reason"] == "default-deny"
            assert policy.denials == {"no-admin": 1, "default-deny": 1}
            # plaintext, and TLS without a client certificate: refused, no HTTP answer
            assert back.address is not None
            with contextlib.suppress(ConnectionError):
                assert not (await raw(back.address, GET)).startswith(b"HTTP")
            anonymous = ssl.create_default_context(cadata=ca.bundle_pem().decode())
            anonymous.check_hostname = False
            with pytest.raises((ssl.SSLError, ConnectionError)):
                reply = await raw(back.address, GET, anonymous)
                assert not reply.startswith(b"HTTP")  # TLS 1.3: refused after the hello
                raise ConnectionError("refused")
            # the control plane's checks: /healthz with a mesh identity, whatever the policy
            checker = MeshTLS(issue(ca, "shoal-control"))
            ok = await raw(back.address, b"GET /healthz HTTP/1.1\r\nhost: x\r\n"
                           b"connection: close\r\n\r\n", checker.context_for("back"))
            assert ok.startswith(b"HTTP/1.1 200")
        finally:
            await front.stop(grace=0)
            await back.stop(grace=0)
        assert back.tls is not None and back._rotation is None  # renewal stopped with it


async def test_permissive_service_serves_mtls_and_plaintext_on_one_port() -> None:
    url = "memory://svc-mtls-permissive"
    async with mesh(url) as (store, ca):
        back = make_back()
        await back.start(broker=url, store=store, mtls="permissive")
        try:
            assert back.address is not None
            plain = await raw(back.address, GET)
            assert plain.startswith(b"HTTP/1.1 200") and b'{"peer":null}' in plain
            caller = MeshTLS(issue(ca, "front"))
            mutual = await raw(back.address, GET, caller.context_for("back"))
            assert mutual.startswith(b"HTTP/1.1 200")
            assert b'"spiffe://shoal.local/svc/front"' in mutual
        finally:
            await back.stop(grace=0)


async def test_topic_policy_refuses_publish_and_subscribe_with_a_clear_error() -> None:
    url = "memory://svc-topics"
    topics = TopicPolicy.from_config({"greetings": {"publish": ["talker"]}})
    talker = Service("talker")
    async with talker.running(broker=url, store=url, listen=None, topic_policy=topics):
        await talker.publish("greetings", {"hi": 1})
        with pytest.raises(Forbidden, match="may not publish to topic 'secrets'") as info:
            await talker.publish("secrets", {"pin": 1234})
        assert info.value.rule == "no-entry"
        assert talker.bus is not None
        assert "secrets" not in {t.spec.name for t in await talker.bus.topics()}
    listener = Service("talker")

    @listener.subscribe("secrets")
    def on_secret(event: object) -> None:  # pragma: no cover - never subscribed
        pass

    with pytest.raises(Forbidden, match="may not subscribe on topic 'secrets'"):
        await listener.start(broker=url, store=url, listen=None, topic_policy=topics)


async def test_a_running_service_renews_its_certificate_at_two_thirds_without_failures(
        ) -> None:
    """The first certificates are issued as if 2/3 of their life had passed: the services
    renew at once, on the real clock, while calls between them keep succeeding."""
    url = "memory://svc-mtls-rotation"
    store = await connect_store(url)
    ca = CertificateAuthority.create()
    real = ca.clock
    aged = [True]

    def clock() -> float:  # the first leaves of each service: renewal due ~1s from now
        return real() - (2 / 3 * (LEAF_LIFETIME + CLOCK_SKEW) - CLOCK_SKEW) + 1.0 \
            if aged[0] else real()

    ca.clock = clock
    signer = asyncio.create_task(CertificateSigner(store, lambda: ca).run())
    back, front = make_back(), Service("front")
    try:
        await back.start(broker=url, store=store, mtls="strict")
        await front.start(broker=url, store=store, mtls="strict")
        aged[0] = False  # renewals get full-life certificates
        assert back.tls is not None and front.tls is not None
        first = back.tls.identity.not_after
        failures = calls = 0
        async with asyncio.timeout(20):
            while back.tls.generation < 1 or front.tls.generation < 1 or calls < 20:
                resp = await front.call("back", "GET", "/who")
                calls += 1
                failures += resp.status != 200
                await resp.aread()
                await asyncio.sleep(0.02)
        assert failures == 0
        assert back.tls.identity.not_after > first + 3600  # a fresh 24 h certificate
        resp = await front.call("back", "GET", "/who")  # new connections, new certificates
        assert resp.status == 200
    finally:
        await front.stop(grace=0)
        await back.stop(grace=0)
        signer.cancel()
        await asyncio.gather(signer, return_exceptions=True)
        await store.close()


async def test_strict_service_reads_tls_without_a_buffer_per_read() -> None:
    """uvicorn under strict reads through ``buffered_reads``: a plain protocol would make
    the loop allocate 256 KiB per TLS read (``shoal.mesh.tls_reads``)."""
    import tracemalloc

    url = "memory://svc-mtls-reads"
    async with mesh(url) as (store, _ca):
        back, front = make_back(), Service("front")
        await back.start(broker=url, store=store, mtls="strict")
        await front.start(broker=url, store=store, mtls="strict")
        try:
            assert (await front.call("back", "GET", "/who")).status == 200  # connected
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                for _ in range(20):
                    assert (await front.call("back", "GET", "/who")).status == 200
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
            assert peak < 128 * 1024, peak
        finally:
            await front.stop(grace=0)
            await back.stop(grace=0)
