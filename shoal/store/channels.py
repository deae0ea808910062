"""Which wake-up channels a Store write touches and a watch listens to (pure).

The SQLite Store wakes watchers in other processes through files written after each
commit (``shoal.store.sqlite``). Waking every watcher on every write made each of the
shop's nine processes read the change log ~5 times per order, though almost all writes
(``shop/...`` records) were under prefixes nobody watched. So keys are sorted into
channels by their first path segments, and a watch listens only to the channel every key
under its prefix falls in:

* a prefix with two complete segments (``shoal/registry/``, ``shoal/groups/t/g/``)
  listens to the channel of those two segments;
* a prefix with one (``certs/bundle``, ``shoal/``) to the channel of the first segment;
* any other (``""``, ``sho``) to ``all``, which every write touches.

A write touches ``all``, its key's one-segment channel and (when the key has a second
segment) its two-segment channel. Channels are hashed into ``BUCKETS`` file names, so
unrelated prefixes may share one: a spurious wake-up costs a read, never a lost change.
Lease grants, renewals and revocations touch ``leases``, which every watching process
listens to (its sweep timer follows the earliest expiry).
"""

from __future__ import annotations

import zlib

BUCKETS = 64
ALL = "all"
LEASES = "leases"
NAMES = (ALL, LEASES, *(f"c{i:02d}" for i in range(BUCKETS)))


def _bucket(segments: str) -> str:
    return f"c{zlib.crc32(segments.encode('utf-8', 'surrogatepass')) % BUCKETS:02d}"


def key_channels(key: str) -> tuple[str, ...]:
    """The channels a write of ``key`` touches (``all`` first)."""
    first, sep, rest = key.partition("/")
    if not sep:
        return (ALL, _bucket(first + "/"))
    second = rest.partition("/")[0]
    return (ALL, _bucket(first + "/"), _bucket(f"{first}/{second}/"))


def prefix_channel(prefix: str) -> str:
    """The one channel that every key under ``prefix`` touches."""
    parts = prefix.split("/")
    if len(parts) >= 3:  # two complete segments
        return _bucket(f"{parts[0]}/{parts[1]}/")
    if len(parts) == 2:  # one complete segment
        return _bucket(parts[0] + "/")
    return ALL
