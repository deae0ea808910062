"""Zero trust in the mesh: SPIFFE identities, mutual TLS, authorization policies.

* ``spiffe`` - ``SpiffeId`` (``spiffe://<trust-domain>/svc/<service>``), strict parsing.
* ``issuance`` - the Store keys and record through which instances get certificates.
* ``identity`` - ``Identity`` (certificate + key kept in memory + trust bundle),
  ``request_identity`` (key made here, only a CSR sent).
* ``tls`` - ``MeshTLS`` (server and per-service client contexts, hot rotation),
  ``MtlsMode`` (strict / permissive / off), ``PermissiveListener``, ``rotate_forever``.
* ``authz`` - ``AuthorizationPolicy`` (DENY before ALLOW, default deny once an ALLOW
  exists; decisions name their rule) and ``authorize`` (403 for ``HttpServer`` handlers).
* ``topics`` - ``TopicPolicy``: which services may publish / subscribe which topics.
"""

from shoal.mesh.security.identity import Identity, request_identity, spiffe_id_of_peercert
from shoal.mesh.security.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from shoal.mesh.security.tls import MeshTLS, MtlsMode, PermissiveListener, rotate_forever

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
