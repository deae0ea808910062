"""After a supervised process dies: release its consumer-group memberships at once.

A member of a consumer group holds its partitions through keys on its lease
(``shoal.events.group``); when the process is killed with -9 they stay until the lease
runs out (the group's ``session_timeout``, 10 s by default), and its partitions wait that
long. The supervisor, unlike a peer, *knows* the process is dead (it reaped it), so it
deletes those keys right away and the live members (or the restarted instance) claim the
partitions from the committed offsets, as Kubernetes removes a dead pod's endpoints
without waiting for a timeout. Each delete is conditional on the revision read, so a key
another member took meanwhile is left alone.
"""

from __future__ import annotations

import socket

from shoal.control.load import load_key
from shoal.errors import StoreError
from shoal.events.group import GROUPS
from shoal.store.base import Store


async def forget_load(store: Store, service: str, instance_id: str) -> None:
    """Delete the load report of a dead instance (its figure no longer counts)."""
    try:
        await store.delete(load_key(service, instance_id))
    except StoreError:
        pass  # it expires with its lease anyway


def member_prefix(pid: int, hostname: str | None = None) -> str:
    """How the group member ids of process ``pid`` on this host begin."""
    return f"{hostname or socket.gethostname()}-{pid}-"


async def release_group_memberships(store: Store, pid: int, hostname: str | None = None
                                    ) -> int:
    """Delete the membership and ownership keys of the dead process ``pid``; how many."""
    marker = member_prefix(pid, hostname)
    released = 0
    for entry in await store.list(f"{GROUPS}/"):
        if "/members/" in entry.key:
            mine = entry.key.rsplit("/", 1)[1].startswith(marker)
        elif "/owners/" in entry.key:
            mine = entry.value.decode("utf-8", "replace").startswith(marker)
        else:
            continue
        if mine:
            try:
                released += await store.delete(entry.key, expected_revision=entry.revision)
            except StoreError:
                continue  # it expires with its lease anyway
    return released
