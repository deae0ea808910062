"""The mesh's certificate authority: an ECDSA P-256 root and 24-hour SPIFFE certificates.

Three parts, from pure to I/O:

* ``CertificateAuthority`` - pure signing logic on an injected clock: verifies a CSR
  (signature, P-256 key, no SAN other than the identity asked for) and issues a leaf with
  the URI SAN ``spiffe://<trust-domain>/svc/<service>``; rotates the root with an overlap
  (the old root stays in the trust bundle until it expires or ``retire_at`` passes, so
  certificates it signed keep working while instances rotate onto the new one).
* ``CAFiles`` - the roots on disk in the state directory (``.shoal/ca/``): directory 0700,
  keys 0600, written atomically.
* ``CertificateSigner`` - the control plane's loop over the Store: answers every CSR put
  under ``certs/csr/`` (see ``shoal.mesh.security.issuance``) and keeps ``certs/bundle``.

Decisions, written down once:

* **Keys never travel.** Instances send CSRs; the CA never sees an instance key, and the
  root key never leaves ``CAFiles``. Nothing here logs key material or whole CSRs.
* **Who may ask for which name** is whoever may write the Store: on one machine that is
  the state directory's owner, the same trust boundary as the root key. (Istio
  authenticates CSRs with a Kubernetes token; a join token per instance is future work.)
* **Leaves live 24 h** (``not_before`` backdated 5 minutes for clock skew) and never past
  their root; instances renew at two thirds of their life.
* **A new root signs at once.** Its certificate joins ``certs/bundle`` before the first
  leaf it signs can be handed out (the signer publishes the bundle first), and every
  instance watches the bundle; the window is one Store watch round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal.control.timeline import mark
from shoal.errors import CertificateError, ShoalError
from shoal.mesh.security.issuance import (
    BUNDLE_KEY,
    CSR_PREFIX,
    MAX_CSR_BYTES,
    IssuedCertificate,
    csr_digest,
    issued_key,
    split_request_key,
)
from shoal.mesh.security.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId, check_trust_domain
from shoal.store.base import Store

__all__ = [
    "LEAF_LIFETIME",
    "ROOT_LIFETIME",
    "CAFiles",
    "CertificateAuthority",
    "CertificateSigner",
    "Root",
]

log = logging.getLogger("shoal.control.ca")

ROOT_LIFETIME = 365 * 86400.0
"""Seconds a root certificate is valid."""
LEAF_LIFETIME = 24 * 3600.0
"""Seconds an instance certificate is valid."""
CLOCK_SKEW = 300.0
"""Seconds a leaf's ``not_before`` is backdated."""


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint, hex, as ``shoal certs`` shows it."""
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(slots=True)
class Root:
    """One root: its certificate, its key, and when it leaves the trust bundle (if set)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    retire_at: float | None = None

    @property
    def not_after(self) -> float:
        """Expiry, unix seconds."""
        return self.certificate.not_valid_after_utc.timestamp()

    @property
    def fingerprint(self) -> str:
        """SHA-256 fingerprint, hex."""
        return fingerprint(self.certificate)

    def trusted_at(self, now: float) -> bool:
        """In the trust bundle at ``now``: not expired, not retired."""
        return now < self.not_after and (self.retire_at is None or now < self.retire_at)


class CertificateAuthority:
    """Pure CA logic: issue leaves from CSRs, rotate and retire roots (clock injected)."""

    def __init__(self, roots: list[Root], *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 clock: Callable[[], float] = time.time) -> None:
        if not roots:
            raise CertificateError("certificate authority: no root")
        self.roots = roots  # oldest first; the last one signs
        self.trust_domain = check_trust_domain(trust_domain)
        self.clock = clock

    @classmethod
    def create(cls, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
               clock: Callable[[], float] = time.time) -> CertificateAuthority:
        """A new CA with a fresh root."""
        check_trust_domain(trust_domain)
        return cls([_new_root(trust_domain, clock(), 1)], trust_domain=trust_domain,
                   clock=clock)

    @property
    def active(self) -> Root:
        """The root that signs new certificates."""
        return self.roots[-1]

    def bundle(self) -> list[Root]:
        """The roots instances trust now."""
        now = self.clock()
        return [r for r in self.roots if r.trusted_at(now)]

    def bundle_pem(self) -> bytes:
        """The trust bundle, PEM."""
        return b"".join(r.certificate.public_bytes(serialization.Encoding.PEM)
                        for r in self.bundle())

    def rotate_root(self, *, overlap: float = 2 * LEAF_LIFETIME) -> Root:
        """Make a new root the signer; the old ones stay trusted for ``overlap`` seconds
        (at least one leaf lifetime, so every leaf they signed is renewed meanwhile)."""
        if overlap < LEAF_LIFETIME:
            raise CertificateError(
                f"root rotation: overlap of {overlap:g}s is shorter than a certificate's "
                f"life ({LEAF_LIFETIME:g}s): leaves of the old root would stop working")
        now = self.clock()
        for root in self.roots:
            if root.retire_at is None or root.retire_at > now + overlap:
                root.retire_at = now + overlap
        new = _new_root(self.trust_domain, now, len(self.roots) + 1)
        self.roots = [r for r in self.roots if r.trusted_at(now)] + [new]
        return new

    def retire(self, fingerprint_prefix: str) -> Root:
        """Take a root out of the bundle now (not the active one)."""
        matches = [r for r in self.roots if fingerprint_prefix and
                   r.fingerprint.startswith(fingerprint_prefix.lower())]
        if len(matches) != 1:
            raise CertificateError(f"retire root: {len(matches)} roots match fingerprint "
                                   f"{fingerprint_prefix!r}; give a longer unique prefix")
        if matches[0] is self.active:
            raise CertificateError("retire root: that is the active root; rotate first")
        matches[0].retire_at = self.clock()
        return matches[0]

    def sign(self, csr_pem: bytes, service: str) -> x509.Certificate:
        """A 24 h certificate for ``service`` from a CSR, or ``CertificateError`` saying why."""
        identity = SpiffeId(self.trust_domain, service)
        csr = load_csr(csr_pem)
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise CertificateError(f"CSR for {identity}: the key must be ECDSA P-256")
        with contextlib.suppress(x509.ExtensionNotFound):
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            asked = [str(n.value) for n in san]
            if asked != [identity.uri]:
                raise CertificateError(f"CSR for {identity}: it asks for {asked!r}; only "
                                       f"{identity.uri!r} may be issued to {service!r}")
        root, now = self.active, self.clock()
        if not root.trusted_at(now):
            raise CertificateError("certificate authority: the active root has expired; "
                                   "run `shoal certs rotate-root`")
        not_after = min(now + LEAF_LIFETIME, root.not_after)
        issuer_ski = root.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(root.certificate.subject)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - CLOCK_SKEW))
            .not_valid_after(_utc(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(identity.uri)]), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
                critical=False)
        )
        return builder.sign(root.key, hashes.SHA256())


def load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """Parse and verify a PEM CSR (size-bounded); ``CertificateError`` if it is not one."""
    if not isinstance(csr_pem, bytes) or len(csr_pem) > MAX_CSR_BYTES:
        size = len(csr_pem) if isinstance(csr_pem, bytes) else type(csr_pem).__name__
        raise CertificateError(f"CSR: expected PEM bytes of at most {MAX_CSR_BYTES}, got {size}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"CSR: not a PEM certificate request ({exc})") from None
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, ValueError, TypeError):
        valid = False
    if not valid:
        raise CertificateError("CSR: its signature does not verify (not made with its key)")
    return csr


def _new_root(trust_domain: str, now: float, generation: int) -> Root:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Shoal"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"Shoal root CA {trust_domain} #{generation}"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - CLOCK_SKEW))
        .not_valid_after(_utc(now + ROOT_LIFETIME))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return Root(cert, key)


# -- on disk ---------------------------------------------------------------------------------
class CAFiles:
    """The CA's roots in ``<state>/ca/``: ``roots.json`` (order, retirement) and one
    ``<fingerprint>.crt`` / ``.key`` pair per root (keys mode 0600, directory 0700)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.directory = Path(state_dir) / "ca"
        self.index = self.directory / "roots.json"

    def exists(self) -> bool:
        """Whether a CA was created here."""
        return self.index.exists()

    def stamp(self) -> float:
        """When the roots last changed (the index's mtime; 0 if absent)."""
        try:
            return self.index.stat().st_mtime_ns / 1e9
        except OSError:
            return 0.0

    def load_or_create(self, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                       clock: Callable[[], float] = time.time) -> CertificateAuthority:
        """The CA kept here, made (and saved) on first use."""
        if self.exists():
            return self.load(clock=clock)
        ca = CertificateAuthority.create(trust_domain=trust_domain, clock=clock)
        self.save(ca)
        return ca

    def load(self, *, clock: Callable[[], float] = time.time) -> CertificateAuthority:
        """Read the CA; errors name the file."""
        try:
            index = json.loads(self.index.read_text())
            domain = index["trust_domain"]
            entries = index["roots"]
            if not isinstance(entries, list):
                raise TypeError("roots is not a list")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CertificateError(f"{self.index}: cannot read the CA index: {exc}") from None
        roots = []
        for entry in entries:
            try:
                fp, retire_at = str(entry["fingerprint"]), entry.get("retire_at")
            except (KeyError, TypeError, AttributeError):
                raise CertificateError(
                    f"{self.index}: malformed root entry {entry!r:.80}") from None
            crt, keyfile = self.directory / f"{fp}.crt", self.directory / f"{fp}.key"
            try:
                cert = x509.load_pem_x509_certificate(crt.read_bytes())
                key = serialization.load_pem_private_key(keyfile.read_bytes(), password=None)
            except (OSError, ValueError, TypeError) as exc:
                raise CertificateError(f"{crt} / {keyfile}: cannot load root: {exc}") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey) or fingerprint(cert) != fp:
                raise CertificateError(f"{crt}: does not match its entry in {self.index}")
            roots.append(Root(cert, key, None if retire_at is None else float(retire_at)))
        return CertificateAuthority(roots, trust_domain=domain, clock=clock)

    def save(self, ca: CertificateAuthority) -> None:
        """Write every root and the index (atomically, keys 0600)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        for root in ca.roots:
            fp = root.fingerprint
            _write(self.directory / f"{fp}.crt",
                   root.certificate.public_bytes(serialization.Encoding.PEM), 0o644)
            _write(self.directory / f"{fp}.key", root.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()), 0o600)
        index = {"trust_domain": ca.trust_domain,
                 "roots": [{"fingerprint": r.fingerprint, "retire_at": r.retire_at}
                           for r in ca.roots]}
        _write(self.index, json.dumps(index, indent=1).encode(), 0o600)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# -- over the Store --------------------------------------------------------------------------
_encoder = msgspec.json.Encoder()


class CertificateSigner:
    """Answers CSRs put in the Store and keeps the trust bundle there.

    ``ca`` is a callable returning the current CA (``CAFiles`` reloaded when its index
    changes, so ``shoal certs rotate-root`` in another process takes effect here).
    """

    def __init__(self, store: Store, ca: Callable[[], CertificateAuthority]) -> None:
        self.store = store
        self._ca = ca
        self.issued = 0
        self.refused = 0
        self._bundle: bytes | None = None

    @classmethod
    def from_files(cls, store: Store, files: CAFiles, *,
                   trust_domain: str = DEFAULT_TRUST_DOMAIN) -> CertificateSigner:
        """A signer on the CA kept in ``files`` (created if absent, reloaded on change)."""
        held = [files.load_or_create(trust_domain=trust_domain), files.stamp()]

        def current() -> CertificateAuthority:
            stamp = files.stamp()
            if stamp != held[1]:
                held[0], held[1] = files.load(), stamp
            return held[0]  # type: ignore[return-value]

        return cls(store, current)

    async def publish_bundle(self) -> bytes:
        """Write ``certs/bundle`` if it changed; returns it."""
        bundle = self._ca().bundle_pem()
        if bundle != self._bundle:
            current = await self.store.get(BUNDLE_KEY)
            if current is None or current.value != bundle:
                await self.store.put(BUNDLE_KEY, bundle)
            self._bundle = bundle
        return bundle

    async def answer(self, key: str, csr_pem: bytes, revision: int | None = None) -> None:
        """Sign (or refuse) the CSR stored at ``key``, write the answer, delete the CSR."""
        try:
            service, instance = split_request_key(key)
        except CertificateError as exc:
            log.warning("certificate signer: ignoring %s", exc)
            await self.store.delete(key, expected_revision=revision)
            return
        digest = csr_digest(csr_pem)
        try:
            bundle = await self.publish_bundle()
            cert = self._ca().sign(csr_pem, service)
            record = IssuedCertificate(
                service, instance, digest,
                certificate=cert.public_bytes(serialization.Encoding.PEM).decode(),
                bundle=bundle.decode(), not_after=cert.not_valid_after_utc.timestamp())
            self.issued += 1
        except CertificateError as exc:
            log.warning("certificate signer: refused CSR of %s/%s: %s", service, instance, exc)
            record = IssuedCertificate(service, instance, digest, error=str(exc))
            self.refused += 1
        await self.store.put(issued_key(service, instance), _encoder.encode(record))
        mark(f"ca: answered {instance}")
        await self.store.delete(key, expected_revision=revision)

    async def run(self, *, bundle_check: float = 60.0) -> None:
        """Answer pending CSRs, then every new one, until cancelled; re-publish the bundle
        every ``bundle_check`` seconds (a root rotated or retired by another process)."""
        await self.publish_bundle()
        after = await self.store.revision()
        listed = {}
        for entry in await self.store.list(CSR_PREFIX):  # may include puts after ``after``
            listed[entry.key] = entry.revision
            await self._answer_safely(entry.key, entry.value, entry.revision)
        ticker = asyncio.get_running_loop().create_task(self._refresh_bundle(bundle_check))
        try:
            async for change in self.store.watch(CSR_PREFIX, after_revision=after):
                if change.kind == "put" and change.value is not None and \
                        listed.pop(change.key, None) != change.revision:
                    await self._answer_safely(change.key, change.value, change.revision)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker

    async def _answer_safely(self, key: str, value: bytes, revision: int) -> None:
        try:
            await self.answer(key, value, revision)
        except ShoalError as exc:  # the store failed: the next start answers it
            log.error("certificate signer: could not answer %s: %s", key, exc)

    async def _refresh_bundle(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.publish_bundle()
            except (ShoalError, CertificateError) as exc:  # pragma: no cover - logged
                log.error("certificate signer: could not publish the bundle: %s", exc)
