"""A stand-in instance process for supervisor tests: MODE decides how it behaves."""

import json
import os
import signal
import sys
import time

mode, port = sys.argv[1], int(sys.argv[2])
print(f"starting on port {port}", flush=True)
if mode == "crash":
    print("Traceback (most recent call last):", flush=True)
    print("RuntimeError: no database", flush=True)
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))
else:
    def bye(*_):
        print("draining", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
print(json.dumps({"event": "ready", "pid": os.getpid(), "port": port}), flush=True)
while True:
    time.sleep(0.05)
