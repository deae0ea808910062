"""Mutual TLS for the Service SDK's HTTP server (uvicorn): who called, and how we listen.

* ``PeerIdentityProtocol`` - uvicorn's httptools protocol that puts the caller's verified
  SPIFFE id (or None: plaintext, under ``permissive``) in every request's ASGI scope,
  under ``scope["extensions"]["shoal.peer"]["spiffe_id"]`` (``peer_identity(scope)``).
* ``UvicornAdopter`` - serves connections accepted elsewhere with a running uvicorn
  server, so ``PermissiveListener`` (mTLS and plaintext on one port) works in front of it.
* ``forbidden`` - the 403 an authorization policy's denial answers, shaped as the gateway's
  errors (``{"error", "layer", "reason"}`` and ``shoal-error: authz; <rule>``).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shoal.mesh.security.authz import Decision
from shoal.mesh.security.spiffe import spiffe_id_of_peercert
from shoal.mesh.tls_reads import buffered_reads

__all__ = ["PEER", "PeerIdentityProtocol", "UvicornAdopter", "forbidden", "peer_identity"]

PEER = "shoal.peer"
"""The ASGI scope extension carrying the caller's identity."""
_json = msgspec.json.Encoder()


class PeerIdentityProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, with the peer's SPIFFE id in each request's scope."""

    peer: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Read the verified client certificate once per connection."""
        super().connection_made(transport)
        sslobj = transport.get_extra_info("ssl_object")
        self.peer = None if sslobj is None else spiffe_id_of_peercert(sslobj.getpeercert())

    def on_message_begin(self) -> None:
        """Each request's scope says who sent it."""
        super().on_message_begin()
        self.scope["extensions"] = {PEER: {"spiffe_id": self.peer}}  # type: ignore[typeddict-unknown-key]


def peer_identity(scope: dict[str, Any]) -> str | None:
    """The caller's verified SPIFFE id, or None (plaintext or not served by us)."""
    peer = (scope.get("extensions") or {}).get(PEER)
    return None if peer is None else peer.get("spiffe_id")


class UvicornAdopter:
    """``adopt(sock, ssl=...)`` for a started uvicorn ``Server``: the hook
    ``shoal.mesh.security.PermissiveListener`` hands accepted connections to."""

    def __init__(self, server: Any, *, handshake_timeout: float = 10.0) -> None:
        config = server.config
        self._factory = functools.partial(
            config.http_protocol_class, config=config, server_state=server.server_state,
            app_state=server.lifespan.state)
        self.handshake_timeout = handshake_timeout

    async def adopt(self, sock: socket.socket, *, ssl: ssl.SSLContext | None = None) -> None:
        """Serve ``sock`` (TLS with ``ssl``; the handshake is awaited here)."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        extra = {"ssl_handshake_timeout": self.handshake_timeout} if ssl is not None else {}
        factory = self._factory if ssl is None else buffered_reads(self._factory)
        await asyncio.get_running_loop().connect_accepted_socket(factory, sock, ssl=ssl, **extra)


async def forbidden(send: Any, service: str, decision: Decision) -> None:
    """Answer 403 naming the rule that denied the call."""
    body = _json.encode({"error": decision.reason, "layer": "authz", "reason": decision.rule,
                         "service": service})
    await send({"type": "http.response.start", "status": 403, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"shoal-error", f"authz; {decision.rule}".encode("latin-1"))]})
    await send({"type": "http.response.body", "body": body})
