"""``MtlsMode``: the manifest's ``security.mtls`` (pure: no TLS or cryptography imported, so
a service with mTLS off never loads them)."""

from __future__ import annotations

import enum

from shoal.errors import ConfigError


class MtlsMode(enum.StrEnum):
    """``security.mtls`` in the manifest."""

    STRICT = "strict"
    PERMISSIVE = "permissive"
    OFF = "off"

    @classmethod
    def parse(cls, value: object, *, where: str = "security.mtls") -> MtlsMode:
        """From a manifest value; a ``ConfigError`` names the allowed ones."""
        try:
            return cls(value)  # type: ignore[arg-type]
        except ValueError:
            raise ConfigError(f"{where}: expected strict, permissive or off, got "
                              f"{value!r:.60}") from None

    @property
    def accepts_plaintext(self) -> bool:
        """Whether a server in this mode takes connections without TLS."""
        return self is not MtlsMode.STRICT

    @property
    def uses_tls(self) -> bool:
        """Whether servers in this mode terminate TLS at all."""
        return self is not MtlsMode.OFF
