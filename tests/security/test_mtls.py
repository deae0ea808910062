"""Mutual TLS on real sockets: the project's HttpServer and the mesh client, real handshakes."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shoal.control.ca import CertificateAuthority
from shoal.errors import ShoalError
from shoal.gateway.server import HttpServer, Request, Response, ServerLimits
from shoal.mesh.client import MeshClient
from shoal.mesh.http1 import ConnectionPool
from shoal.mesh.registry import Instance, Registry
from shoal.mesh.security import MeshTLS, MtlsMode, PermissiveListener
from shoal.mesh.security.authz import AuthorizationPolicy, authorize
from shoal.store import connect_store
from tests.helpers import eventually
from tests.security.conftest import issue


class Backend:
    """An HttpServer answering with the caller's SPIFFE id; records what it saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.client_serials: set[int] = set()

    def handle(self, request: Request) -> Response:
        self.calls += 1
        cert = request._conn._transport.get_extra_info("peercert")
        if cert:
            self.client_serials.add(int(cert["serialNumber"], 16))
        return Response(str(request.peer_identity).encode())


@pytest.fixture
async def store() -> AsyncIterator[Any]:
    s = await connect_store(f"memory://{uuid.uuid4().hex}")
    yield s
    await s.close()


async def serve(handler: Any, tls: MeshTLS | None, **limits: Any) -> HttpServer:
    server = HttpServer(handler, ssl=None if tls is None else tls.server_context,
                        limits=ServerLimits(**limits))
    await server.start("127.0.0.1", 0)
    return server


async def raw_exchange(port: int, context: ssl.SSLContext | None, data: bytes) -> bytes:
    """Send ``data`` and read until the peer closes, with a blocking socket in a thread
    (so a TLS alert surfaces as the ``SSLError`` naming it, returned as the answer)."""

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            sock = raw
            try:
                sock = raw if context is None else context.wrap_socket(raw)
                sock.sendall(data)
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
                return b"".join(chunks)
            except (ssl.SSLError, ConnectionError) as exc:
                return f"refused: {exc!r}".encode()
            finally:
                sock.close()

    return await asyncio.to_thread(run)


def bare_client_context(*, identity: Any = None) -> ssl.SSLContext:
    """A TLS client that does not check the server (we test the server's refusals)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if identity is not None:
        identity.load_into(ctx)
    return ctx


async def test_mutual_tls_call_carries_the_callers_identity(ca: CertificateAuthority,
                                                            store: Any) -> None:
    backend = Backend()
    server = await serve(backend.handle, MeshTLS(issue(ca, "billing")))
    await Registry(store).register(Instance(id="billing-1", service="billing",
                                            address=f"127.0.0.1:{server.port}"))
    try:
        async with await MeshClient.connect(store, tls=MeshTLS(issue(ca, "orders"))) as mesh:
            resp = await mesh.get("http://billing/charge")
            assert (resp.status, await resp.aread()) == (200, b"spiffe://shoal.local/svc/orders")
            resp = await mesh.get("http://billing/charge")  # the same keep-alive connection
            assert resp.status == 200
            assert mesh.upstream("billing")._pools[f"127.0.0.1:{server.port}"].opened == 1
    finally:
        await server.shutdown()


async def test_no_client_certificate_is_refused_at_the_handshake(
        ca: CertificateAuthority) -> None:
    backend, tls = Backend(), MeshTLS(issue(ca, "billing"))
    server = await serve(backend.handle, tls)
    try:
        answer = await raw_exchange(server.port, bare_client_context(),
                                    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"HTTP/1.1" not in answer
        assert tls.refused == {"PEER_DID_NOT_RETURN_A_CERTIFICATE": 1}
        assert backend.calls == 0 and server.connections == 0
    finally:
        await server.shutdown()


async def test_a_certificate_from_another_ca_is_refused(
        ca: CertificateAuthority) -> None:
    backend, tls = Backend(), MeshTLS(issue(ca, "billing"))
    server = await serve(backend.handle, tls)
    stranger = issue(CertificateAuthority.create(), "orders")  # same name, other CA
    try:
        answer = await raw_exchange(server.port, bare_client_context(identity=stranger),
                                    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"HTTP/1.1" not in answer
        assert tls.refused == {"self-signed certificate in certificate chain": 1}
        assert backend.calls == 0
        # ... and the mesh client refuses a server from another CA
        pool = ConnectionPool(("127.0.0.1", server.port),
                              ssl=MeshTLS(stranger).client_context("billing"))
        with pytest.raises(ShoalError, match="certificate verify failed"):
            await pool.request("GET", "/")
        await pool.aclose()
    finally:
        await server.shutdown()


async def test_an_expired_certificate_is_refused() -> None:
    now = [time.time() - 3 * 86400]
    ca = CertificateAuthority.create(clock=lambda: now[0])
    expired = issue(ca, "orders")  # valid for 24 h from three days ago
    now[0] = time.time()
    assert expired.not_after < time.time()
    backend, tls = Backend(), MeshTLS(issue(ca, "billing"))
    server = await serve(backend.handle, tls)
    try:
        answer = await raw_exchange(server.port, bare_client_context(identity=expired),
                                    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"HTTP/1.1" not in answer
        assert tls.refused == {"certificate has expired": 1}
        assert backend.calls == 0
    finally:
        await server.shutdown()


async def test_plaintext_to_a_strict_server_is_refused(ca: CertificateAuthority) -> None:
    backend = Backend()
    server = await serve(backend.handle, MeshTLS(issue(ca, "billing")))
    try:
        answer = await raw_exchange(server.port, None, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"HTTP/1.1 200" not in answer and backend.calls == 0
    finally:
        await server.shutdown()


async def test_the_client_refuses_a_server_that_is_not_the_service_it_called(
        ca: CertificateAuthority, store: Any) -> None:
    server = await serve(Backend().handle, MeshTLS(issue(ca, "shipping")))
    await Registry(store).register(Instance(id="billing-1", service="billing",
                                            address=f"127.0.0.1:{server.port}"))
    try:
        async with await MeshClient.connect(store, tls=MeshTLS(issue(ca, "orders"))) as mesh:
            with pytest.raises(ShoalError) as info:
                await mesh.get("http://billing/charge")
            assert "expected spiffe://shoal.local/svc/billing" in str(info.value)
            assert "spiffe://shoal.local/svc/shipping" in str(info.value)
    finally:
        await server.shutdown()


async def test_an_identity_the_policy_does_not_allow_gets_403_naming_the_rule(
        ca: CertificateAuthority) -> None:
    policy = AuthorizationPolicy.from_config("billing", [
        {"name": "no-admin", "action": "deny", "paths": [{"prefix": "/admin"}]},
        {"name": "orders-charge", "action": "allow", "from": ["orders"],
         "methods": ["POST"], "paths": [{"exact": "/charge"}]},
    ])
    backend = Backend()
    server = await serve(authorize(policy, backend.handle), MeshTLS(issue(ca, "billing")))
    address = ("127.0.0.1", server.port)
    orders = ConnectionPool(address, ssl=MeshTLS(issue(ca, "orders")).client_context("billing"))
    shipping = ConnectionPool(address,
                              ssl=MeshTLS(issue(ca, "shipping")).client_context("billing"))
    try:
        resp = await orders.request("POST", "/charge", body=b"{}")
        assert resp.status == 200 and await resp.aread() == b"spiffe://shoal.local/svc/orders"
        resp = await shipping.request("POST", "/charge", body=b"{}")
        body = await resp.json()
        assert resp.status == 403 and body["reason"] == "default-deny"
        assert "spiffe://shoal.local/svc/shipping" in body["error"]
        assert resp.header("shoal-error") == b"authz; default-deny"
        resp = await orders.request("POST", "/admin/../admin/x", body=b"{}")
        assert resp.status == 403 and (await resp.json())["reason"] == "no-admin"
        assert policy.denials == {"default-deny": 1, "no-admin": 1}
        assert backend.calls == 1
    finally:
        await orders.aclose()
        await shipping.aclose()
        await server.shutdown()


async def test_rotation_under_steady_load_fails_no_request(ca: CertificateAuthority,
                                                           store: Any) -> None:
    """Both sides rotate their certificates (and the root rotates) while 4 callers keep
    calling; connections are recycled every 5 requests, so new handshakes happen with
    the new certificates all along, while open connections keep going."""
    backend = Backend()
    server_tls, client_tls = MeshTLS(issue(ca, "billing")), MeshTLS(issue(ca, "orders"))
    server = await serve(backend.handle, server_tls, max_requests_per_connection=5)
    await Registry(store).register(Instance(id="billing-1", service="billing",
                                            address=f"127.0.0.1:{server.port}"))
    ok, failed, stop = [0], [], asyncio.Event()

    async def caller(mesh: MeshClient) -> None:
        while not stop.is_set():
            try:
                resp = await mesh.get("http://billing/x")
                await resp.aread()
                if resp.status == 200:
                    ok[0] += 1
                else:
                    failed.append(resp.status)
            except ShoalError as exc:
                failed.append(exc)

    async def rotate() -> None:
        for i in range(8):
            target = ok[0] + 60  # 15 requests per connection: each one is recycled
            await eventually(lambda t=target: ok[0] >= t or bool(failed), what="calls")
            if i == 3:  # root rotation: the bundle first, then leaves of the new root
                ca.rotate_root()
                server_tls.update_bundle(ca.bundle_pem())
                client_tls.update_bundle(ca.bundle_pem())
            server_tls.update(issue(ca, "billing"))
            client_tls.update(issue(ca, "orders"))
        target = ok[0] + 60
        await eventually(lambda t=target: ok[0] >= t or bool(failed), what="calls")
        stop.set()

    try:
        async with await MeshClient.connect(store, tls=client_tls) as mesh:
            await asyncio.gather(rotate(), *(caller(mesh) for _ in range(4)))
    finally:
        await server.shutdown()
    assert failed == []
    assert ok[0] >= 540
    assert server_tls.generation == 9 and len(backend.client_serials) >= 7


async def test_permissive_mode_serves_mtls_and_plaintext_on_one_port(
        ca: CertificateAuthority) -> None:
    assert MtlsMode.parse("permissive").accepts_plaintext
    backend = Backend()
    server = HttpServer(backend.handle)
    listener = PermissiveListener(server, MeshTLS(issue(ca, "billing")).server_context)
    await listener.start()
    pool = ConnectionPool(("127.0.0.1", listener.port),
                          ssl=MeshTLS(issue(ca, "orders")).client_context("billing"))
    plain = ConnectionPool(("127.0.0.1", listener.port))
    try:
        resp = await pool.request("GET", "/")
        assert await resp.aread() == b"spiffe://shoal.local/svc/orders"
        resp = await plain.request("GET", "/")
        assert (resp.status, await resp.aread()) == (200, b"None")
        answer = await raw_exchange(listener.port, bare_client_context(), b"GET / HTTP/1.1\r\n"
                                    b"Host: x\r\n\r\n")
        assert b"HTTP/1.1" not in answer  # TLS without a client certificate: still refused
    finally:
        await pool.aclose()
        await plain.aclose()
        await listener.aclose()
        await server.shutdown()


@pytest.mark.parametrize("value", ["STRICT", "", None, "on", 1])
def test_mtls_mode_names_the_allowed_values(value: object) -> None:
    with pytest.raises(ShoalError, match="strict, permissive or off"):
        MtlsMode.parse(value)


async def test_permissive_listener_drops_silent_and_garbage_connections(
        ca: CertificateAuthority) -> None:
    backend = Backend()
    server = HttpServer(backend.handle)
    listener = PermissiveListener(server, MeshTLS(issue(ca, "billing")).server_context,
                                  sniff_timeout=0.2)
    await listener.start()
    try:
        silent = await raw_exchange(listener.port, None, b"")  # says nothing: closed
        assert silent == b""
        garbage = await raw_exchange(listener.port, None, b"\x16\x03\x01\x00\x05hello")
        assert b"HTTP/1.1" not in garbage  # looks like TLS, is not: handshake fails
        plain = await raw_exchange(listener.port, None, b"GET / HTTP/1.1\r\nHost: x\r\n"
                                   b"Connection: close\r\n\r\n")
        assert plain.startswith(b"HTTP/1.1 200") and backend.calls == 1
    finally:
        await listener.aclose()
        await server.shutdown()
