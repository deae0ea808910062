"""A response's writes coalesced into one TLS record and one send, for a protocol we do not own.

uvicorn (the ``Service`` server) writes a response's head and its body with two
``transport.write`` calls. On a TLS transport each write is encrypted as its own record and
sent by its own ``send``: two records, two sends, and often two reads and two decryptions
on the caller, where the gateway's ``HttpServer`` writes one. ``CoalescedWrites`` stands
between such a protocol and its TLS transport: writes made in one turn of the event loop
are held and handed to the transport as one ``write`` at the end of the turn (a
``call_soon``), so a small response is one record and one send. Large writes are not
copied together (``JOIN_LIMIT``): they fill whole records anyway.

Ordering is kept: ``close`` and ``write_eof`` write what is held first; ``abort`` drops it
(as the transport's own ``abort`` drops its buffer). ``get_write_buffer_size`` counts what
is held. Everything else is the wrapped transport's (``get_extra_info``, reading flow
control, ``set_protocol``). Plaintext connections do not use it: their writes go to the
socket directly.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["JOIN_LIMIT", "CoalescedWrites"]

JOIN_LIMIT = 64 * 1024
"""Held bytes beyond which the held writes go out as they are, without being joined."""


class CoalescedWrites(asyncio.Transport):
    """``transport``, with the writes of one loop turn handed to it as one."""

    __slots__ = ("_held", "_held_size", "_loop", "transport")

    def __init__(self, transport: asyncio.Transport,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__()
        self.transport = transport
        self._loop = loop or asyncio.get_running_loop()
        self._held: list[bytes] = []
        self._held_size = 0

    # -- writing -----------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hold ``data`` until the end of this loop turn (with the turn's other writes)."""
        if not data:
            return
        held = self._held
        if not held:
            self._loop.call_soon(self.flush)
        held.append(bytes(data) if type(data) is not bytes else data)
        self._held_size += len(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Hand what is held to the transport now, as one write if it is small."""
        held = self._held
        if not held:
            return
        self._held = []
        size, self._held_size = self._held_size, 0
        if len(held) == 1:
            self.transport.write(held[0])
        elif size <= JOIN_LIMIT:
            self.transport.write(b"".join(held))
        else:
            for data in held:
                self.transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._held_size + self.transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.transport.get_write_buffer_limits()  # type: ignore[attr-defined, no-any-return]

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.transport.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    # -- closing -----------------------------------------------------------------------------
    def close(self) -> None:
        """Write what is held, then close (the transport sends its buffer first)."""
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        """Close at once: what is held is dropped, like the transport's own buffer."""
        self._held, self._held_size = [], 0
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    # -- the rest is the transport's -----------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.transport.get_protocol()

    def is_reading(self) -> bool:
        return self.transport.is_reading()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()
