"""A standalone gateway (``shoal gateway --mtls strict``) in front of a strict mesh: it gets
its mesh identity from the CA through the Store and calls services over mutual TLS."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from shoal.control.ca import CertificateAuthority, CertificateSigner
from shoal.errors import ConfigError
from shoal.gateway.config import parse_gateway_config
from shoal.gateway.running import Ready, serve_gateway
from shoal.mesh.http1 import ConnectionPool
from shoal.mesh.security.asgi_server import peer_identity
from shoal.service import Service
from shoal.store import connect_store

CONFIG = b"""
gateway:
  listen: ["127.0.0.1:0"]
  routes:
    - {name: back, match: {path: {prefix: /who}}, service: back}
"""


async def _through_gateway(url: str, mtls: str) -> tuple[int, Any]:
    """Start a gateway with ``mtls``, GET /who through it once, stop it."""
    config = parse_gateway_config(CONFIG, "test.yaml")
    stop = asyncio.Event()
    ready: asyncio.Future[Ready] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(serve_gateway(config, store=url, broker=None, stop=stop,
                                                on_ready=ready.set_result, mtls=mtls))
    try:
        done, _ = await asyncio.wait({ready, serving}, timeout=20,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert ready in done, serving.exception() if serving in done else "not ready in 20s"
        host, port = ready.result().listen[0].rsplit(":", 1)
        pool = ConnectionPool((host, int(port)))
        try:
            resp = await pool.request("GET", "/who")
            body = await resp.aread()
            return resp.status, body
        finally:
            await pool.aclose()
    finally:
        stop.set()
        await serving


async def test_standalone_gateway_calls_a_strict_service_with_its_mesh_identity() -> None:
    url = "memory://gateway-mtls-standalone"
    store = await connect_store(url)
    ca = CertificateAuthority.create()
    signer = asyncio.create_task(CertificateSigner(store, lambda: ca).run())
    back = Service("back")

    @back.get("/who")
    async def who(request: Request) -> JSONResponse:
        return JSONResponse({"peer": peer_identity(request.scope)})

    await back.start(broker=url, store=store, mtls="strict")
    try:
        status, body = await _through_gateway(url, "strict")
        assert status == 200, body
        assert body == b'{"peer":"spiffe://shoal.local/svc/shoal-gateway"}'
        # the same gateway without mTLS: the strict service refuses it at the handshake
        status, body = await _through_gateway(url, "off")
        assert status in (502, 503), (status, body)
    finally:
        await back.stop(grace=0)
        signer.cancel()
        await asyncio.gather(signer, return_exceptions=True)
        await store.close()


async def test_an_unknown_mtls_mode_is_refused_naming_the_option(tmp_path: Path) -> None:
    config = parse_gateway_config(CONFIG, "test.yaml")
    with pytest.raises(ConfigError, match="--mtls: expected strict, permissive or off"):
        await serve_gateway(config, store="memory://gateway-mtls-bad", broker=None,
                            stop=asyncio.Event(), on_ready=lambda _: None, mtls="tight")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", "gateway", "--mtls", "tight", "--store",
        f"sqlite:///{tmp_path}/s.db", cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2, stderr
    assert stderr.decode().strip() == ("shoal: error: --mtls: expected strict, permissive "
                                       "or off, got 'tight'")
