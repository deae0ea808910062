"""Reading an instance of a ``shoal up`` running under strict mTLS, as tests must: with an
identity of its mesh, obtained from its control plane's CA through its Store."""

from __future__ import annotations

import os

from shoal.mesh.http1 import ConnectionPool
from shoal.mesh.security.identity import request_identity
from shoal.mesh.security.tls import MeshTLS
from shoal.store.connect import connect_store


async def mesh_identity(store_url: str, name: str = "shoal-test") -> MeshTLS:
    """A certificate for ``name`` from the mesh whose Store is at ``store_url``."""
    store = await connect_store(store_url)
    try:
        return MeshTLS(await request_identity(store, name, f"test-{os.getpid()}"))
    finally:
        await store.close()


async def get_over_mtls(tls: MeshTLS, address: str, service: str, path: str
                        ) -> tuple[int, bytes]:
    """``GET path`` on the instance of ``service`` at ``address``: status and body."""
    pool = ConnectionPool(address, max_connections=1, ssl=tls.client_context(service))
    try:
        resp = await pool.request("GET", path, [("host", service)])
        return resp.status, await resp.aread()
    finally:
        await pool.aclose()
