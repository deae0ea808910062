"""The admin API: the control plane over HTTP JSON, a plain Starlette app.

``admin_app(control)`` serves::

    GET  /api/services                 services: replicas wanted, instances by state, autoscale
    GET  /api/instances                instances: process state, health state, pid, address
    GET  /api/routes                   the gateway's routes
    GET  /api/topics                   topics: partitions, events, lag per group, dead letters
    POST /api/services/{name}/scale    {"replicas": N}

Errors are JSON ``{"error": ...}`` naming what was wrong: 400 for a malformed body, 404
for an unknown service, 413 for a body over ``MAX_BODY``. Other parts (the dashboard,
metrics) add their routes to the returned app.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from shoal.errors import ConfigError, ShoalError

MAX_BODY = 64 * 1024
MAX_REPLICAS = 64


class UnknownService(ShoalError, LookupError):
    """The manifest declares no service of that name."""


class Control(Protocol):
    """What the admin API needs from the control plane."""

    async def services(self) -> list[dict[str, Any]]: ...
    async def instances(self) -> list[dict[str, Any]]: ...
    def routes(self) -> list[dict[str, Any]]: ...
    async def topics(self) -> list[dict[str, Any]]: ...
    async def scale(self, service: str, replicas: int) -> dict[str, Any]: ...


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _scale_body(request: Request) -> int | JSONResponse:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        return _error(413, f"request body: at most {MAX_BODY} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return _error(413, f"request body: at most {MAX_BODY} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return _error(400, f"request body: not JSON: {e}")
    if not isinstance(data, dict) or "replicas" not in data:
        return _error(400, 'request body: expected a JSON object {"replicas": N}')
    extra = sorted(set(data) - {"replicas"})
    if extra:
        return _error(400, f"request body: unknown key(s) {', '.join(map(repr, extra))}; "
                           'expected {"replicas": N}')
    replicas = data["replicas"]
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not (
            0 <= replicas <= MAX_REPLICAS):
        return _error(400, f"replicas: expected an integer 0..{MAX_REPLICAS}, "
                           f"got {json.dumps(replicas)[:64]}")
    return replicas


def admin_app(control: Control) -> Starlette:
    """The admin API of ``control`` as a Starlette app."""

    async def services(request: Request) -> JSONResponse:
        return JSONResponse(await control.services())

    async def instances(request: Request) -> JSONResponse:
        return JSONResponse(await control.instances())

    async def routes(request: Request) -> JSONResponse:
        return JSONResponse(control.routes())

    async def topics(request: Request) -> JSONResponse:
        return JSONResponse(await control.topics())

    async def scale(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        replicas = await _scale_body(request)
        if isinstance(replicas, JSONResponse):
            return replicas
        try:
            return JSONResponse(await control.scale(name, replicas))
        except UnknownService as e:
            return _error(404, str(e))
        except ConfigError as e:
            return _error(400, str(e))

    return Starlette(routes=[
        Route("/api/services", services),
        Route("/api/instances", instances),
        Route("/api/routes", routes),
        Route("/api/topics", topics),
        Route("/api/services/{name}/scale", scale, methods=["POST"]),
    ])
