"""Durations (`250ms`, `2s`, `1m`) and sizes (`64KiB`, `1MiB`) as config values."""

from __future__ import annotations

import re

from shoal.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
                   "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_duration(value: str | float | int | None, *, name: str = "duration") -> float | None:
    """Seconds from ``"250ms"``, ``"2s"``, ``"1m"`` or plain seconds; None stays None."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        if isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"{name}: must not be negative, got {value!r}")
        return None if value is None else float(value)
    if isinstance(value, str) and len(value) <= 32:
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ConfigError(f"{name}: expected a duration like '250ms', '2s' or '1m', got {value!r}")


def parse_size(value: str | int | None, *, name: str = "size") -> int | None:
    """Bytes from ``"64KiB"``, ``"1MiB"``, ``"10MB"`` or plain bytes; None stays None."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        if isinstance(value, int) and value < 0:
            raise ConfigError(f"{name}: must not be negative, got {value!r}")
        return value
    if isinstance(value, str) and len(value) <= 32:
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    raise ConfigError(f"{name}: expected a size like '64KiB' or '1MiB', got {value!r}")
