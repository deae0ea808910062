"""A child process for multi-process bus tests: ``python -m tests.bus_child MODE ...``.

Modes:
  consume URL TOPIC GROUP OUTFILE [SESSION_TIMEOUT]  append "partition offset key data" lines
  publish URL TOPIC COUNT                            print "partition offset key data" per ack
  idle URL TOPIC GROUP                               subscribe and do nothing
"""

from __future__ import annotations

import asyncio
import os
import sys

from shoal.events import Event, EventBus


async def consume(url: str, topic: str, group: str, out: str, timeout: str) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def handle(event: Event) -> None:
        ext = event.extensions
        os.write(fd, f"{ext.get('seq')} {event.key} {event.data}\n".encode())

    async with EventBus.connect(url) as bus:
        sub = await bus.subscribe(topic, group, handle, session_timeout=timeout)
        print("ready", flush=True)
        while True:
            await asyncio.sleep(0.05)
            print("owned", " ".join(map(str, sorted(sub.stats.partitions))), flush=True)


async def publish(url: str, topic: str, count: int) -> None:
    async with EventBus.connect(url) as bus:
        for i in range(count):
            ack = await bus.publish(topic, i, key=f"k{i % 5}")
            print(ack.partition, ack.offset, f"k{i % 5}", i, flush=True)


async def idle(url: str, topic: str, group: str) -> None:
    async with EventBus.connect(url) as bus:
        await bus.subscribe(topic, group, lambda e: None)
        print("ready", flush=True)
        await asyncio.sleep(3600)


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "consume":
        url, topic, group, out, *rest = args
        asyncio.run(consume(url, topic, group, out, rest[0] if rest else "1s"))
    elif mode == "publish":
        asyncio.run(publish(args[0], args[1], int(args[2])))
    elif mode == "idle":
        asyncio.run(idle(*args))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
