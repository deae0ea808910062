"""Input checks shared by every Store adapter, so each refuses bad input the same way."""

from __future__ import annotations

import math

from shoal.errors import StoreError

MAX_KEY_CHARS = 1024
MAX_VALUE_BYTES = 1024 * 1024  # 1 MiB
DEFAULT_HISTORY = 10_000  # changes kept for watch replay (adapters keep 1x..2x this many)
_MAX_CODE_POINT = 0x10FFFF


def _show(key: str) -> str:
    return repr(key) if len(key) <= 60 else repr(key[:60]) + "..."


def check_key(key: object) -> str:
    """``key`` if it is a non-empty str of at most 1024 chars without NUL; else StoreError."""
    if not isinstance(key, str):
        raise StoreError(f"store key: must be a str, got {type(key).__name__}")
    if not key:
        raise StoreError("store key: must not be empty")
    if len(key) > MAX_KEY_CHARS:
        raise StoreError(
            f"store key {_show(key)}: {len(key)} chars, more than the limit of {MAX_KEY_CHARS}"
        )
    if "\0" in key:
        raise StoreError(f"store key {_show(key)}: must not contain NUL")
    try:
        key.encode()
    except UnicodeEncodeError:
        raise StoreError(f"store key {_show(key)}: not valid Unicode (lone surrogate)") from None
    return key


def check_prefix(prefix: object) -> str:
    """A key prefix for ``list``/``watch``: like a key, but may be empty (everything)."""
    if prefix == "":
        return ""
    try:
        return check_key(prefix)
    except StoreError as e:
        raise StoreError(str(e).replace("store key", "store prefix", 1)) from None


def check_value(key: str, value: object) -> bytes:
    """``value`` as bytes if it is bytes-like and at most 1 MiB; else StoreError."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise StoreError(f"store value for {_show(key)}: must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) > MAX_VALUE_BYTES:
        raise StoreError(
            f"store value for {_show(key)}: {len(value)} bytes, "
            f"more than the limit of {MAX_VALUE_BYTES} (1 MiB)"
        )
    return value


def check_ttl(ttl: object) -> float:
    """A lease TTL in seconds: a finite number > 0; else StoreError."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise StoreError(f"lease ttl: must be a number of seconds, got {type(ttl).__name__}")
    if not math.isfinite(ttl) or ttl <= 0:
        raise StoreError(f"lease ttl: must be a finite number of seconds > 0, got {ttl!r}")
    return float(ttl)


def check_revision(revision: object, what: str) -> int:
    """A revision argument: an int >= 0; else StoreError naming ``what``."""
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
        raise StoreError(f"{what}: must be an int >= 0, got {revision!r}")
    return revision


def prefix_end(prefix: str) -> str | None:
    """The smallest str greater than every str starting with ``prefix`` (None: no bound).

    Code-point order equals the byte order of UTF-8, which is how SQLite compares TEXT,
    so ``prefix <= key < prefix_end(prefix)`` is an index range scan.
    """
    chars = list(prefix)
    while chars:
        c = ord(chars.pop())
        if c < _MAX_CODE_POINT:
            nxt = c + 1
            if 0xD800 <= nxt <= 0xDFFF:  # surrogates cannot be stored; skip the gap
                nxt = 0xE000
            return "".join(chars) + chr(nxt)
    return None
