"""`make demo`: the shop, start to finish, in about ten seconds.

Runs ``shoal up examples/shop/shoal.yaml`` (data in a temporary directory, any free
ports), places a few orders through the gateway as ``curl`` would, shows each one
settled or failed in the read model, shows ``shoal ps``, and shuts everything down.
Exit status 0 means every order ended as expected.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SHOP = Path(__file__).resolve().parent
ORDERS = [("alice", "book", 1, 30), ("bob", "lamp", 2, 120), ("carol", "piano", 1, 4000),
          ("alice", "pen", 3, 6)]


def http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="shoal-shop-") as tmp:
        print(f"$ shoal up {SHOP / 'shoal.yaml'}   (data in {tmp})", flush=True)
        up = subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", "up", str(SHOP / "shoal.yaml"),
             "--gateway-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert up.stdout is not None
        try:
            line = up.stdout.readline()
            print(line, end="", flush=True)
            m = re.search(r"gateway (\S+), admin (\S+)", line)
            if not m:
                print("shoal up did not become ready", file=sys.stderr)
                return 1
            gateway, admin = m.group(1).rstrip(","), m.group(2)
            ids = []
            for customer, sku, quantity, amount in ORDERS:
                order = {"customer": customer, "sku": sku, "quantity": quantity,
                         "amount": amount}
                print(f"\n$ curl -X POST {gateway}/orders -d '{json.dumps(order)}'")
                status, answer = http("POST", f"{gateway}/orders", order)
                print(f"{status} {json.dumps(answer)}")
                ids.append(answer["order_id"])
            print()
            ok = True
            for order_id, (_, _, _, amount) in zip(ids, ORDERS, strict=True):
                deadline = time.monotonic() + 15
                view: dict = {}
                while time.monotonic() < deadline:
                    status, view = http("GET", f"{gateway}/orders/{order_id}")
                    if view.get("status") in ("settled", "failed"):
                        break
                    time.sleep(0.1)
                print(f"$ curl {gateway}/orders/{order_id}")
                shown = {k: view.get(k) for k in ("status", "customer", "sku", "amount",
                                                   "charged", "reason") if k in view}
                print(json.dumps(shown))
                ok &= view.get("status") == ("failed" if amount > 500 else "settled")
            print(f"\n$ shoal ps --admin {admin}", flush=True)
            subprocess.run([sys.executable, "-m", "shoal.cli", "ps", "--admin", admin],
                           check=False)
        finally:
            up.send_signal(signal.SIGTERM)
            rest, _ = up.communicate(timeout=60)
            print(f"\n$ kill -TERM <shoal up>\n{rest}", end="")
        print("every order ended as expected" if ok else "SOME ORDERS DID NOT END AS EXPECTED")
        return 0 if ok and up.returncode == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
