"""Which partition an event goes to, and what a valid topic name is."""

from __future__ import annotations

import functools
import re
import zlib

from shoal.errors import TopicError

_TOPIC = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


@functools.lru_cache(maxsize=65536)
def partition_for(key: str, partitions: int) -> int:
    """A stable partition for ``key``: CRC-32 of its UTF-8 bytes modulo the partition count.

    Stable across processes, machines and backends (unlike ``hash()``, which is salted).
    Cached: hot keys repeat.
    """
    return zlib.crc32(key.encode()) % partitions


def check_topic_name(name: object) -> str:
    """``name`` if it is a valid topic name, else a ``TopicError`` saying what is allowed."""
    if not isinstance(name, str) or not _TOPIC.match(name):
        raise TopicError(
            f"topic name {name!r} is invalid: use 1-200 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return name


def check_group_name(name: object) -> str:
    """``name`` if it is a valid consumer group name."""
    if not isinstance(name, str) or not _GROUP.match(name):
        raise TopicError(
            f"group name {name!r} is invalid: use 1-200 letters, digits, '.', '_' or '-'"
        )
    return name
