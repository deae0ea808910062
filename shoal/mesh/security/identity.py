"""An instance's identity: its own key, its certificate, the trust bundle, and renewal.

``request_identity(store, "billing", "billing-1")`` makes a P-256 key in this process,
puts only a CSR in the Store and waits for the signer's answer (see ``issuance``). The
key stays in memory (``Identity`` never shows it in ``repr`` and nothing logs it); it is
written only to a private temporary file for the instant ``ssl`` loads it (``ssl`` has
no in-memory key API) and removed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shoal.errors import CertificateError
from shoal.mesh.security.issuance import (
    BUNDLE_KEY,
    csr_digest,
    csr_key,
    decode_issued,
    issued_key,
)
from shoal.mesh.security.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId, spiffe_id_of_peercert

__all__ = [
    "RENEW_FRACTION",
    "Identity",
    "make_csr",
    "new_key",
    "request_identity",
    "spiffe_id_of_peercert",
]

RENEW_FRACTION = 2 / 3
"""Share of a certificate's life after which it is renewed."""
MAX_PEM_BYTES = 64 * 1024


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key (made here, never sent anywhere)."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId) -> bytes:
    """A PEM CSR for ``identity`` signed with ``key``."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.service)]))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(identity.uri)]), critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def _spiffe_id_of(cert: x509.Certificate, where: str) -> SpiffeId:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateError(f"{where}: the certificate has no SPIFFE URI SAN") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise CertificateError(f"{where}: expected one SPIFFE URI SAN, got {uris!r:.200}")
    return SpiffeId.parse(uris[0], what=f"{where}: URI SAN")


@dataclass(frozen=True, slots=True)
class Identity:
    """A certificate with its key and the roots to trust; ``repr`` never shows the key."""

    spiffe_id: SpiffeId
    certificate_pem: bytes
    key_pem: bytes = field(repr=False)
    bundle_pem: bytes = field(repr=False)
    not_before: float
    not_after: float

    @classmethod
    def from_pem(cls, certificate_pem: bytes, key_pem: bytes, bundle_pem: bytes, *,
                 where: str = "identity") -> Identity:
        """Check and hold a certificate, its key and a trust bundle (all PEM)."""
        for what, data in (("certificate", certificate_pem), ("key", key_pem),
                           ("trust bundle", bundle_pem)):
            if not isinstance(data, bytes) or not data or len(data) > MAX_PEM_BYTES:
                raise CertificateError(f"{where}: {what}: expected PEM of 1-{MAX_PEM_BYTES} "
                                       "bytes")
        try:
            cert = x509.load_pem_x509_certificate(certificate_pem)
        except ValueError as exc:
            raise CertificateError(f"{where}: certificate: not PEM X.509 ({exc})") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise CertificateError(f"{where}: key: not an unencrypted PEM key") from exc
        if key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            raise CertificateError(f"{where}: the key does not belong to the certificate")
        try:
            roots = x509.load_pem_x509_certificates(bundle_pem)
        except ValueError as exc:
            raise CertificateError(f"{where}: trust bundle: not PEM X.509 ({exc})") from None
        if not roots:
            raise CertificateError(f"{where}: trust bundle: no certificate")
        return cls(_spiffe_id_of(cert, where), certificate_pem, key_pem, bundle_pem,
                   cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp())

    @classmethod
    def load(cls, certificate: str | os.PathLike[str], key: str | os.PathLike[str],
             bundle: str | os.PathLike[str]) -> Identity:
        """From PEM files; errors name the file."""
        data = []
        for path in (certificate, key, bundle):
            try:
                with open(path, "rb") as f:
                    data.append(f.read(MAX_PEM_BYTES + 1))
            except OSError as exc:
                raise CertificateError(f"{path}: cannot read: {exc.strerror}") from None
        return cls.from_pem(*data, where=str(certificate))

    @property
    def renew_at(self) -> float:
        """When to get a new certificate: two thirds into this one's life."""
        return self.not_before + (self.not_after - self.not_before) * RENEW_FRACTION

    def with_bundle(self, bundle_pem: bytes) -> Identity:
        """The same certificate with another trust bundle (a root rotated)."""
        return Identity.from_pem(self.certificate_pem, self.key_pem, bundle_pem)

    def load_into(self, context: ssl.SSLContext) -> None:
        """Load certificate, key and trust bundle into ``context``."""
        with _private_files(self.certificate_pem, self.key_pem) as (cert_file, key_file):
            context.load_cert_chain(cert_file, key_file)
        context.load_verify_locations(cadata=self.bundle_pem.decode("ascii"))


@contextlib.contextmanager
def _private_files(cert: bytes, key: bytes) -> Iterator[tuple[str, str]]:
    """Certificate and key as files readable only by us, removed on exit."""
    directory = tempfile.mkdtemp(prefix="shoal-id-", dir=_private_tmp())
    paths = (os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem"))
    try:
        for path, data in zip(paths, (cert, key), strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        yield paths
    finally:
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        os.rmdir(directory)


def _private_tmp() -> str | None:
    shm = "/dev/shm"  # memory-backed where available: the key never touches a disk
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


async def request_identity(store: Any, service: str, instance: str, *,
                           trust_domain: str = DEFAULT_TRUST_DOMAIN, timeout: float = 10.0,
                           ) -> Identity:
    """Make a key here, ask the control plane's signer for a certificate through the
    Store, and wait for it (``CertificateError`` if refused or not answered in time)."""
    identity = SpiffeId(trust_domain, service)
    key = new_key()
    csr = make_csr(key, identity)
    digest = csr_digest(csr)
    answer_key = issued_key(service, instance)
    after = await store.revision()
    watch = store.watch(answer_key, after_revision=after)
    try:
        await store.put(csr_key(service, instance), csr)
        async with asyncio.timeout(timeout):
            async for change in watch:
                if change.key != answer_key or change.kind != "put" or change.value is None:
                    continue
                record = decode_issued(change.value, where=answer_key)
                if record.csr_sha256 != digest:
                    continue  # an answer to an earlier request of this name
                if record.error:
                    raise CertificateError(f"certificate for {identity} refused: "
                                           f"{record.error}")
                key_pem = key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
                return Identity.from_pem(record.certificate.encode(), key_pem,
                                         record.bundle.encode(), where=answer_key)
    except TimeoutError:
        raise CertificateError(
            f"certificate for {identity}: no answer from the control plane's signer within "
            f"{timeout:g}s (is the control plane running?)") from None
    finally:
        with contextlib.suppress(Exception):
            await watch.aclose()  # type: ignore[attr-defined]
    raise CertificateError(f"certificate for {identity}: the store's watch ended")


async def fetch_bundle(store: Any) -> bytes | None:
    """The trust bundle the signer keeps in the Store, if any."""
    entry = await store.get(BUNDLE_KEY)
    return None if entry is None else entry.value


def seconds_until(when: float, clock: Callable[[], float] = time.time) -> float:
    """Seconds from now to ``when`` (at least 0)."""
    return max(when - clock(), 0.0)
