"""Zero trust in the mesh: SPIFFE identities, mutual TLS, authorization policies.

* ``spiffe`` - ``SpiffeId`` (``spiffe://<trust-domain>/svc/<service>``), strict parsing.
* ``issuance`` - the Store keys and record through which instances get certificates.
* ``identity`` - ``Identity`` (certificate + key kept in memory + trust bundle),
  ``request_identity`` (key made here, only a CSR sent).
* ``mode`` - ``MtlsMode`` (strict / permissive / off).
* ``tls`` - ``MeshTLS`` (server and per-service client contexts, hot rotation),
  ``PermissiveListener``, ``rotate_forever``.
* ``authz`` - ``AuthorizationPolicy`` (DENY before ALLOW, default deny once an ALLOW
  exists; decisions name their rule) and ``authorize`` (403 for ``HttpServer`` handlers).
* ``topics`` - ``TopicPolicy``: which services may publish / subscribe which topics.

Names are imported on first use: a service with mTLS off never loads ``cryptography``.
"""

import importlib
from typing import Any

_HOMES = {
    "DEFAULT_TRUST_DOMAIN": "spiffe", "SpiffeId": "spiffe", "MtlsMode": "mode",
    "Identity": "identity", "request_identity": "identity", "spiffe_id_of_peercert": "spiffe",
    "MeshTLS": "tls", "PermissiveListener": "tls", "rotate_forever": "tls",
}

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "Identity",
    "MeshTLS",
    "MtlsMode",
    "PermissiveListener",
    "SpiffeId",
    "request_identity",
    "rotate_forever",
    "spiffe_id_of_peercert",
]


def __getattr__(name: str) -> Any:
    """The exported names, imported from their module on first use."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
