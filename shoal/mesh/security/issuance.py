"""How an instance gets its certificate through the Store (the wire format of issuance).

The instance makes its own key and puts only a CSR under ``certs/csr/<service>/<instance>``;
the control plane's signer (``shoal.control.ca.CertificateSigner``) watches that prefix,
signs, writes an ``IssuedCertificate`` to ``certs/issued/<service>/<instance>`` and deletes
the CSR. The trust bundle (every root currently trusted, PEM) is kept at ``certs/bundle``.
The record carries the SHA-256 of the CSR it answers, so an instance never takes a
certificate issued for an earlier key of the same name.
"""

from __future__ import annotations

import hashlib

import msgspec

from shoal.errors import CertificateError
from shoal.mesh.security.spiffe import check_service_name

__all__ = [
    "BUNDLE_KEY",
    "CSR_PREFIX",
    "ISSUED_PREFIX",
    "MAX_CSR_BYTES",
    "IssuedCertificate",
    "csr_digest",
    "csr_key",
    "decode_issued",
    "issued_key",
    "split_request_key",
]

CSR_PREFIX = "certs/csr/"
ISSUED_PREFIX = "certs/issued/"
BUNDLE_KEY = "certs/bundle"
MAX_CSR_BYTES = 16 * 1024
"""A P-256 CSR is under 1 KiB; anything beyond this is refused unparsed."""
MAX_INSTANCE_NAME = 128


class IssuedCertificate(msgspec.Struct, frozen=True):
    """The signer's answer to one CSR: a certificate and the bundle, or an error."""

    service: str
    instance: str
    csr_sha256: str
    certificate: str = ""  # PEM, the leaf
    bundle: str = ""  # PEM, every trusted root
    not_after: float = 0.0  # unix seconds
    error: str = ""


_decoder = msgspec.json.Decoder(IssuedCertificate)


def decode_issued(raw: bytes, *, where: str) -> IssuedCertificate:
    """An ``IssuedCertificate`` from its JSON, or ``CertificateError`` naming ``where``."""
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise CertificateError(f"{where}: malformed issued-certificate record: {exc}") from None


def csr_digest(csr_pem: bytes) -> str:
    """The hex SHA-256 that ties an answer to its request."""
    return hashlib.sha256(csr_pem).hexdigest()


def _check_instance(instance: object) -> str:
    if (not isinstance(instance, str) or not 0 < len(instance) <= MAX_INSTANCE_NAME
            or not instance.isprintable() or "/" in instance or instance in (".", "..")):
        raise CertificateError(f"instance name: expected 1-{MAX_INSTANCE_NAME} printable "
                               f"characters without '/', got {instance!r:.80}")
    return instance


def csr_key(service: str, instance: str) -> str:
    """Where ``instance`` of ``service`` puts its CSR."""
    return f"{CSR_PREFIX}{check_service_name(service)}/{_check_instance(instance)}"


def issued_key(service: str, instance: str) -> str:
    """Where the signer writes the answer for ``instance`` of ``service``."""
    return f"{ISSUED_PREFIX}{check_service_name(service)}/{_check_instance(instance)}"


def split_request_key(key: str) -> tuple[str, str]:
    """``(service, instance)`` from a CSR or issued key; ``CertificateError`` if malformed."""
    for prefix in (CSR_PREFIX, ISSUED_PREFIX):
        if key.startswith(prefix):
            service, sep, instance = key[len(prefix):].partition("/")
            if sep:
                return (check_service_name(service, what=f"{key!r:.100}: service"),
                        _check_instance(instance))
    raise CertificateError(f"store key {key!r:.100}: expected {CSR_PREFIX}<service>/<instance>")
