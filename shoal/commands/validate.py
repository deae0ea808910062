"""``shoal validate [MANIFEST]``: check a manifest without running anything.

Prints ``OK`` and a summary (broker, store, gateway, admin, security, each service) and
exits 0; or every problem found, one per line (``file, line N: key.path: what was
expected``), and exits 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from shoal.settings import MANIFEST_NAME

if TYPE_CHECKING:  # the schema (pydantic) is loaded when a manifest is checked, not by
    from shoal.config import Manifest, ServiceConfig  # every `shoal` command

EXIT_INVALID = 1


def validate(
    manifest: Annotated[Path, typer.Argument(
        metavar="[MANIFEST]", show_default=False,
        help=f"The manifest to check [default: ./{MANIFEST_NAME}]")] = Path(MANIFEST_NAME),
) -> None:
    """Check a manifest (schema, routes, policies) without running it."""
    from shoal.config import ManifestError, load_manifest

    try:
        loaded = load_manifest(manifest)
    except ManifestError as e:
        for issue in e.issues:
            sys.stderr.write(f"{_one_line(str(issue))}\n")
        count = len(e.issues)
        sys.stderr.write(f"{manifest}: invalid ({count} problem{'' if count == 1 else 's'})\n")
        raise typer.Exit(EXIT_INVALID) from None
    sys.stdout.write("\n".join(summary(loaded)) + "\n")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def summary(manifest: Manifest) -> list[str]:
    """What ``shoal validate`` prints for a valid manifest: OK, then one line per part."""
    routes = len(manifest.gateway.routes.table)
    listen = ", ".join(str(address) for address in manifest.gateway.listen)
    lines = [
        f"OK {manifest.path}",
        f"  broker    {manifest.broker}",
        f"  store     {manifest.store_url}{'' if manifest.store else ' (beside the broker)'}",
        f"  gateway   {listen} ({routes} route{'' if routes == 1 else 's'})",
        f"  admin     {manifest.admin.listen}",
        f"  security  mtls {manifest.security.mtls}, trust domain "
        f"{manifest.security.trust_domain}",
        f"  services  {len(manifest.services)}",
    ]
    lines.extend(f"    {name:<20} {_describe(spec)}" for name, spec in manifest.services.items())
    return lines


def _describe(spec: ServiceConfig) -> str:
    parts = [spec.app, f"replicas {spec.replicas}"]
    if spec.autoscale is not None:
        a = spec.autoscale
        on = [f"{a.target_inflight:g} in flight" if a.target_inflight else "",
              f"lag {a.target_lag}" if a.target_lag else ""]
        parts.append(f"autoscale {a.min}..{a.max} on {' or '.join(o for o in on if o)} "
                     f"per instance, cooldown {a.cooldown:g}s")
    parts.append(f"balancer {spec.traffic_policy.load_balancer.policy}")
    if spec.labels:
        parts.append("labels " + ",".join(f"{k}={v}" for k, v in spec.labels.items()))
    if spec.policies is not None:
        parts.append(f"{len(spec.policies)} authorization rule"
                     f"{'' if len(spec.policies) == 1 else 's'}")
    if spec.topics is not None:
        parts.append(f"topics publish {','.join(spec.topics.publish) or '-'} subscribe "
                     f"{','.join(spec.topics.subscribe) or '-'}")
    return "; ".join(parts)
