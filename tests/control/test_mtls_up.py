"""``shoal up`` under strict mTLS (the manifest's default), with real processes: health
checks keep passing, the gateway and services call each other over mutual TLS, plaintext
to an instance is refused, a policy's denial is a 403 naming the rule, and a service not
allowed to publish to a topic gets a clear error with nothing appended."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx

from shoal.control.timeline import ENV as TIMELINE
from shoal.control.timeline import read as read_timeline
from shoal.events.bus import EventBus
from tests.control.test_shop_e2e import _read_ready
from tests.mesh_identity import get_over_mtls, mesh_identity

ROOT = Path(__file__).resolve().parents[2]

MANIFEST = """
broker: sqlite:///{dir}/events.db
store: sqlite:///{dir}/store.db
admin: {{listen: 127.0.0.1:0}}
gateway:
  listen: 127.0.0.1:0
  routes:
    - {{name: back, match: {{path: {{prefix: /back}}}}, service: back}}
    - {{name: front, match: {{path: {{prefix: /front}}}}, service: front}}
    - {{name: stranger, match: {{path: {{prefix: /stranger}}}}, service: stranger}}
services:
  back:
    app: tests.control.mtls_apps:back
    policies:
      - {{name: no-admin, action: deny, paths: [{{prefix: /back/admin}}]}}
      - {{name: callers, action: allow, from: [front, shoal-gateway]}}
  front:
    app: tests.control.mtls_apps:front
    topics: {{publish: [greetings]}}
  stranger: {{app: tests.control.mtls_apps:stranger}}
"""


async def _refused(address: str) -> bool:
    """Whether a plaintext request to ``address`` gets no HTTP answer."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        return True
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return not reply.startswith(b"HTTP")


async def test_shoal_up_strict_mtls_policies_and_topics(tmp_path: Path) -> None:
    (tmp_path / "shoal.yaml").write_text(MANIFEST.format(dir=tmp_path))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           TIMELINE: str(tmp_path / "timeline")}
    log = (tmp_path / "up.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", "up", str(tmp_path / "shoal.yaml"),
        stdout=subprocess.PIPE, stderr=log, env=env, cwd=tmp_path)
    try:
        gateway, admin = await _read_ready(process)
        # the fork server was launched before the command line was parsed, and used
        marks = [(pid, what) for _, pid, _, what in read_timeline(tmp_path / "timeline")]
        assert [pid for pid, what in marks if what == "fork server launched"] == [process.pid]
        order = [what for _, what in marks]
        assert order.index("fork server launched") < order.index("cli: command parsed")
        async with httpx.AsyncClient(timeout=10) as client:
            # the gateway calls over mTLS with its own identity, allowed by the policy
            r = await client.get(f"{gateway}/back/who")
            assert r.status_code == 200, r.text
            assert r.json() == {"peer": "spiffe://shoal.local/svc/shoal-gateway"}
            r = await client.get(f"{gateway}/back/admin/x")
            assert r.status_code == 403 and r.json()["reason"] == "no-admin", r.text
            assert r.headers["shoal-error"] == "authz; no-admin"
            # ... and counted, by rule, on the instance's /metrics
            address = next(i["address"] for i in (await client.get(
                f"{admin}/api/instances")).json() if i["service"] == "back")
            tls = await mesh_identity(f"sqlite:///{tmp_path}/store.db")
            status, metrics = await get_over_mtls(tls, address, "back", "/metrics")
            assert status == 200
            assert 'shoal_authz_denials_total{rule="no-admin",service="back"} 1.0' in \
                metrics.decode()
            # service to service through the proxyless client: allowed, and not
            r = await client.get(f"{gateway}/front/call")
            assert r.json() == {"status": 200,
                                "body": {"peer": "spiffe://shoal.local/svc/front"}}, r.text
            r = await client.get(f"{gateway}/stranger/call")
            assert r.json()["status"] == 403, r.text
            assert r.json()["body"]["reason"] == "default-deny"
            assert "spiffe://shoal.local/svc/stranger may not GET /back/who" in \
                r.json()["body"]["error"]
            # topic policy: a clear error, nothing appended
            r = await client.post(f"{gateway}/front/publish/greetings")
            assert r.status_code == 200, r.text
            r = await client.post(f"{gateway}/front/publish/secrets")
            assert r.status_code == 403 and r.json()["rule"] == "no-entry", r.text
            assert "spiffe://shoal.local/svc/front may not publish to topic 'secrets'" in \
                r.json()["error"]
            # health checks from the control plane pass under strict, plaintext is refused
            async with asyncio.timeout(30):
                while True:
                    instances = (await client.get(f"{admin}/api/instances")).json()
                    if all("answered HTTP 200" in i["health_reason"] for i in instances):
                        break
                    await asyncio.sleep(0.3)
            assert {i["state"] for i in instances} == {"serving"}, instances
            # the dashboard reads every instance's /metrics with the plane's identity
            async with asyncio.timeout(30):
                while True:
                    snapshot = (await client.get(f"{admin}/api/snapshot")).json()
                    if snapshot.get("scrape_failures") == 0:
                        break
                    await asyncio.sleep(0.3)
            for instance in instances:
                assert await _refused(instance["address"]), instance
        async with EventBus.connect(f"sqlite:///{tmp_path}/events.db",
                                    store=f"sqlite:///{tmp_path}/store.db") as bus:
            names = {t.spec.name for t in await bus.topics()}
            assert "greetings" in names and "secrets" not in names
        # the CA's root key is kept in the state directory, readable only by its owner
        keys = list((tmp_path / ".shoal" / "ca").glob("*.key"))
        assert len(keys) == 1 and stat.S_IMODE(keys[0].stat().st_mode) == 0o600
    finally:
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), 60)
        log.close()
