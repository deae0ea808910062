"""Certificates for security tests: a CA per test and identities issued from CSRs."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from shoal.control.ca import CertificateAuthority
from shoal.mesh.security.identity import Identity, make_csr, new_key
from shoal.mesh.security.spiffe import SpiffeId


def issue(ca: CertificateAuthority, service: str, *, bundle: bytes | None = None) -> Identity:
    """An identity for ``service`` the way an instance gets one: own key, CSR, signature."""
    key = new_key()
    cert = ca.sign(make_csr(key, SpiffeId(ca.trust_domain, service)), service)
    return Identity.from_pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
        bundle if bundle is not None else ca.bundle_pem())


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()
