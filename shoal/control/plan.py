"""From a validated manifest (``shoal.config.Manifest``) to what ``shoal up`` runs (``Plan``).

Relative ``sqlite:///`` URLs are relative to the working directory of ``shoal up`` (as
everywhere in Shoal); they are made absolute here, because the instances run from the
manifest's directory (so that ``app: orders:svc`` imports from there) and must open the
same files as the control plane.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from shoal.config import Manifest
from shoal.control.autoscaler import ScalePolicy
from shoal.control.plane import Plan, ServicePlan
from shoal.gateway.config import parse_listen


def absolute_url(url: str, cwd: Path | None = None) -> str:
    """``url`` with a relative ``sqlite:///`` path made absolute against ``cwd``."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url[len(prefix):].startswith("/"):
        return url
    base = Path(cwd) if cwd is not None else Path(os.getcwd())
    path, sep, query = url[len(prefix):].partition("?")
    return f"{prefix}{(base / path).resolve()}{sep}{query}"


def state_dir_for(cwd: Path | None = None) -> Path:
    """Where ``shoal up`` keeps its state (the CA's roots in ``ca/``): ``.shoal`` in the
    working directory, where ``shoal certs`` looks by default."""
    return (Path(cwd) if cwd is not None else Path(os.getcwd())).resolve() / ".shoal"


def plan_from_manifest(manifest: Manifest, *, cwd: Path | None = None,
                       gateway_listen: str | None = None, **overrides: object) -> Plan:
    """The ``Plan`` a manifest describes: its gateway is the manifest's ``gateway:`` section
    (``gateway_listen``: one address instead of its ``listen``; ``overrides``: other
    ``Plan`` fields)."""
    services = {}
    for name, config in manifest.services.items():
        scale = config.autoscale
        services[name] = ServicePlan(
            name=name, app=config.app, replicas=config.replicas,
            autoscale=None if scale is None else ScalePolicy(
                min=scale.min, max=scale.max, target_inflight=scale.target_inflight,
                target_lag=scale.target_lag, cooldown=scale.cooldown),
            labels=dict(config.labels), env=dict(config.env),
            traffic=config.policy_config(),
            guarded=config.policies is not None or config.topics is not None)
    fields: dict[str, object] = {
        "broker": absolute_url(manifest.broker, cwd),
        "store": absolute_url(manifest.store_url, cwd),
        "services": services,
        "base_dir": manifest.directory.resolve(),
        "gateway": manifest.gateway if gateway_listen is None else dataclasses.replace(
            manifest.gateway, listen=(parse_listen(gateway_listen, what="--gateway-listen"),)),
        "admin_listen": manifest.admin.listen,
        "manifest_path": None if manifest.path is None else Path(manifest.path).resolve(),
        "mtls": manifest.security.mtls,
        "trust_domain": manifest.security.trust_domain,
        "state_dir": state_dir_for(cwd),
    }
    fields.update(overrides)
    return Plan(**fields)  # type: ignore[arg-type]
