"""``shoal certs``: roots and identities with expiry; rotate-root and retire-root."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

from typer.testing import CliRunner

from shoal.cli import app
from shoal.control.ca import CAFiles, CertificateSigner
from shoal.mesh.security import request_identity
from shoal.mesh.security.issuance import BUNDLE_KEY
from shoal.store import connect_store


async def _issue(state: Path, store_url: str) -> None:
    store = await connect_store(store_url)
    signer = CertificateSigner.from_files(store, CAFiles(state))
    task = asyncio.get_running_loop().create_task(signer.run())
    try:
        await request_identity(store, "billing", "billing-1")
        await request_identity(store, "orders", "orders-7")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


def test_certs_shows_roots_and_identities_and_rotates(tmp_path: Path) -> None:
    state, store_url = tmp_path / "state", f"sqlite:///{tmp_path}/store.db"
    runner = CliRunner()
    result = runner.invoke(app, ["certs", "--state", str(state), "--store", store_url])
    assert result.exit_code == 2 and "no certificate authority" in result.output
    asyncio.run(_issue(state, store_url))
    result = runner.invoke(app, ["certs", "--state", str(state), "--store", store_url,
                                 "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [(i["spiffe_id"], i["instance"]) for i in data["identities"]] == [
        ("spiffe://shoal.local/svc/billing", "billing-1"),
        ("spiffe://shoal.local/svc/orders", "orders-7")]
    assert len(data["roots"]) == 1 and data["roots"][0]["active"]
    table = runner.invoke(app, ["certs", "--state", str(state), "--store", store_url])
    assert "spiffe://shoal.local/svc/billing" in table.output and "active" in table.output
    assert "PRIVATE" not in table.output and "PRIVATE" not in result.output

    bad = runner.invoke(app, ["certs", "rotate-root", "--state", str(state), "--store",
                              store_url, "--overlap", "1h"])
    assert bad.exit_code == 2 and "shorter than a certificate's life" in bad.output
    rotated = runner.invoke(app, ["certs", "rotate-root", "--state", str(state), "--store",
                                  store_url])
    assert rotated.exit_code == 0 and "signs from now" in rotated.output
    data = json.loads(runner.invoke(app, ["certs", "--state", str(state), "--store",
                                          store_url, "--json"]).output)
    old, new = data["roots"]
    assert new["active"] and old["trusted"] and old["retire_at"] is not None

    async def bundle() -> bytes:
        store = await connect_store(store_url)
        try:
            return (await store.get(BUNDLE_KEY)).value
        finally:
            await store.close()

    assert asyncio.run(bundle()).count(b"BEGIN CERTIFICATE") == 2
    retired = runner.invoke(app, ["certs", "retire-root", old["fingerprint"][:12],
                                  "--state", str(state), "--store", store_url])
    assert retired.exit_code == 0, retired.output
    assert asyncio.run(bundle()).count(b"BEGIN CERTIFICATE") == 1
    for key in (state / "ca").glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
