"""Routes that follow the Store: ``RouteWatcher(gateway, store, key, base)`` keeps a
``Gateway``'s route table equal to the routes list stored at ``key``.

* **Atomic, without dropping a connection.** A new table is built and validated off to
  the side, then swapped in with one assignment (``Gateway.swap_routes``): a request is
  routed by exactly one table, requests already routed finish on the old one, and no
  connection is touched.
* **State survives for unchanged routes.** A route whose config is identical to one in
  the old table (same fingerprint) keeps its upstreams: breaker, balancer, outlier and
  pool state carry over. Upstreams of routes that went away are closed ``retire_after``
  seconds later, when requests routed before the swap have had time to finish.
* **A bad value changes nothing.** A value that does not parse or validate is refused
  with one logged error naming the key, the store revision, the line and the key path;
  the table in service stays. Deleting the key goes back to ``base`` (the config file's
  routes). Endpoints reload on their own (``EndpointCache`` follows the registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from shoal.errors import ConfigError, StoreError
from shoal.gateway.config import LoadedRoutes, parse_routes
from shoal.gateway.proxy import Gateway
from shoal.store.base import Store

log = logging.getLogger("shoal.gateway")

RETIRE_AFTER = 30.0
"""Seconds after a swap before upstreams of removed routes are closed."""


class RouteWatcher:
    """Follows ``key`` in ``store`` and swaps the gateway's routes on every valid change."""

    def __init__(self, gateway: Gateway, store: Store, key: str, base: LoadedRoutes, *,
                 retire_after: float = RETIRE_AFTER) -> None:
        self.gateway = gateway
        self.store = store
        self.key = key
        self.base = base  # the routes when the key is absent
        self.current = base
        self.retire_after = retire_after
        self.revision = 0  # store revision of the value in service (0: base)
        self.reloads = 0  # tables swapped in
        self.refused = 0  # values refused
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._retire: asyncio.TimerHandle | None = None
        self._retiring: asyncio.Task[int] | None = None

    async def start(self) -> RouteWatcher:
        """Apply the stored routes (if any) and follow the key in the background."""
        stream = await self._load()
        self._task = asyncio.get_running_loop().create_task(
            self._follow(stream), name=f"shoal-gateway-routes {self.key}")
        return self

    async def close(self) -> None:
        """Stop following the key."""
        if self._retire is not None:
            self._retire.cancel()
        for task in (self._task, self._retiring):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def apply(self, value: bytes | None, revision: int) -> bool:
        """Serve the routes in ``value`` (None: the key is gone, back to ``base``); False if
        the value was refused (logged; the table in service stays). The value is parsed
        and validated in a thread: a large table takes a while, and traffic goes on."""
        if value is None:
            new, what = self.base, "deleted: back to the config file's routes"
        else:
            try:
                new = await asyncio.to_thread(
                    parse_routes, value, f"store key {self.key!r} (revision {revision})")
            except ConfigError as exc:
                self.refused += 1
                self.last_error = str(exc)
                log.error("gateway: refused new routes: %s; the %d route(s) in service stay",
                          exc, len(self.current.table))
                return False
            except Exception as exc:  # a loader bug must not end the watch
                self.refused += 1
                self.last_error = f"store key {self.key!r} (revision {revision}): {exc!r}"
                log.exception("gateway: refused new routes from store key %r (revision %d): "
                              "unexpected %r; the %d route(s) in service stay", self.key,
                              revision, exc, len(self.current.table))
                return False
            what = f"revision {revision}"
        unchanged = new.unchanged(self.current)
        self.gateway.swap_routes(new.table, unchanged)
        self.current, self.revision = new, revision
        self.reloads += 1
        self.last_error = None
        log.info("gateway: routes from store key %r %s: %d route(s), %d kept unchanged",
                 self.key, what, len(new.table), len(unchanged))
        for overlap in new.table.overlaps():
            log.warning("gateway: %s", overlap)
        self._schedule_retire()
        return True

    # -- internals ---------------------------------------------------------------------------
    async def _load(self) -> object:
        """Read the key, apply it, and open a watch from the revision read."""
        revision = await self.store.revision()
        entry = await self.store.get(self.key)
        if entry is not None:
            await self.apply(entry.value, entry.revision)
        elif self.current is not self.base:
            await self.apply(None, revision)
        return self.store.watch(self.key, after_revision=revision)

    async def _follow(self, stream: object) -> None:
        delay = 0.05
        while True:
            try:
                async for change in stream:  # type: ignore[attr-defined]
                    delay = 0.05
                    if change.key == self.key and change.revision > self.revision:
                        await self.apply(change.value if change.kind == "put" else None,
                                         change.revision)
                return  # the store was closed
            except StoreError as exc:
                log.warning("gateway: watching store key %r failed (%s); reading it again",
                            self.key, exc)
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                try:
                    stream = await self._load()
                    break
                except StoreError as exc:
                    log.warning("gateway: reading store key %r failed, retrying: %s",
                                self.key, exc)

    def _schedule_retire(self) -> None:
        if self._retire is not None:
            self._retire.cancel()
        loop = asyncio.get_running_loop()
        self._retire = loop.call_later(self.retire_after, self._start_retire)

    def _start_retire(self) -> None:
        self._retire = None
        self._retiring = asyncio.get_running_loop().create_task(
            self.gateway.retire_upstreams())
