"""Small records in the Store, updated atomically (compare-and-swap) by any instance.

Every handler in the shop is idempotent because delivery is at-least-once: an event may
come again after a crash, and a request may be retried. Each decision is recorded under
the order's id in the same atomic write that changes the state it depends on, so doing
it again finds the record and repeats the recorded outcome instead of deciding twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from shoal.store.base import Store

MAX_ATTEMPTS = 1000


async def read(store: Store, key: str) -> Any:
    """The JSON value at ``key``, or None."""
    entry = await store.get(key)
    return None if entry is None else json.loads(entry.value)


async def update(store: Store, key: str, change: Callable[[Any], Any]) -> Any:
    """Apply ``change(current or None) -> new`` atomically; returns what was written.

    ``change`` may run more than once (another instance wrote in between) and must only
    compute; returning the current value unchanged writes nothing.
    """
    for _ in range(MAX_ATTEMPTS):
        entry = await store.get(key)
        current = None if entry is None else json.loads(entry.value)
        new = change(current)
        if new == current:
            return current
        written = await store.cas(key, json.dumps(new).encode(),
                                  expected_revision=0 if entry is None else entry.revision)
        if written is not None:
            return new
    raise RuntimeError(f"{key}: too much contention ({MAX_ATTEMPTS} attempts)")
