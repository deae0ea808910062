"""An app for the fork server's tests: its instances say in which process this module was
imported and which modules they imported themselves after the fork."""

from __future__ import annotations

import os
import sys

from starlette.requests import Request
from starlette.responses import JSONResponse

from shoal import Service
from shoal.control import forkserver

IMPORTED_IN = os.getpid()


def probe(name: str, imported_in: int) -> Service:
    """A service answering ``GET /imports``; ``imported_in``: its module's import pid."""
    svc = Service(name)

    @svc.get("/imports")
    async def imports(request: Request) -> JSONResponse:
        at_fork = forkserver.MODULES_AT_FORK
        own = None if at_fork is None else sorted(set(sys.modules) - at_fork)
        return JSONResponse({"imported_in": imported_in, "pid": os.getpid(),
                             "imported_after_fork": own})

    return svc


svc = probe("preload-probe", IMPORTED_IN)
