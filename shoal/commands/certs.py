"""``shoal certs``: the mesh CA's roots and every issued identity, with expiry;
``shoal certs rotate-root`` and ``shoal certs retire-root``.

The roots live in ``<state>/ca/`` (``--state``, default ``.shoal``); the identities and
the trust bundle in the Store (``--store``, else as ``shoal.settings`` resolves it).
Rotating writes the new root to disk and the new bundle to the Store at once, so running
instances trust the new root before the control plane's signer issues its first leaf.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
import typer

from shoal.errors import ShoalError

certs = typer.Typer(help="The mesh's certificate authority and identities.",
                    invoke_without_command=True, no_args_is_help=False)

StateOption = Annotated[Path, typer.Option(
    "--state", metavar="DIR", help="State directory holding ca/ (the roots)")]
StoreOption = Annotated[str | None, typer.Option(
    "--store", metavar="URL", show_default=False,
    help="Store URL [else $SHOAL_STORE, store: in ./shoal.yaml, beside the broker]")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _fail(message: str) -> NoReturn:
    typer.echo(f"shoal certs: {message}", err=True)
    raise typer.Exit(2)


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _left(ts: float, now: float) -> str:
    seconds = ts - now
    if seconds <= 0:
        return "EXPIRED"
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f}d"
    return f"{seconds / 3600:.1f}h"


async def _open_store(store: str | None) -> Any:
    from shoal.settings import load_settings
    from shoal.store.connect import connect_store

    return await connect_store(load_settings(None, store).store)


async def _inventory(state: Path, store_url: str | None) -> dict[str, Any]:
    from shoal.control.ca import CAFiles
    from shoal.mesh.security.issuance import ISSUED_PREFIX, decode_issued

    files = CAFiles(state)
    if not files.exists():
        raise ShoalError(f"no certificate authority in {files.directory} (it is created "
                         "when the control plane starts)")
    ca = files.load()
    now = time.time()
    active = ca.active
    roots = [{"fingerprint": r.fingerprint, "not_after": r.not_after,
              "retire_at": r.retire_at, "active": r is active, "trusted": r.trusted_at(now)}
             for r in ca.roots]
    identities = []
    store = await _open_store(store_url)
    try:
        for entry in await store.list(ISSUED_PREFIX):
            record = decode_issued(entry.value, where=entry.key)
            identities.append({
                "service": record.service, "instance": record.instance,
                "spiffe_id": f"spiffe://{ca.trust_domain}/svc/{record.service}",
                "not_after": record.not_after or None, "error": record.error or None})
    finally:
        await store.close()
    return {"trust_domain": ca.trust_domain, "directory": str(files.directory),
            "roots": roots, "identities": identities}


@certs.callback()
def show(
    ctx: typer.Context,
    state: StateOption = Path(".shoal"),
    store: StoreOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show the roots and every identity with its expiry."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        data = asyncio.run(_inventory(state, store))
    except ShoalError as exc:
        _fail(str(exc))
    if json_out:
        typer.echo(msgspec.json.encode(data).decode())
        return
    from rich.console import Console
    from rich.table import Table

    now = time.time()
    console = Console(soft_wrap=True)
    roots = Table(title=f"roots of {data['trust_domain']} ({data['directory']})")
    for column in ("fingerprint", "status", "expires", "left", "leaves bundle"):
        roots.add_column(column)
    for r in data["roots"]:
        status = "active" if r["active"] else "trusted" if r["trusted"] else "retired"
        roots.add_row(r["fingerprint"][:16], status, _when(r["not_after"]),
                      _left(r["not_after"], now), _when(r["retire_at"]))
    console.print(roots)
    table = Table(title="identities")
    for column in ("spiffe id", "instance", "expires", "left"):
        table.add_column(column)
    for i in data["identities"]:
        if i["error"]:
            table.add_row(i["spiffe_id"], i["instance"], "refused", i["error"][:60])
        else:
            table.add_row(i["spiffe_id"], i["instance"], _when(i["not_after"]),
                          _left(i["not_after"], now))
    console.print(table if data["identities"] else "no identities issued yet")


async def _rotate(state: Path, store_url: str | None, overlap: float | None,
                  retire: str | None) -> dict[str, Any]:
    from shoal.control.ca import LEAF_LIFETIME, CAFiles
    from shoal.mesh.security.issuance import BUNDLE_KEY

    files = CAFiles(state)
    if not files.exists():
        raise ShoalError(f"no certificate authority in {files.directory}")
    ca = files.load()
    if retire is None:
        root = ca.rotate_root(overlap=overlap if overlap is not None else 2 * LEAF_LIFETIME)
    else:
        root = ca.retire(retire)
    files.save(ca)
    store = await _open_store(store_url)
    try:
        await store.put(BUNDLE_KEY, ca.bundle_pem())
    finally:
        await store.close()
    return {"fingerprint": root.fingerprint, "not_after": root.not_after,
            "bundle": [r.fingerprint for r in ca.bundle()]}


@certs.command("rotate-root")
def rotate_root(
    state: StateOption = Path(".shoal"),
    store: StoreOption = None,
    overlap: Annotated[str, typer.Option(
        "--overlap", help="How long the old root stays trusted (at least 24h)")] = "48h",
) -> None:
    """Make a new root the signer; the old one stays in the trust bundle for --overlap."""
    from shoal.units import parse_duration

    try:
        seconds = parse_duration(overlap, name="--overlap")
        done = asyncio.run(_rotate(state, store, seconds, None))
    except ShoalError as exc:
        _fail(str(exc))
    typer.echo(f"new root {done['fingerprint'][:16]} signs from now; trust bundle: "
               f"{', '.join(f[:16] for f in done['bundle'])} (old roots leave it after "
               f"{overlap})")


@certs.command("retire-root")
def retire_root(
    fingerprint: Annotated[str, typer.Argument(help="Fingerprint (a unique prefix)")],
    state: StateOption = Path(".shoal"),
    store: StoreOption = None,
) -> None:
    """Take an old root out of the trust bundle now."""
    try:
        done = asyncio.run(_rotate(state, store, None, fingerprint))
    except ShoalError as exc:
        _fail(str(exc))
    typer.echo(f"root {done['fingerprint'][:16]} retired; trust bundle: "
               f"{', '.join(f[:16] for f in done['bundle'])}")
