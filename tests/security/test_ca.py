"""The CA's pure logic (clock injected), its files, identities and SPIFFE ids."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from shoal.control.ca import LEAF_LIFETIME, CAFiles, CertificateAuthority
from shoal.errors import CertificateError
from shoal.mesh.security.identity import Identity, make_csr, new_key
from shoal.mesh.security.spiffe import SpiffeId
from tests.security.conftest import issue

T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_issues_a_24h_spiffe_leaf_signed_by_the_root(ca: CertificateAuthority) -> None:
    key = new_key()
    cert = ca.sign(make_csr(key, SpiffeId("shoal.local", "billing")), "billing")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://shoal.local/svc/billing"]
    life = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
    assert LEAF_LIFETIME <= life <= LEAF_LIFETIME + 301
    cert.verify_directly_issued_by(ca.active.certificate)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()


def test_identity_renews_at_two_thirds_and_hides_its_key(ca: CertificateAuthority) -> None:
    identity = issue(ca, "orders")
    life = identity.not_after - identity.not_before
    assert identity.renew_at == pytest.approx(identity.not_before + life * 2 / 3)
    assert str(identity.spiffe_id) == "spiffe://shoal.local/svc/orders"
    assert b"PRIVATE" in identity.key_pem
    assert "PRIVATE" not in repr(identity) and "key_pem" not in repr(identity)


def _csr_with_san(key: object, uris: list[str]) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
    if uris:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(  # type: ignore[arg-type]
        serialization.Encoding.PEM)


@pytest.mark.parametrize(("csr", "message"), [
    (lambda: b"garbage", "not a PEM certificate request"),
    (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
     "not a PEM certificate request"),
    (lambda: b"A" * 20000, "at most"),
    (lambda: _csr_with_san(new_key(), ["spiffe://shoal.local/svc/admin"]), "only"),
    (lambda: _csr_with_san(new_key(), ["spiffe://shoal.local/svc/billing",
                                       "spiffe://shoal.local/svc/admin"]), "only"),
    (lambda: _csr_with_san(ec.generate_private_key(ec.SECP384R1()), []), "P-256"),
    (lambda: _csr_with_san(rsa.generate_private_key(65537, 2048), []), "P-256"),
])
def test_refuses_hostile_csrs(ca: CertificateAuthority, csr: object, message: str) -> None:
    with pytest.raises(CertificateError, match=message):
        ca.sign(csr(), "billing")  # type: ignore[operator]


def test_refuses_a_csr_whose_signature_was_tampered(ca: CertificateAuthority) -> None:
    der = bytearray(x509.load_pem_x509_csr(
        make_csr(new_key(), SpiffeId("shoal.local", "billing"))).public_bytes(
        serialization.Encoding.DER))
    der[-5] ^= 0xFF  # inside the signature
    pem = (b"-----BEGIN CERTIFICATE REQUEST-----\n"
           + __import__("base64").encodebytes(bytes(der))
           + b"-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(CertificateError, match=r"signature|not a PEM"):
        ca.sign(pem, "billing")


@pytest.mark.parametrize("service", ["", "Billing", "../etc", "a/b", "x" * 65, "svc\n", 7])
def test_refuses_bad_service_names(ca: CertificateAuthority, service: object) -> None:
    with pytest.raises(CertificateError, match="service"):
        ca.sign(make_csr(new_key(), SpiffeId("shoal.local", "ok")), service)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [
    "spiffe://shoal.local/svc/billing/extra", "spiffe://shoal.local/ns/billing",
    "https://shoal.local/svc/billing", "spiffe://Shoal.local/svc/billing",
    "spiffe://shoal.local/svc/%62illing", "spiffe://shoal.local:443/svc/billing",
    "spiffe://shoal.local/svc/billing?x=1", "spiffe://shoal.local/svc/..", "",
    "spiffe://" + "a" * 3000, None,
])
def test_spiffe_ids_have_exactly_one_spelling(value: object) -> None:
    with pytest.raises(CertificateError):
        SpiffeId.parse(value)


def test_spiffe_id_round_trip() -> None:
    sid = SpiffeId.parse("spiffe://prod.example/svc/billing")
    assert (sid.trust_domain, sid.service, str(sid)) == (
        "prod.example", "billing", "spiffe://prod.example/svc/billing")


def test_root_rotation_keeps_the_old_root_trusted_for_the_overlap() -> None:
    clock = Clock()
    ca = CertificateAuthority.create(clock=clock)
    old = ca.active
    old_leaf = issue(ca, "billing")
    with pytest.raises(CertificateError, match="shorter than a certificate's life"):
        ca.rotate_root(overlap=3600)
    new = ca.rotate_root(overlap=2 * LEAF_LIFETIME)
    assert ca.active is new and new is not old
    assert [r.fingerprint for r in ca.bundle()] == [old.fingerprint, new.fingerprint]
    new_leaf = ca.sign(make_csr(new_key(), SpiffeId("shoal.local", "billing")), "billing")
    new_leaf.verify_directly_issued_by(new.certificate)
    assert old_leaf.bundle_pem != ca.bundle_pem()
    clock.now += 2 * LEAF_LIFETIME + 1
    assert [r.fingerprint for r in ca.bundle()] == [new.fingerprint]


def test_retire_takes_a_root_out_now_but_never_the_active_one() -> None:
    ca = CertificateAuthority.create()
    old = ca.active
    ca.rotate_root()
    with pytest.raises(CertificateError, match="active root"):
        ca.retire(ca.active.fingerprint[:16])
    with pytest.raises(CertificateError, match="0 roots match"):
        ca.retire("zz")
    ca.retire(old.fingerprint[:12])
    assert [r.fingerprint for r in ca.bundle()] == [ca.active.fingerprint]


def test_leaves_never_outlive_their_root() -> None:
    clock = Clock()
    ca = CertificateAuthority.create(clock=clock)
    clock.now = ca.active.not_after - 3600
    leaf = ca.sign(make_csr(new_key(), SpiffeId("shoal.local", "a")), "a")
    assert leaf.not_valid_after_utc.timestamp() <= ca.active.not_after
    clock.now = ca.active.not_after + 1
    with pytest.raises(CertificateError, match="expired"):
        ca.sign(make_csr(new_key(), SpiffeId("shoal.local", "a")), "a")


def test_ca_files_keep_keys_private_and_round_trip(tmp_path: Path) -> None:
    files = CAFiles(tmp_path)
    ca = files.load_or_create(trust_domain="prod.example")
    ca.rotate_root()
    files.save(ca)
    assert stat.S_IMODE(os.stat(files.directory).st_mode) == 0o700
    keys = list(files.directory.glob("*.key"))
    assert len(keys) == 2
    assert all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    again = files.load()
    assert again.trust_domain == "prod.example"
    assert [r.fingerprint for r in again.roots] == [r.fingerprint for r in ca.roots]
    assert again.roots[0].retire_at == ca.roots[0].retire_at
    assert files.load_or_create().active.fingerprint == ca.active.fingerprint


@pytest.mark.parametrize("index", ["{", "[]", '{"trust_domain": "x"}',
                                   '{"trust_domain": "x", "roots": [{"nope": 1}]}',
                                   '{"trust_domain": "x", "roots": [{"fingerprint": "ab"}]}'])
def test_corrupt_ca_files_name_the_file(tmp_path: Path, index: str) -> None:
    files = CAFiles(tmp_path)
    files.directory.mkdir()
    files.index.write_text(index)
    with pytest.raises(CertificateError, match=r"roots\.json|ab\.crt"):
        files.load()


def test_a_root_file_that_does_not_match_its_index_is_refused(tmp_path: Path) -> None:
    files = CAFiles(tmp_path)
    ca = files.load_or_create()
    other = CertificateAuthority.create()
    (files.directory / f"{ca.active.fingerprint}.crt").write_bytes(
        other.active.certificate.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CertificateError, match="does not match"):
        files.load()
    json.loads(files.index.read_text())  # the index itself is intact


def test_identity_refuses_a_key_of_another_certificate(ca: CertificateAuthority) -> None:
    a, b = issue(ca, "a"), issue(ca, "b")
    with pytest.raises(CertificateError, match="does not belong"):
        Identity.from_pem(a.certificate_pem, b.key_pem, a.bundle_pem)
    with pytest.raises(CertificateError, match="trust bundle"):
        Identity.from_pem(a.certificate_pem, a.key_pem, b"junk")
    with pytest.raises(CertificateError, match="certificate"):
        Identity.from_pem(b"x" * 70000, a.key_pem, a.bundle_pem)
