"""``shoal sidecar``: put an app that is not written with Shoal into the mesh.

``shoal sidecar --service NAME --listen ADDR --app ADDR`` registers an instance of NAME at
ADDR, proxies what arrives there to the app, health-checks the app (its state in the
registry follows), and on SIGTERM drains and deregisters (``shoal.gateway.sidecar``). The
Store: ``--store``, else ``$SHOAL_STORE``, ``store:`` in ./shoal.yaml, else the default.
Prints one JSON line ``{"event": "ready", ...}`` once registered. ``--mtls strict`` serves
mutual TLS with the instance's mesh identity (trust domain: ``security:`` in ./shoal.yaml).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from shoal.commands.serving import configure_logs, fail, report_ready, run_until_signal
from shoal.errors import ConfigError
from shoal.settings import MANIFEST_NAME, load_manifest, resolve

T = TypeVar("T")


def _labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--label {item!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def _health(make: type[T], **options: Any) -> T:
    """``HealthCheckConfig(**options)`` with errors naming the flag (``--health-path``)."""
    try:
        return make(jitter=0.0, **options)
    except ConfigError as exc:
        name, _, rest = str(exc).partition(": ")
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag if name in ('unhealthy_threshold',) else '--health-' + name}"
                          f": {rest}") from None


def sidecar(
    service: Annotated[str, typer.Option("--service", metavar="NAME",
                                         help="Service the app is an instance of")],
    listen_at: Annotated[str, typer.Option(
        "--listen", metavar="ADDR", help="Where the sidecar listens: host:port or unix:/path")],
    app: Annotated[str, typer.Option(
        "--app", metavar="ADDR", help="Where the app listens: host:port or /path.sock")],
    store: Annotated[str | None, typer.Option(
        "--store", metavar="URL", show_default=False,
        help="Store URL of the registry (else $SHOAL_STORE, store: in ./shoal.yaml)")] = None,
    health_path: Annotated[str, typer.Option(
        "--health-path", help="The app's health endpoint (2xx: healthy)")] = "/healthz",
    health_interval: Annotated[str, typer.Option(
        "--health-interval", help="Time between health checks of the app")] = "5s",
    health_timeout: Annotated[str, typer.Option(
        "--health-timeout", help="How long one health check may take")] = "2s",
    unhealthy_threshold: Annotated[int, typer.Option(
        "--unhealthy-threshold", min=1, help="Failed checks in a row that make it unhealthy"
    )] = 3,
    advertise: Annotated[str | None, typer.Option(
        "--advertise", metavar="ADDR", show_default=False,
        help="Address registered for callers (default: the listen address)")] = None,
    instance_id: Annotated[str | None, typer.Option(
        "--instance-id", metavar="ID", show_default=False,
        help="Instance id (default: SERVICE-<random>)")] = None,
    label: Annotated[list[str] | None, typer.Option(
        "--label", metavar="KEY=VALUE", show_default=False,
        help="Instance label, e.g. version=2 (repeatable)")] = None,
    drain: Annotated[str, typer.Option(
        "--drain", help="On SIGTERM: time to let callers notice, and for in-flight requests"
    )] = "2s",
    mtls: Annotated[str, typer.Option(
        "--mtls", metavar="MODE",
        help="strict: serve mutual TLS with the instance's mesh identity (from the control "
             "plane's CA, via the Store), or off")] = "off",
) -> None:
    """Register an app in the mesh, health-check it, and proxy inbound traffic to it."""
    # imported here: every other `shoal` command starts faster without the gateway
    from shoal.gateway.config import parse_listen
    from shoal.gateway.sidecar import SidecarConfig, SidecarReady, serve_sidecar
    from shoal.mesh.health import HealthCheckConfig
    from shoal.units import parse_duration

    configure_logs("sidecar")
    try:
        path = Path(MANIFEST_NAME)
        manifest = load_manifest(path) if path.is_file() else None
        settings = resolve(store=store, env=os.environ, manifest=manifest)
        trust_domain = None
        if manifest is not None and mtls != "off":  # validated just above
            from shoal.config import load_manifest as load_whole

            trust_domain = load_whole(path).security.trust_domain
        config = SidecarConfig(
            service=service, listen=parse_listen(listen_at, what="--listen"), app=app,
            instance_id=instance_id or f"{service}-{uuid.uuid4().hex[:8]}",
            advertise=advertise, labels=_labels(label or []),
            health=_health(HealthCheckConfig, path=health_path, interval=health_interval,
                           timeout=health_timeout, unhealthy_threshold=unhealthy_threshold),
            drain=parse_duration(drain, name="--drain") or 0.0, mtls=mtls,
            trust_domain=trust_domain)
    except ConfigError as exc:
        fail(str(exc))

    def ready(info: SidecarReady) -> None:
        report_ready(service=service, instance=info.instance_id, listen=info.listen,
                     address=info.address, app=app, pid=os.getpid())

    async def main(stop: asyncio.Event) -> None:
        await serve_sidecar(config, store=settings.store, stop=stop, on_ready=ready)

    run_until_signal(main)
