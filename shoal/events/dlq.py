"""Dead letters: read a topic's ``TOPIC.dlq`` and replay it onto ``TOPIC``, once.

Shared by ``shoal dlq`` and the dashboard's replay button. What was replayed is marked
by the committed offsets of the ``shoal-replay`` group on ``TOPIC.dlq``; each replayed
event is published with a dedup id of its place in the dead-letter log, so a crash between
the publish and the mark cannot replay an event twice.
"""

from __future__ import annotations

import msgspec

from shoal.events.bus import EventBus
from shoal.events.event import Event, decode_record
from shoal.events.group import offset_key

REPLAY_GROUP = "shoal-replay"  # its committed offsets on TOPIC.dlq mark what was replayed
DLQ_EXTENSIONS = ("dlqreason", "dlqattempts", "dlqtopic", "dlqpartition", "dlqoffset",
                  "dlqgroup")


async def dead_letters(bus: EventBus, dlq: str) -> list[tuple[int, int, Event]]:
    """Every dead letter kept in ``dlq``: (partition, offset, event), partition by partition."""
    if await bus.broker.get_topic(dlq) is None:
        return []
    out = []
    for p, rng in enumerate(await bus.broker.ranges(dlq)):
        offset = rng.start
        while offset < rng.end:
            records = await bus.broker.read(dlq, p, offset, 1024)
            if not records:
                break
            out.extend((r.partition, r.offset, decode_record(r.value)) for r in records)
            offset = records[-1].offset + 1
    return out


def as_replay(dead: Event) -> Event:
    """The event as first published: dead-letter attributes off, original id back."""
    group = dead.extensions.get("dlqgroup")
    ext = {k: v for k, v in dead.extensions.items() if k not in DLQ_EXTENSIONS}
    original_id = dead.id.removesuffix(f".dlq.{group}") if group else dead.id
    return msgspec.structs.replace(dead, id=original_id or dead.id, extensions=ext)


async def replay_dead_letters(
    bus: EventBus, topic: str, letters: list[tuple[int, int, Event]] | None = None
) -> dict[str, int]:
    """Republish ``topic``'s dead letters not yet replayed; counts replayed, duplicates
    (already there) and skipped (replayed before)."""
    dlq_topic = f"{topic}.dlq"
    if letters is None:
        letters = await dead_letters(bus, dlq_topic)
    done = await bus.committed(dlq_topic, REPLAY_GROUP)
    counts = {"replayed": 0, "duplicates": 0, "skipped": 0}
    for p, offset, dead in letters:
        if offset < done.get(p, 0):
            counts["skipped"] += 1
            continue
        ack = await bus.publish_event(topic, as_replay(dead), dedup_id=f"replay/{p}/{offset}")
        counts["duplicates" if ack.duplicate else "replayed"] += 1
        # a crash between the publish and this is covered by the dedup id
        await bus.store.put(offset_key(dlq_topic, REPLAY_GROUP, p), str(offset + 1).encode())
    return counts
