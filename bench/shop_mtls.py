"""What zero trust costs the shop under `shoal up`: strict mTLS against mTLS off.

    python bench/shop_mtls.py [--orders 500] [--concurrency 16] [--rounds 2]

The shop's manifest (8 instances, gateway, admin, health checks) is run by `shoal up`
with ``security.mtls: strict`` (the default: the CA issues every instance a certificate
at start; gateway -> service and service -> service calls are mutual TLS) and with
``mtls: off`` (the peer), alternating over ``--rounds`` rounds on the same machine.
Per mode, the better round of: seconds until `shoal up` is ready (its own figure),
orders accepted per second (HTTP 202s through the gateway to the orders service), and
orders settled per second end to end (gateway -> orders -> bus -> inventory -> bus ->
billing -> payments (mesh call) -> bus -> orders-view). Headline: ratios strict/off.
Ends with one JSON line.

Measured (2 CPUs shared with other engineers' test runs, 500 orders, concurrency 16,
2 rounds): ready x1.26 (3.88 s against 3.09 s: one CSR round trip per instance, the
plane's and gateway's identities), accepted/s x0.26 (193/s against 362-740/s: every
gateway -> orders call pays the event loop's TLS records, see ``bench/mesh_tls.py``),
settled/s x0.93 (41/s against 44/s: the pipeline's bottleneck is not the calls).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shop import MANIFEST as SHOP_MANIFEST  # the same shop as bench/shop.py,
from shop import SHOP, orders  # the same client and order stream

MANIFEST = "security: {{mtls: {mode}}}\n" + SHOP_MANIFEST  # bench/shop.py's shop


async def run_once(mode: str, n: int, concurrency: int) -> dict[str, float]:
    """One `shoal up` in ``mode``: ready seconds, orders accepted/s and settled/s."""
    env = {**os.environ, "PYTHONPATH": f"{SHOP}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory(prefix=f"shoal-bench-{mode}-") as tmp:
        manifest = Path(tmp) / "shoal.yaml"
        manifest.write_text(MANIFEST.format(mode=mode, dir=tmp))
        with (Path(tmp) / "up.log").open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "shoal.cli", "up", str(manifest),
                stdout=subprocess.PIPE, stderr=log, env=env, cwd=tmp)
        try:
            assert process.stdout is not None
            while True:
                line = (await process.stdout.readline()).decode()
                if not line:
                    raise SystemExit(f"shoal up ({mode}) exited early: "
                                     f"{(Path(tmp) / 'up.log').read_text()[-2000:]}")
                m = re.search(r"ready in ([0-9.]+)s: gateway (\S+),", line)
                if m:
                    break
            ready, gateway = float(m.group(1)), m.group(2).removeprefix("http://")
            accepted, settled = await orders(f"http://{gateway}", n, concurrency)
            return {"ready_s": ready, "accepted_per_s": n / accepted,
                    "settled_per_s": n / settled}
        finally:
            process.terminate()
            await process.wait()


async def main() -> None:
    """Alternate strict and off; print the better round of each and the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    best: dict[str, dict[str, float]] = {}
    for r in range(args.rounds):
        for mode in ("strict", "off"):
            got = await run_once(mode, args.orders, args.concurrency)
            print(f"round {r + 1} {mode:6} ready {got['ready_s']:.2f}s  accepted "
                  f"{got['accepted_per_s']:.0f}/s  settled {got['settled_per_s']:.0f}/s",
                  flush=True)
            mine = best.setdefault(mode, got)
            mine["ready_s"] = min(mine["ready_s"], got["ready_s"])
            for key in ("accepted_per_s", "settled_per_s"):
                mine[key] = max(mine[key], got[key])
    strict, off = best["strict"], best["off"]
    ratios = {"ready": strict["ready_s"] / off["ready_s"],
              "accepted": strict["accepted_per_s"] / off["accepted_per_s"],
              "settled": strict["settled_per_s"] / off["settled_per_s"]}
    print(f"strict/off: ready time x{ratios['ready']:.2f}, accepted/s x"
          f"{ratios['accepted']:.2f}, settled/s x{ratios['settled']:.2f}")
    print(json.dumps({"strict": strict, "off": off, "ratios": ratios}))


if __name__ == "__main__":
    uvloop.run(main())
