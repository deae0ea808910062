"""Decrypted TLS reads into one reused buffer, instead of a fresh 256 KiB one per record.

An event loop's TLS transport hands a plain ``asyncio.Protocol`` its data by calling
``SSLObject.read(262144)`` for every read (uvloop's ``SSL_READ_MAX_SIZE``; the standard
loop does the same): each call allocates a 256 KiB ``bytes`` object and shrinks it to the
few hundred bytes of one HTTP exchange. Above glibc's mmap threshold (128 KiB) that is an
``mmap``, a page fault, an ``mremap`` and a ``munmap`` per read, on both ends of every
call (``strace -c``: one of each per read). It was the largest part of what strict mTLS
cost over plaintext: calling ``bench/mesh_tls.py``'s backend through a bare
``ConnectionPool`` at 32 keep-alive connections, CPU per call went from 75 to 45 us on
the client and from 80 to 46 us on the server (plaintext: 25 and 23).

Given an ``asyncio.BufferedProtocol`` instead, both loops decrypt straight into the
buffer that ``get_buffer`` returns (``SSLObject.read(n, buffer)``, no allocation).
``TlsReads`` makes a streaming protocol one: the connection classes used for TLS mix it in
(``class X(TlsReads, Streaming, asyncio.BufferedProtocol)`` - the streaming class must
derive from ``asyncio.BaseProtocol``, not ``asyncio.Protocol``, or loops ignore
``get_buffer``), and their ``data_received`` gets a ``bytes`` copy of exactly what
arrived. Plaintext connections keep the loop's own ``data_received`` path. A protocol we
do not own (uvicorn's, serving a ``Service`` over mTLS) is wrapped instead:
``buffered_reads(factory)`` makes each connection a ``BufferedReads`` forwarding to it,
which also hands that protocol its transport behind ``CoalescedWrites``
(``shoal.mesh.tls_writes``: a response's head and body are one TLS record).

The buffer is per thread: loops call ``get_buffer`` and then ``buffer_updated`` with
nothing in between on that thread, and the copy is taken before ``buffer_updated`` returns,
so every connection of a loop can share it (an event loop runs in one thread; OpenSSL
releases the GIL while it decrypts, so a buffer shared across threads would not do).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from shoal.mesh.tls_writes import CoalescedWrites

__all__ = ["READ_BUFFER_SIZE", "BufferedReads", "TlsReads", "buffered_reads"]

READ_BUFFER_SIZE = 256 * 1024
"""Bytes a TLS connection may decrypt per read (uvloop's own per-read maximum)."""

class _ThreadBuffer(threading.local):
    """``view``: this thread's read buffer (made on first use in each thread)."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_BUFFER_SIZE))


_local = _ThreadBuffer()


class TlsReads:
    """Mixin: ``get_buffer``/``buffer_updated`` feeding the class's ``data_received``."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        """The thread's read buffer (whatever the hint: the loop reads at most its size)."""
        return _local.view

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` arrived at the start of the buffer: hand a copy to ``data_received``."""
        self.data_received(_local.view[:nbytes].tobytes())  # type: ignore[attr-defined]


class BufferedReads(TlsReads, asyncio.BufferedProtocol):
    """A ``BufferedProtocol`` in front of a streaming ``protocol`` (which keeps its own
    transport: it may switch protocols, as uvicorn's does for a WebSocket upgrade). The
    protocol is given the transport behind ``CoalescedWrites``: the writes of one loop turn
    (uvicorn's head, then body) go out as one TLS record."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol: Any = protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.protocol.connection_made(CoalescedWrites(transport))  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    def eof_received(self) -> bool | None:
        return self.protocol.eof_received()  # type: ignore[no-any-return]

    def data_received(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def buffer_updated(self, nbytes: int) -> None:
        self.protocol.data_received(_local.view[:nbytes].tobytes())


def buffered_reads(factory: Callable[..., asyncio.BaseProtocol]
                   ) -> Callable[..., BufferedReads]:
    """``factory`` (a protocol class or factory, any arguments) with every protocol it
    makes wrapped in ``BufferedReads``: e.g. ``uvicorn.Config(http=buffered_reads(
    HttpToolsProtocol), ...)`` for a server that only takes TLS connections."""

    def make(*args: Any, **kwargs: Any) -> BufferedReads:
        return BufferedReads(factory(*args, **kwargs))

    alpn = getattr(factory, "alpn_protocols", None)  # what uvicorn reads off its class
    if alpn is not None:
        make.alpn_protocols = alpn  # type: ignore[attr-defined]
    return make
