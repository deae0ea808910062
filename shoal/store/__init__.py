"""Coordination store: key-value with revisions, watch and leases, on several backends."""

from shoal.store.base import Change, Entry, Lease, Store
from shoal.store.connect import DEFAULT_STORE_URL, connect_store

__all__ = ["DEFAULT_STORE_URL", "Change", "Entry", "Lease", "Store", "connect_store"]
