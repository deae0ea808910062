"""Mutual TLS for the mesh: contexts from an ``Identity``, SPIFFE checks, hot rotation.

``MeshTLS(identity)`` gives

* ``server_context`` - one ``ssl.SSLContext`` to listen with (``HttpServer(ssl=...)``):
  TLS 1.3, a client certificate required and verified against the trust bundle;
* ``client_context(service)`` - a provider for ``ConnectionPool(ssl=...)``: TLS 1.3, the
  server's chain verified against the bundle, and its SPIFFE id required to be
  ``spiffe://<trust-domain>/svc/<service>`` (host names mean nothing in the mesh, so
  ``check_hostname`` is off and the URI SAN is checked right after the handshake).

**Rotation without dropping connections.** ``update(identity)`` builds a new generation
of contexts; connections opened from then on use it, connections already open keep the
TLS session they have. On the server side the listening context's SNI callback (called
for every ClientHello, with or without SNI) swaps in the current generation's context,
so its certificate *and* its trust store apply; clients take the current context each
time they open a connection.

**``security.mtls``:** ``strict`` - servers accept only mutually authenticated TLS and
clients always use it; ``permissive`` - servers accept mTLS and plaintext on one port
(the first byte tells: 0x16 starts a TLS handshake), clients with an identity use mTLS;
``off`` - plaintext.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from shoal.errors import CertificateError, ShoalError
from shoal.mesh.security.identity import Identity, request_identity
from shoal.mesh.security.issuance import BUNDLE_KEY
from shoal.mesh.security.mode import MtlsMode
from shoal.mesh.security.spiffe import SpiffeId, spiffe_id_of_peercert

__all__ = ["MeshTLS", "MtlsMode", "PermissiveListener", "SpiffeMismatch", "rotate_forever"]

log = logging.getLogger("shoal.mesh.security")


class SpiffeMismatch(ssl.SSLCertVerificationError):
    """The peer's chain verified, but it is not the service we called."""


class _SpiffeCheckingObject(ssl.SSLObject):
    """An ``SSLObject`` that, once the handshake is done, checks the server's SPIFFE id."""

    def do_handshake(self) -> None:
        super().do_handshake()
        expected = getattr(self.context, "expected_peer", None)
        if expected is not None:
            got = spiffe_id_of_peercert(self.getpeercert())
            if got != expected:
                message = f"the peer is {got or 'without a SPIFFE id'}, expected {expected}"
                raise SpiffeMismatch(1, message)  # (errno, strerror): the text errors show


class _ClientContext(ssl.SSLContext):
    """A client context that knows which SPIFFE id its peer must have."""

    expected_peer: str | None = None


def _base(purpose: int) -> ssl.SSLContext:
    ctx = (_ClientContext if purpose == ssl.PROTOCOL_TLS_CLIENT else ssl.SSLContext)(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class MeshTLS:
    """The TLS contexts of one instance, rebuilt on every certificate or bundle change."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.generation = 0
        self.refused: collections.Counter[str] = collections.Counter()  # handshakes, by why
        self._server: ssl.SSLContext | None = None
        self._clients: dict[str, ssl.SSLContext] = {}
        self._current_server = self._build_server()
        self.server_context = self._listening_context()

    # -- server ------------------------------------------------------------------------
    def _build_server(self) -> ssl.SSLContext:
        ctx = _base(ssl.PROTOCOL_TLS_SERVER)
        self.identity.load_into(ctx)
        return ctx

    def _listening_context(self) -> ssl.SSLContext:
        """The context servers listen with; it hands each handshake the current one."""
        ctx = self._build_server()

        def swap(sslobj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
            current = self._current_server
            if sslobj.context is not current:
                sslobj.context = current
            return None

        ctx.sni_callback = swap
        refused = self.refused

        class _CountingObject(ssl.SSLObject):
            """Counts (and logs) handshakes this server refused, by reason."""

            def do_handshake(self) -> None:
                try:
                    super().do_handshake()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    raise
                except ssl.SSLError as exc:
                    why = getattr(exc, "verify_message", None) or exc.reason or repr(exc)
                    refused[why] += 1
                    log.debug("mTLS handshake refused: %s", why)
                    raise

        ctx.sslobject_class = _CountingObject
        return ctx

    # -- client ------------------------------------------------------------------------
    def client_context(self, service: str) -> Callable[[], ssl.SSLContext]:
        """A provider of the current client context for calls to ``service``."""
        expected = SpiffeId(self.identity.spiffe_id.trust_domain, service).uri
        return lambda: self._client(expected)

    def context_for(self, service: str) -> ssl.SSLContext:
        """The current client context for calls to ``service`` (what the provider returns)."""
        return self._client(SpiffeId(self.identity.spiffe_id.trust_domain, service).uri)

    def _client(self, expected: str) -> ssl.SSLContext:
        ctx = self._clients.get(expected)
        if ctx is None:
            ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False  # the SPIFFE id is checked instead
            ctx.sslobject_class = _SpiffeCheckingObject
            ctx.expected_peer = expected  # type: ignore[attr-defined]
            self.identity.load_into(ctx)
            self._clients[expected] = ctx
        return ctx

    # -- rotation ----------------------------------------------------------------------
    def update(self, identity: Identity) -> None:
        """Use ``identity`` for every connection opened from now on."""
        if identity.spiffe_id != self.identity.spiffe_id:
            raise CertificateError(f"rotation: new certificate is {identity.spiffe_id}, "
                                   f"this instance is {self.identity.spiffe_id}")
        self.identity = identity
        self._current_server = self._build_server()
        self._clients = {}
        self.generation += 1

    def update_bundle(self, bundle_pem: bytes) -> None:
        """Trust exactly the roots in ``bundle_pem`` from now on."""
        if bundle_pem != self.identity.bundle_pem:
            self.update(self.identity.with_bundle(bundle_pem))


async def rotate_forever(tls: MeshTLS, store: Any, instance: str, *,
                         clock: Callable[[], float] = time.time,
                         retry_every: float = 5.0) -> None:
    """Renew ``tls``'s certificate at two thirds of its life and follow the trust bundle
    in the Store, until cancelled (failures are logged and retried)."""

    latest: list[bytes | None] = [None]  # the newest bundle seen in the Store

    def apply(bundle: bytes) -> None:
        try:
            tls.update_bundle(bundle)
            latest[0] = bundle
        except CertificateError as exc:
            log.error("trust bundle update refused: %s", exc)

    async def follow_bundle() -> None:
        after = await store.revision()  # first: a put between these two is still watched
        entry = await store.get(BUNDLE_KEY)
        if entry is not None:
            apply(entry.value)
        async for change in store.watch(BUNDLE_KEY, after_revision=after):
            if change.kind == "put" and change.value:
                apply(change.value)

    follower = asyncio.get_running_loop().create_task(follow_bundle())
    try:
        while True:
            await asyncio.sleep(max(tls.identity.renew_at - clock(), 0.0))
            spiffe = tls.identity.spiffe_id
            try:
                renewed = await request_identity(store, spiffe.service, instance,
                                                 trust_domain=spiffe.trust_domain)
                if latest[0] is not None and latest[0] != renewed.bundle_pem:
                    # the answer may carry an older bundle than the one followed since
                    renewed = renewed.with_bundle(latest[0])
                tls.update(renewed)
            except ShoalError as exc:
                log.error("certificate renewal for %s failed: %s; retrying in %gs",
                          spiffe, exc, retry_every)
                await asyncio.sleep(retry_every)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


class PermissiveListener:
    """Accepts mTLS and plaintext on one port for an ``HttpServer`` (``security.mtls:
    permissive``): each accepted socket is peeked at; a TLS ClientHello gets the handshake
    with ``context``, anything else is served in plaintext."""

    def __init__(self, server: Any, context: ssl.SSLContext, *,
                 sniff_timeout: float = 10.0) -> None:
        self.server = server
        self.context = context
        self.sniff_timeout = sniff_timeout
        self.sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port listened on."""
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen and start accepting."""
        sock = socket.create_server((host, port), backlog=1024)
        sock.setblocking(False)
        self.sock = sock
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            task = loop.create_task(self._sniff(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _sniff(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        conn.setblocking(False)
        loop.add_reader(conn.fileno(), lambda: readable.done() or readable.set_result(None))
        try:
            async with asyncio.timeout(self.sniff_timeout):
                await readable
            first = conn.recv(1, socket.MSG_PEEK)
        except (TimeoutError, OSError):
            first = b""
        finally:
            loop.remove_reader(conn.fileno())
        if not first:
            conn.close()
            return
        tls = first[0] == 0x16
        try:
            await self.server.adopt(conn, ssl=self.context if tls else None)
        except (OSError, ssl.SSLError) as exc:
            log.debug("permissive listener: connection refused at the handshake: %s", exc)
            conn.close()

    async def aclose(self) -> None:
        """Stop accepting (connections already served belong to the server)."""
        tasks = [t for t in (self._task, *self._pending) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.sock is not None:
            self.sock.close()
            self.sock = None
