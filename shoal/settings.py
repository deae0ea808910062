"""Where the broker and the Store are: ``--broker``/``--store`` flags, the environment, the
``shoal.yaml`` manifest, then the defaults.

Precedence, for the broker: the flag, else ``SHOAL_BROKER``, else ``broker:`` in
``./shoal.yaml``, else ``sqlite:///.shoal/events.db``. The Store likewise (``--store``,
``SHOAL_STORE``, ``store:``), else beside the broker (as ``EventBus.connect`` does).

One exception, so that a consumer group's offsets never land in a Store that belongs to
another log: the manifest's ``store:`` describes the manifest's broker, so it is used only
when the broker came from the manifest or the default. ``--broker elsewhere`` with no
``--store``/``SHOAL_STORE`` puts the Store beside ``elsewhere``.

``resolve`` is pure (tested without files or environment); ``load_settings`` reads them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from shoal.errors import ConfigError
from shoal.events.brokers.connect import DEFAULT_BROKER_URL
from shoal.events.bus import default_store_for

if TYPE_CHECKING:  # the schema (pydantic) is loaded only when a manifest is read: every
    from shoal import config  # `shoal` command imports this module, `shoal up` first

MANIFEST_NAME = "shoal.yaml"
BROKER_ENV = "SHOAL_BROKER"
STORE_ENV = "SHOAL_STORE"

Origin = Literal["flag", "env", "manifest", "default"]


@dataclass(frozen=True, slots=True)
class Manifest:
    """The connection settings of a ``shoal.yaml``: values, and the line each came from."""

    path: Path
    broker: str | None = None
    store: str | None = None
    broker_line: int | None = None
    store_line: int | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    """The resolved broker and Store URLs, each with where it came from."""

    broker: str
    store: str
    broker_origin: str  # "from the environment", "from shoal.yaml, line 2", "default"...
    store_origin: str


def _origin_text(
    what: str, origin: Origin, manifest: Manifest | None, line: int | None
) -> str:
    if origin == "flag":
        return f"from --{what}"
    if origin == "env":
        return f"from ${BROKER_ENV if what == 'broker' else STORE_ENV}"
    if origin == "manifest" and manifest is not None:
        return f"from {manifest.path}, line {line}"
    return "the default" if what == "broker" else "beside the broker"


def resolve(
    *,
    broker: str | None = None,
    store: str | None = None,
    env: Mapping[str, str] | None = None,
    manifest: Manifest | None = None,
) -> Settings:
    """Pure resolution of the broker and Store URLs (see the module docstring)."""
    env = env or {}
    broker_origin: Origin
    if broker:
        url, broker_origin = broker, "flag"
    elif env.get(BROKER_ENV):
        url, broker_origin = env[BROKER_ENV], "env"
    elif manifest is not None and manifest.broker:
        url, broker_origin = manifest.broker, "manifest"
    else:
        url, broker_origin = DEFAULT_BROKER_URL, "default"

    store_origin: Origin
    manifest_store_applies = broker_origin in ("manifest", "default")
    if store:
        store_url, store_origin = store, "flag"
    elif env.get(STORE_ENV):
        store_url, store_origin = env[STORE_ENV], "env"
    elif manifest is not None and manifest.store and manifest_store_applies:
        store_url, store_origin = manifest.store, "manifest"
    else:
        store_url, store_origin = default_store_for(url), "default"
    return Settings(
        url,
        store_url,
        _origin_text("broker", broker_origin, manifest,
                     manifest.broker_line if manifest else None),
        _origin_text("store", store_origin, manifest,
                     manifest.store_line if manifest else None),
    )


def connections(manifest: config.Manifest, path: Path) -> Manifest:
    """The connection view of a validated manifest: what it says, where, if it says it."""
    given = manifest.model_fields_set
    return Manifest(
        path,
        manifest.broker if "broker" in given else None,
        manifest.store if "store" in given else None,
        manifest.line_of("broker") if "broker" in given else None,
        manifest.line_of("store") if "store" in given else None,
    )


def one_line(error: config.ManifestError) -> ConfigError:
    """The first problem of a manifest, for commands whose errors are one line."""
    more = len(error.issues) - 1
    tail = f" (and {more} more problem(s): run `shoal validate`)" if more > 0 else ""
    return ConfigError(f"{error.issues[0]}{tail}")


def parse_manifest(text: str, path: Path) -> Manifest:
    """The ``broker:`` and ``store:`` of a manifest's text, after validating all of it with
    the manifest schema (``shoal.config``); ``ConfigError`` naming the file and line."""
    from shoal import config

    try:
        return connections(config.parse_manifest(text, path), path)
    except config.ManifestError as e:
        raise one_line(e) from None


def load_manifest(path: Path) -> Manifest | None:
    """The manifest at ``path``, or None if there is no such file."""
    if not path.exists() and not path.is_symlink():
        return None
    from shoal import config

    try:
        return connections(config.load_manifest(path), path)
    except config.ManifestError as e:
        raise one_line(e) from None


def load_settings(
    broker: str | None = None,
    store: str | None = None,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve from the flags given, ``os.environ`` and ``./shoal.yaml``.

    The manifest is read only when it can matter (the broker is not given by flag or
    environment), so a broken manifest does not stand in the way of ``--broker URL``.
    """
    env = os.environ if env is None else env
    manifest = None
    if not (broker or env.get(BROKER_ENV)):
        manifest = load_manifest(cwd / MANIFEST_NAME if cwd else Path(MANIFEST_NAME))
    return resolve(broker=broker, store=store, env=env, manifest=manifest)
