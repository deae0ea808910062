"""SPIFFE identities of the mesh: ``spiffe://<trust-domain>/svc/<service>``.

Only the shape Shoal issues is accepted (no query, fragment, port, userinfo, dot segments
or percent-escapes), so two spellings of one identity cannot exist and a policy's string
comparison is an identity comparison.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shoal.errors import CertificateError

__all__ = ["DEFAULT_TRUST_DOMAIN", "SpiffeId", "check_service_name", "check_trust_domain"]

DEFAULT_TRUST_DOMAIN = "shoal.local"
"""The trust domain when the manifest names none."""
MAX_ID_LENGTH = 2048  # the SPIFFE spec's limit for a whole ID

_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?$")
_SERVICE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$")


def check_trust_domain(value: object, *, what: str = "trust domain") -> str:
    """``value`` if it is a valid trust domain (lowercase DNS-like name), else an error."""
    if not isinstance(value, str) or not _TRUST_DOMAIN.fullmatch(value) or ".." in value:
        raise CertificateError(
            f"{what}: expected a lowercase name like 'shoal.local' (letters, digits, '.', "
            f"'-', '_'), got {_short(value)}")
    return value


def check_service_name(value: object, *, what: str = "service name") -> str:
    """``value`` if it is a valid service name (lowercase, 1-64 characters), else an error."""
    if not isinstance(value, str) or not _SERVICE.fullmatch(value) or ".." in value:
        raise CertificateError(
            f"{what}: expected a lowercase name like 'billing' (letters, digits, '.', "
            f"'-', '_'; at most 64), got {_short(value)}")
    return value


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A service identity in a trust domain."""

    trust_domain: str
    service: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        check_service_name(self.service)

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/svc/{self.service}"

    @property
    def uri(self) -> str:
        """The URI as it appears in a certificate's SAN."""
        return str(self)

    @classmethod
    def parse(cls, value: object, *, what: str = "SPIFFE id") -> SpiffeId:
        """Parse ``spiffe://<trust-domain>/svc/<service>``; anything else is an error."""
        if not isinstance(value, str) or len(value) > MAX_ID_LENGTH:
            raise CertificateError(f"{what}: expected 'spiffe://<trust-domain>/svc/<service>', "
                                   f"got {_short(value)}")
        rest = value[len("spiffe://"):] if value.startswith("spiffe://") else None
        parts = rest.split("/") if rest is not None else []
        if len(parts) != 3 or parts[1] != "svc":
            raise CertificateError(f"{what}: expected 'spiffe://<trust-domain>/svc/<service>', "
                                   f"got {_short(value)}")
        domain = check_trust_domain(parts[0], what=f"{what} {_short(value)}: trust domain")
        service = check_service_name(parts[2], what=f"{what} {_short(value)}: service")
        return cls(domain, service)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def spiffe_id_of_peercert(peercert: Mapping[str, Any] | None) -> str | None:
    """The one ``spiffe://`` URI SAN of a verified peer certificate (``getpeercert()``)."""
    if not peercert:
        return None
    uris = [v for kind, v in peercert.get("subjectAltName", ())
            if kind == "URI" and v.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else None
