"""Releasing a dead process's consumer-group keys: only its own, only at the revision read."""

from shoal.control.cleanup import member_prefix, release_group_memberships
from shoal.store.memory import MemoryStore

G = "shoal/groups/orders/billing/"


async def test_only_the_dead_process_keys_go():
    store = MemoryStore()
    dead, alive, similar = (f"{member_prefix(p, 'h')}7f-0" for p in (123, 456, 1234))
    await store.put(f"{G}members/{dead}", dead.encode())
    await store.put(f"{G}members/{alive}", alive.encode())
    await store.put(f"{G}members/{similar}", similar.encode())
    await store.put(f"{G}owners/0", dead.encode())
    await store.put(f"{G}owners/1", alive.encode())
    await store.put(f"{G}owners/2", similar.encode())
    await store.put(f"{G}offsets/0", b"17")
    assert await release_group_memberships(store, 123, "h") == 2
    keys = {e.key: e.value for e in await store.list("shoal/groups/")}
    assert keys == {f"{G}members/{alive}": alive.encode(),
                    f"{G}members/{similar}": similar.encode(),
                    f"{G}owners/1": alive.encode(), f"{G}owners/2": similar.encode(),
                    f"{G}offsets/0": b"17"}
    assert await release_group_memberships(store, 123, "h") == 0
    assert await release_group_memberships(store, 99, "other-host") == 0
