"""Certificates through the Store: the instance sends a CSR, the signer answers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shoal.control.ca import CAFiles, CertificateSigner
from shoal.errors import CertificateError
from shoal.mesh.security import MeshTLS, request_identity, rotate_forever
from shoal.mesh.security.issuance import (
    BUNDLE_KEY,
    CSR_PREFIX,
    csr_key,
    decode_issued,
    issued_key,
    split_request_key,
)
from shoal.store import connect_store
from tests.helpers import eventually


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Any]:
    s = await connect_store(f"sqlite:///{tmp_path}/store.db")
    yield s
    await s.close()


@pytest.fixture
async def signer(store: Any, tmp_path: Path) -> AsyncIterator[CertificateSigner]:
    signer = CertificateSigner.from_files(store, CAFiles(tmp_path / "state"))
    task = asyncio.get_running_loop().create_task(signer.run())
    await eventually(lambda: signer._bundle is not None, what="bundle published")
    yield signer
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_an_instance_gets_its_certificate_with_only_a_csr(
        store: Any, signer: CertificateSigner) -> None:
    identity = await request_identity(store, "billing", "billing-1")
    assert str(identity.spiffe_id) == "spiffe://shoal.local/svc/billing"
    assert identity.not_after - identity.not_before == pytest.approx(86400 + 300)
    entry = await store.get(issued_key("billing", "billing-1"))
    assert entry is not None and b"PRIVATE" not in entry.value  # no key ever in the store
    assert await store.list(CSR_PREFIX) == []  # answered requests are removed
    assert (await store.get(BUNDLE_KEY)).value == identity.bundle_pem
    again = await request_identity(store, "billing", "billing-1")  # a new key, a new answer
    assert again.certificate_pem != identity.certificate_pem


async def test_a_hostile_csr_gets_an_error_record(store: Any,
                                                  signer: CertificateSigner) -> None:
    await store.put(csr_key("billing", "evil"), b"-----BEGIN CERTIFICATE REQUEST-----\nxx")
    key = issued_key("billing", "evil")

    async def answered() -> bool:
        return await store.get(key) is not None

    for _ in range(500):
        if await answered():
            break
        await asyncio.sleep(0.01)
    record = decode_issued((await store.get(key)).value, where=key)
    assert "not a PEM certificate request" in record.error and not record.certificate
    assert signer.refused == 1
    await store.put(CSR_PREFIX + "BAD NAME/x", b"x")  # not a valid key: dropped, no answer
    for _ in range(100):
        if not await store.list(CSR_PREFIX):
            break
        await asyncio.sleep(0.01)
    assert await store.list(CSR_PREFIX) == []


async def test_no_signer_means_a_clear_timeout(store: Any) -> None:
    with pytest.raises(CertificateError, match="no answer from the control plane"):
        await request_identity(store, "billing", "billing-1", timeout=0.3)


@pytest.mark.parametrize("key", ["certs/csr/billing", "certs/csr/Billing/x", "certs/csr/a/",
                                 "certs/other/a/b", "certs/csr/a/" + "x" * 200])
def test_malformed_request_keys_are_named(key: str) -> None:
    with pytest.raises(CertificateError):
        split_request_key(key)


def test_malformed_records_are_named() -> None:
    with pytest.raises(CertificateError, match="certs/issued/a/b: malformed"):
        decode_issued(b'{"service": 1}', where="certs/issued/a/b")
    assert decode_issued(msgspec.json.encode({"service": "a", "instance": "b",
                                              "csr_sha256": "x"}), where="k").error == ""


async def test_rotation_loop_renews_and_follows_root_rotation(
        store: Any, signer: CertificateSigner, tmp_path: Path) -> None:
    tls = MeshTLS(await request_identity(store, "orders", "orders-1"))
    first = tls.identity
    now = [first.renew_at + 1]  # already past two thirds of its life
    task = asyncio.get_running_loop().create_task(
        rotate_forever(tls, store, "orders-1", clock=lambda: now[0]))
    try:
        await eventually(lambda: tls.identity is not first, what="renewal")
        now[0] = tls.identity.renew_at - 3600
        # another process rotates the root; the signer republishes the bundle
        files = CAFiles(tmp_path / "state")
        ca = files.load()
        ca.rotate_root()
        files.save(ca)
        await signer.publish_bundle()
        stored = (await store.get(BUNDLE_KEY)).value
        assert stored == ca.bundle_pem()
        await eventually(lambda: tls.identity.bundle_pem == stored, what="bundle")
        assert tls.identity.bundle_pem.count(b"BEGIN CERTIFICATE") == 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
