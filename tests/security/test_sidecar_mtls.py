"""``shoal sidecar --mtls strict``: an app not written with Shoal joins a strict mesh; the
sidecar serves mutual TLS with the instance's identity, the app behind it stays plaintext."""

from __future__ import annotations

import asyncio

import pytest

from shoal.control.ca import CertificateAuthority, CertificateSigner
from shoal.errors import ConfigError, ShoalError
from shoal.gateway.config import parse_listen
from shoal.gateway.server import HttpServer, Response
from shoal.gateway.sidecar import SidecarConfig, SidecarReady, serve_sidecar
from shoal.mesh import MeshClient
from shoal.mesh.security import MeshTLS
from shoal.store import connect_store
from tests.security.conftest import issue


def _config(**kw: object) -> SidecarConfig:
    base: dict[str, object] = {"service": "web", "listen": parse_listen("127.0.0.1:0"),
                               "app": "127.0.0.1:8000", "instance_id": "web-1"}
    return SidecarConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_sidecar_mtls_modes_are_checked_naming_the_flag() -> None:
    assert _config(mtls="strict").mtls == "strict"
    with pytest.raises(ConfigError, match="--mtls: expected strict, permissive or off"):
        _config(mtls="tight")
    with pytest.raises(ConfigError, match="--mtls permissive: a sidecar serves strict or off"):
        _config(mtls="permissive")


async def test_a_strict_sidecar_serves_its_instance_identity_to_mesh_callers_only() -> None:
    url = "memory://sidecar-mtls-strict"
    store = await connect_store(url)
    ca = CertificateAuthority.create()
    signer = asyncio.create_task(CertificateSigner(store, lambda: ca).run())
    app = HttpServer(lambda request: Response(b"app: " + request.path.encode()))
    await app.start("127.0.0.1", 0)
    stop = asyncio.Event()
    ready: asyncio.Future[SidecarReady] = asyncio.get_running_loop().create_future()
    sidecar = asyncio.create_task(serve_sidecar(
        _config(app=f"127.0.0.1:{app.port}", mtls="strict", drain=0.0), store=url, stop=stop,
        on_ready=ready.set_result))
    caller = plain = None
    try:
        done, _ = await asyncio.wait({ready, sidecar}, timeout=20,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert ready in done, sidecar.exception() if sidecar in done else "not ready in 20s"
        # a mesh caller: mutual TLS, and the sidecar proves it is svc/web (checked)
        caller = await MeshClient.connect(store, tls=MeshTLS(issue(ca, "caller")))
        await caller.cache.wait_for("web", timeout=10)
        resp = await caller.get("http://web/hello")
        assert (resp.status, await resp.aread()) == (200, b"app: /hello")
        # the same call in plaintext: refused (no HTTP answer reaches it)
        plain = await MeshClient.connect(store)
        await plain.cache.wait_for("web", timeout=10)
        with pytest.raises(ShoalError):
            await (await plain.get("http://web/hello")).aread()
    finally:
        for client in (caller, plain):
            if client is not None:
                await client.aclose()
        stop.set()
        await sidecar
        await app.shutdown(1)
        signer.cancel()
        await asyncio.gather(signer, return_exceptions=True)
        await store.close()
