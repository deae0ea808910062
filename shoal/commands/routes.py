"""``shoal routes``: the routes running gateways take from the Store.

``shoal routes check FILE`` validates a routes file (the ``routes:`` list, YAML or JSON)
as the gateway would; ``shoal routes set FILE`` validates it, then writes it under the
routes key, where every gateway watching the key swaps it in; ``shoal routes show``
prints what is stored; ``shoal routes clear`` deletes it (gateways go back to their
config file's routes). A file that does not validate is never written: the error names
the file, the line and the key, and the exit status is 2.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from shoal.commands.serving import fail
from shoal.errors import ConfigError, ShoalError
from shoal.settings import MANIFEST_NAME, load_manifest, resolve

routes_app = typer.Typer(name="routes", no_args_is_help=True, add_completion=False,
                         help="Show, check and set the routes gateways take from the Store.")

StoreOption = Annotated[str | None, typer.Option(
    "--store", metavar="URL", show_default=False,
    help="Store URL (else $SHOAL_STORE, store: in ./shoal.yaml, the default)")]
KeyOption = Annotated[str, typer.Option(
    "--key", metavar="KEY", help="Store key gateways watch (gateway.routes_key)")]
DEFAULT_KEY = "shoal/gateway/routes"  # shoal.gateway.config.DEFAULT_ROUTES_KEY


def _store_url(store: str | None) -> str:
    path = Path(MANIFEST_NAME)
    return resolve(store=store, env=os.environ,
                   manifest=load_manifest(path) if path.is_file() else None).store


def _read(file: Path) -> bytes:
    from shoal.yamlsafe import MAX_YAML_BYTES

    try:
        with file.open("rb") as f:
            return f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{file}: is a directory, not a routes file") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot be read: {exc.strerror}") from None


def _check(file: Path) -> tuple[bytes, int, list[str]]:
    """The file's bytes, its number of routes and its overlaps, or a ConfigError."""
    from shoal.gateway.config import parse_routes

    raw = _read(file)
    loaded = parse_routes(raw, str(file))
    return raw, len(loaded.table), [str(o) for o in loaded.table.overlaps()]


def _run(main: object) -> object:
    try:
        return asyncio.run(main)  # type: ignore[arg-type]
    except ShoalError as exc:
        fail(str(exc))


@routes_app.command("check")
def check(file: Annotated[Path, typer.Argument(metavar="FILE")]) -> None:
    """Validate a routes file as a gateway would."""
    try:
        _, count, overlaps = _check(file)
    except ConfigError as exc:
        fail(str(exc))
    print(f"{file}: OK, {count} route(s)")
    for overlap in overlaps:
        print(f"note: {overlap}")


@routes_app.command("set")
def set_routes(file: Annotated[Path, typer.Argument(metavar="FILE")],
               store: StoreOption = None, key: KeyOption = DEFAULT_KEY) -> None:
    """Validate FILE, then store it where gateways take their routes from."""
    try:
        raw, count, overlaps = _check(file)
        url = _store_url(store)
    except ConfigError as exc:
        fail(str(exc))

    async def main() -> int:
        from shoal.gateway.running import open_store

        the_store = await open_store(url)
        try:
            return await the_store.put(key, raw)
        finally:
            await the_store.close()

    revision = _run(main())
    print(f"stored {count} route(s) from {file} under {key!r} (revision {revision})")
    for overlap in overlaps:
        print(f"note: {overlap}")


@routes_app.command("show")
def show(store: StoreOption = None, key: KeyOption = DEFAULT_KEY) -> None:
    """Print the stored routes (exit 1 when there are none)."""
    try:
        url = _store_url(store)
    except ConfigError as exc:
        fail(str(exc))

    async def main() -> tuple[bytes, int] | None:
        from shoal.gateway.running import open_store

        the_store = await open_store(url)
        try:
            entry = await the_store.get(key)
            return None if entry is None else (entry.value, entry.revision)
        finally:
            await the_store.close()

    found = _run(main())
    if found is None:
        sys.stderr.write(f"no routes under {key!r}: gateways use their config file's\n")
        raise typer.Exit(1)
    value, revision = found  # type: ignore[misc]
    sys.stderr.write(f"# {key!r}, revision {revision}\n")
    sys.stdout.write(value.decode("utf-8", "replace"))
    if not value.endswith(b"\n"):
        sys.stdout.write("\n")


@routes_app.command("clear")
def clear(store: StoreOption = None, key: KeyOption = DEFAULT_KEY) -> None:
    """Delete the stored routes: gateways go back to their config file's routes."""
    try:
        url = _store_url(store)
    except ConfigError as exc:
        fail(str(exc))

    async def main() -> bool:
        from shoal.gateway.running import open_store

        the_store = await open_store(url)
        try:
            return await the_store.delete(key)
        finally:
            await the_store.close()

    print(f"deleted {key!r}" if _run(main()) else f"nothing under {key!r}")
