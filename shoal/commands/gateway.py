"""``shoal gateway``: the ingress proxy in the foreground.

Config: ``--config FILE`` (else ``./shoal.yaml`` when present) is the manifest, loaded and
validated whole as ``shoal validate`` and ``shoal up`` do (``shoal.config``); its ``gateway:``
section (schema: ``shoal.gateway.config``) configures the gateway, and ``--listen``
replaces its addresses. Routes then follow
the Store key ``gateway.routes_key``. Broker and Store: ``--broker``/``--store``, else the
environment, else the config file's ``broker:``/``store:``, else the defaults
(``shoal.settings``). Prints one JSON line ``{"event": "ready", "listen": [...], ...}``
when it serves; SIGTERM or Ctrl-C stop it gracefully (exit 0). ``--mtls strict`` calls a
strict mesh's services over mutual TLS with the gateway's mesh identity, issued by the
control plane's CA through the Store (trust domain: the config's ``security:``); see
``shoal.gateway.running``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from shoal.commands.serving import configure_logs, fail, report_ready, run_until_signal
from shoal.errors import ConfigError
from shoal.settings import MANIFEST_NAME, connections, one_line, resolve

if TYPE_CHECKING:
    from shoal.gateway.config import GatewayConfig


def _run_workers(loaded: GatewayConfig, workers: int, *, store: str, broker: str | None,
                 mtls: str = "off", trust_domain: str | None = None) -> NoReturn:
    """Serve with ``workers`` processes sharing one TCP port (``SO_REUSEPORT``)."""
    from shoal.gateway.running import gateway_app
    from shoal.gateway.workers import WorkerError, run_workers

    if len(loaded.listen) != 1 or loaded.listen[0].path is not None:
        raise ConfigError(f"--workers {workers}: several worker processes share exactly one "
                          "TCP listen address (host:port), not a unix socket or several")
    address = loaded.listen[0]
    host = address.host or "0.0.0.0"

    @contextlib.asynccontextmanager
    async def app() -> AsyncIterator[Any]:
        async with gateway_app(loaded, store=store, broker=broker, mtls=mtls,
                               trust_domain=trust_domain) as running:
            yield running.handle

    def ready(port: int, pids: list[int]) -> None:
        report_ready(listen=[f"{host}:{port}"], routes=len(loaded.routes.table),
                     routes_key=loaded.routes_key, workers=len(pids), pids=pids)

    try:
        code = run_workers(app, host, address.port or 0, workers=workers,
                           limits=loaded.limits, grace=loaded.drain, on_ready=ready)
    except WorkerError as exc:
        fail(str(exc))
    sys.exit(code)


def gateway(
    config: Annotated[Path | None, typer.Option(
        "--config", metavar="FILE", show_default=False,
        help="Manifest with a gateway: section (else ./shoal.yaml if present)")] = None,
    listen: Annotated[list[str] | None, typer.Option(
        "--listen", metavar="ADDR", show_default=False,
        help="host:port, :port or unix:/path (repeatable; else gateway.listen, "
             "127.0.0.1:8080)")] = None,
    store: Annotated[str | None, typer.Option(
        "--store", metavar="URL", show_default=False,
        help="Store URL: registry, routes (else $SHOAL_STORE, store: in the config, "
             "beside the broker)")] = None,
    broker: Annotated[str | None, typer.Option(
        "--broker", metavar="URL", show_default=False,
        help="Broker URL for POST /events/{topic} (else $SHOAL_BROKER, broker: in the "
             "config, sqlite:///.shoal/events.db)")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", min=1, max=256, help="Worker processes sharing the port")] = 1,
    mtls: Annotated[str, typer.Option(
        "--mtls", metavar="MODE",
        help="Calls to services: strict or permissive (mutual TLS with a mesh identity "
             "from the control plane's CA, via the Store) or off")] = "off",
) -> None:
    """Run the gateway: routes from the config and the Store, endpoints from the registry."""
    # imported here: every other `shoal` command starts faster without the gateway
    from shoal.config import ManifestError, load_manifest
    from shoal.gateway.config import GatewayConfig, parse_listen
    from shoal.gateway.running import Ready, serve_gateway

    configure_logs("gateway")
    try:
        path = config if config is not None else (
            Path(MANIFEST_NAME) if Path(MANIFEST_NAME).is_file() else None)
        try:
            manifest = load_manifest(path) if path is not None else None
        except ManifestError as exc:
            raise one_line(exc) from None
        settings = resolve(broker=broker, store=store, env=os.environ,
                           manifest=None if manifest is None else connections(manifest, path))
        loaded = manifest.gateway if manifest is not None else GatewayConfig()
        trust_domain = manifest.security.trust_domain if manifest is not None else None
        from shoal.mesh.security.mode import MtlsMode

        mtls = MtlsMode.parse(mtls, where="--mtls").value
        if listen:
            loaded = dataclasses.replace(loaded, listen=tuple(
                parse_listen(a, what="--listen") for a in listen))
    except ConfigError as exc:
        fail(str(exc))
    if workers > 1:
        try:
            _run_workers(loaded, workers, store=settings.store, broker=settings.broker,
                         mtls=mtls, trust_domain=trust_domain)
        except ConfigError as exc:
            fail(str(exc))

    def ready(info: Ready) -> None:
        report_ready(listen=info.listen, routes=info.routes, routes_key=info.routes_key,
                     routes_revision=info.routes_revision, pid=os.getpid())

    async def main(stop: asyncio.Event) -> None:
        await serve_gateway(loaded, store=settings.store, broker=settings.broker, stop=stop,
                            on_ready=ready, mtls=mtls, trust_domain=trust_domain)

    run_until_signal(main)
