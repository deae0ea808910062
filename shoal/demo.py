"""A live demonstration of the bus: ``python -m shoal.demo`` (``make demo``).

Three processes share one SQLite broker in a temporary directory: two consumers of the
group ``billing`` split the partitions of ``orders`` between them, and a producer
publishes 40 ``order.created`` events keyed by customer. Each consumer reports what it
handles; at the end a summary checks that every event was handled exactly once, that
each customer's orders were handled in the order they were placed, and shows which
consumer had which partitions. Exit status 0 means every check held.

The children are this module too: ``python -m shoal.demo consumer NAME URL`` and
``python -m shoal.demo producer URL``; they speak JSON lines on standard output.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from shoal.events import Event, EventBus
from shoal.events.partitioning import partition_for

TOPIC = "orders"
GROUP = "billing"
PARTITIONS = 4
EVENTS = 40
INTERVAL = 0.07  # seconds between orders: the producer runs for about 3 s
CUSTOMERS = ("alice", "bob", "carol", "dave", "erin", "frank")  # they cover all 4 partitions
CONSUMERS = ("consumer-1", "consumer-2")
STYLES = {"consumer-1": "cyan", "consumer-2": "magenta"}
TIMEOUT = 12.0


def _emit(**fields: Any) -> None:
    sys.stdout.write(msgspec.json.encode(fields).decode() + "\n")
    sys.stdout.flush()


# -- the child processes -----------------------------------------------------------------


async def run_consumer(name: str, url: str) -> None:
    """A member of ``billing``: reports owned partitions and every event it handles."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def handle(event: Event) -> None:
        key = event.key or ""
        _emit(kind="event", consumer=name, partition=partition_for(key, PARTITIONS),
              key=key, order=event.data["order"], amount=event.data["amount"])

    async with EventBus.connect(url) as bus:
        sub = await bus.subscribe(TOPIC, GROUP, handle)
        owned: list[int] | None = None
        while not stop.is_set():
            now = sorted(sub.stats.partitions)
            if now != owned:
                owned = now
                _emit(kind="owned", consumer=name, partitions=now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)
        await sub.close()


async def run_producer(url: str) -> None:
    """Publish ``EVENTS`` orders round-robin over the customers, one every ``INTERVAL``."""
    async with EventBus.connect(url) as bus:
        for n in range(1, EVENTS + 1):
            customer = CUSTOMERS[(n * 7) % len(CUSTOMERS)]
            amount = round(5 + (n * 37 % 100) / 4, 2)
            ack = await bus.publish(
                TOPIC, {"order": n, "customer": customer, "amount": amount},
                key=customer, type="order.created",
            )
            _emit(kind="published", order=n, key=customer, partition=ack.partition,
                  offset=ack.offset)
            await asyncio.sleep(INTERVAL)


# -- the orchestrator --------------------------------------------------------------------


@dataclass
class _Seen:
    """What the orchestrator learned from its children."""

    owned: dict[str, list[int]] = field(default_factory=dict)
    handled: list[dict[str, Any]] = field(default_factory=list)
    published: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.demo", *args, stdout=asyncio.subprocess.PIPE
    )


async def _follow(proc: asyncio.subprocess.Process, seen: _Seen, console: Any) -> None:
    from rich.text import Text

    assert proc.stdout is not None
    async for raw in proc.stdout:
        msg = msgspec.json.decode(raw)
        kind = msg["kind"]
        if kind == "owned":
            seen.owned[msg["consumer"]] = msg["partitions"]
            parts = ", ".join(map(str, msg["partitions"])) or "none"
            line = Text(f"{msg['consumer']:<11}", style=f"bold {STYLES[msg['consumer']]}")
            line.append(f"now owns partitions {parts}", style="bold")
        elif kind == "published":
            seen.published.append(msg)
            line = Text(f"{'producer':<11}", style="bold green")
            line.append(f"order #{msg['order']:<3} {msg['key']:<6} -> partition "
                        f"{msg['partition']} offset {msg['offset']}", style="dim")
        else:
            seen.handled.append(msg)
            line = Text(f"{msg['consumer']:<11}", style=f"bold {STYLES[msg['consumer']]}")
            line.append(f"partition {msg['partition']}  order #{msg['order']:<3} "
                        f"{msg['key']:<6} ${msg['amount']:.2f}")
        console.print(line)
        seen.changed.set()


async def _until(seen: _Seen, condition: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out waiting for {what}")
        seen.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(seen.changed.wait(), remaining)


def _checks(seen: _Seen) -> list[tuple[bool, str]]:
    handled = [(m["key"], m["order"]) for m in seen.handled]
    orders = [m["order"] for m in seen.handled]
    once = sorted(orders) == list(range(1, EVENTS + 1))
    by_key: dict[tuple[str, str], list[int]] = defaultdict(list)
    for m in seen.handled:  # each consumer's stream arrives in the order it handled
        by_key[(m["consumer"], m["key"])].append(m["order"])
    in_order = all(seq == sorted(seq) for seq in by_key.values())
    partition_consumers: dict[int, set[str]] = defaultdict(set)
    for m in seen.handled:
        partition_consumers[m["partition"]].add(m["consumer"])
    split = all(len(c) == 1 for c in partition_consumers.values()) and all(
        any(m["consumer"] == name for m in seen.handled) for name in CONSUMERS
    )
    dupes = len(orders) - len(set(orders))
    return [
        (once, f"{len(seen.published)} events published, {len(handled)} handled: each exactly "
         f"once" + ("" if once else f" -- NOT SO ({dupes} duplicates, "
                    f"{EVENTS - len(set(orders))} missing)")),
        (in_order, "per-customer order kept: each customer's orders handled in the order "
         "they were placed"),
        (split, "the group split the work: each partition handled by one consumer, "
         "both consumers busy"),
    ]


async def orchestrate() -> int:
    """Run the demo; 0 if every check held."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    started = time.monotonic()
    seen = _Seen()
    with tempfile.TemporaryDirectory(prefix="shoal-demo-") as tmp:
        url = f"sqlite:///{tmp}/events.db"
        async with EventBus.connect(url) as bus:
            await bus.create_topic(TOPIC, partitions=PARTITIONS)
        console.rule("[bold]Shoal demo")
        console.print(f"broker [bold]{url}[/] - topic [bold]{TOPIC}[/] with {PARTITIONS} "
                      f"partitions; group [bold]{GROUP}[/] has two members, each its own "
                      "process; a third process publishes")
        procs = [await _spawn("consumer", name, url) for name in CONSUMERS]
        followers = [asyncio.create_task(_follow(p, seen, console)) for p in procs]
        try:
            await _until(
                seen,
                lambda: len(seen.owned) == 2 and all(seen.owned.values())
                and sorted(p for ps in seen.owned.values() for p in ps)
                == list(range(PARTITIONS)),
                "both consumers to own partitions",
            )
            producer = await _spawn("producer", url)
            followers.append(asyncio.create_task(_follow(producer, seen, console)))
            await _until(seen, lambda: len(seen.handled) >= EVENTS, f"{EVENTS} events handled")
            await asyncio.wait_for(producer.wait(), TIMEOUT)
        finally:
            for p in procs:
                if p.returncode is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    await asyncio.wait_for(p.wait(), 5)
                except TimeoutError:
                    p.kill()
            # read every line the children wrote (a late duplicate would show up here)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*followers, return_exceptions=True), 5)
            for task in followers:
                task.cancel()

    table = Table(title="who handled what", title_justify="left")
    for column in ("consumer", "partitions", "events", "customers"):
        table.add_column(column)
    for name in CONSUMERS:
        mine = [m for m in seen.handled if m["consumer"] == name]
        table.add_row(
            name, ", ".join(map(str, sorted({m["partition"] for m in mine}))) or "-",
            str(len(mine)), ", ".join(sorted({m["key"] for m in mine})) or "-",
        )
    console.print()
    console.print(table)
    checks = _checks(seen)
    for ok, text in checks:
        console.print(("[bold green]ok  [/]" if ok else "[bold red]FAIL[/]") + " " + text)
    console.print(f"done in {time.monotonic() - started:.1f}s")
    return 0 if all(ok for ok, _ in checks) else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m shoal.demo [consumer NAME URL | producer URL]``."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["consumer"] and len(args) == 3:
        asyncio.run(run_consumer(args[1], args[2]))
        return 0
    if args[:1] == ["producer"] and len(args) == 2:
        asyncio.run(run_producer(args[1]))
        return 0
    if args:
        sys.stderr.write("usage: python -m shoal.demo [consumer NAME URL | producer URL]\n")
        return 2
    try:
        return asyncio.run(orchestrate())
    except TimeoutError as exc:
        sys.stderr.write(f"demo failed: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
