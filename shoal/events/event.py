"""`Event`: the CloudEvents 1.0 envelope every event in Shoal travels in.

Context attributes are fields; extension attributes (``partitionkey``, ``traceparent``,
the dead-letter attributes, anything a user adds) live in ``extensions``. The envelope is
a ``msgspec.Struct``: it is what the log stores (as MessagePack, see ``encode_record``)
and what handlers receive. The CloudEvents wire formats (JSON structured mode and the
HTTP binary binding) live in ``shoal.events.codec``.
"""

from __future__ import annotations

import itertools
import os
from datetime import UTC, datetime
from typing import Any

import msgspec

SPECVERSION = "1.0"
ExtensionValue = str | int | bool


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A CloudEvents 1.0 event: required ``id``, ``source``, ``type``; optional the rest."""

    id: str
    source: str
    type: str
    specversion: str = SPECVERSION
    datacontenttype: str | None = None
    dataschema: str | None = None
    subject: str | None = None
    time: datetime | None = None
    data: Any = None
    extensions: dict[str, ExtensionValue] = {}

    @property
    def key(self) -> str | None:
        """The partition key (the ``partitionkey`` extension), if any."""
        k = self.extensions.get("partitionkey")
        return None if k is None else str(k)

    @property
    def traceparent(self) -> str | None:
        """The W3C trace context carried by the event, if any."""
        t = self.extensions.get("traceparent")
        return None if t is None else str(t)


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(Event)


def encode_record(event: Event) -> bytes:
    """The compact, lossless form in which the log stores an event."""
    return _record_encoder.encode(event)


def decode_record(raw: bytes) -> Event:
    """Inverse of ``encode_record``."""
    return _record_decoder.decode(raw)


_id_prefix = os.urandom(8).hex()
_id_counter = itertools.count()


def new_event_id() -> str:
    """A unique event id: a random per-process prefix and a counter (cheaper than uuid4)."""
    return f"{_id_prefix}-{next(_id_counter):x}"


def now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)
