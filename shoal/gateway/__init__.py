"""The gateway: the HTTP edge of the mesh (server core in ``shoal.gateway.server``)."""

from shoal.gateway.server import (
    ClientRequestError,
    Headers,
    HttpServer,
    Request,
    Response,
    ServerLimits,
)

__all__ = ["ClientRequestError", "Headers", "HttpServer", "Request", "Response", "ServerLimits"]
