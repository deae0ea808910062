"""Services for the zero-trust test of ``shoal up`` (tests/control/test_mtls_up.py)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from shoal.errors import Forbidden
from shoal.mesh.security.asgi_server import peer_identity
from shoal.service import Service

back = Service("back")


@back.get("/back/who")
async def who(request: Request) -> JSONResponse:
    """Who called, as the server saw it."""
    return JSONResponse({"peer": peer_identity(request.scope)})


@back.get("/back/admin/x")
async def admin(request: Request) -> JSONResponse:
    """Denied by the manifest's policy: never reached."""
    return JSONResponse({"secret": True})


def caller(name: str) -> Service:
    """A service that calls ``back`` and publishes on demand."""
    svc = Service(name)

    @svc.get(f"/{name}/call")
    async def call(request: Request) -> JSONResponse:
        resp = await svc.call("back", "GET", "/back/who")
        return JSONResponse({"status": resp.status, "body": await resp.json()})

    @svc.post(f"/{name}/publish/{{topic}}")
    async def publish(request: Request) -> JSONResponse:
        try:
            await svc.publish(request.path_params["topic"], {"hello": name})
        except Forbidden as e:
            return JSONResponse({"error": str(e), "rule": e.rule}, status_code=403)
        return JSONResponse({"published": True})

    return svc


front = caller("front")
stranger = caller("stranger")
