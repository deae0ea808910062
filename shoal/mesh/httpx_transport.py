"""`HTTPXTransport`: plug the mesh into ``httpx.AsyncClient``.

    client = httpx.AsyncClient(transport=HTTPXTransport(mesh))
    await client.get("http://billing/invoices")

Requests go through the same ``Upstream`` stack as ``MeshClient.request``; responses
stream. httpx is imported only by this module, so it is not a dependency of Shoal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from shoal.mesh.client import MeshClient, split_service_url
from shoal.mesh.http1 import Response


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: Response) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.aiter_bytes():
            yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


class HTTPXTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends ``http://<service>/...`` through the mesh."""

    def __init__(self, mesh: MeshClient) -> None:
        self.mesh = mesh

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        service, target = split_service_url(str(request.url))
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        if isinstance(request.stream, httpx.ByteStream):
            body: bytes | AsyncIterator[bytes] | None = await request.aread() or None
        else:
            body = request.stream  # type: ignore[assignment]  # streamed: never retried
        upstream = self.mesh.upstream(service)
        hash_key = None
        if upstream.policy.load_balancer.hash_header:
            hash_key = request.headers.get(upstream.policy.load_balancer.hash_header)
        response = await upstream.send(request.method, target, headers, body, hash_key=hash_key)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        await self.mesh.aclose()
