"""Decrypted TLS reads into one reused buffer, instead of a fresh 256 KiB one per record.

An event loop's TLS transport hands a plain ``asyncio.Protocol`` its data by calling
``SSLObject.read(262144)`` for every read (uvloop's ``SSL_READ_MAX_SIZE``; the standard
loop does the same): each call allocates a 256 KiB ``bytes`` object and shrinks it to the
few hundred bytes of one HTTP exchange. Above glibc's mmap threshold (128 KiB) that is an
``mmap``, a page fault, an ``mremap`` and a ``munmap`` per read, on both ends of every
call - about 12 us of CPU per side per request measured with ``strace -c`` and ``perf``,
most of what made strict mTLS cost several times plaintext in ``bench/mesh_tls.py``.

Given an ``asyncio.BufferedProtocol`` instead, both loops decrypt straight into the
buffer that ``get_buffer`` returns (``SSLObject.read(n, buffer)``, no allocation).
``TlsReads`` makes a streaming protocol one: the connection classes used for TLS mix it in
(``class X(TlsReads, Streaming, asyncio.BufferedProtocol)`` - the streaming class must
derive from ``asyncio.BaseProtocol``, not ``asyncio.Protocol``, or loops ignore
``get_buffer``), and their ``data_received`` gets a ``bytes`` copy of exactly what
arrived. Plaintext connections keep the loop's own ``data_received`` path.

The buffer is per thread: loops call ``get_buffer`` and then ``buffer_updated`` with
nothing in between on that thread, and the copy is taken before ``buffer_updated`` returns,
so every connection of a loop can share it (an event loop runs in one thread; OpenSSL
releases the GIL while it decrypts, so a buffer shared across threads would not do).
"""

from __future__ import annotations

import threading

__all__ = ["READ_BUFFER_SIZE", "TlsReads"]

READ_BUFFER_SIZE = 256 * 1024
"""Bytes a TLS connection may decrypt per read (uvloop's own per-read maximum)."""

_local = threading.local()


def _buffer() -> memoryview:
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(READ_BUFFER_SIZE))
    return view


class TlsReads:
    """Mixin: ``get_buffer``/``buffer_updated`` feeding the class's ``data_received``."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        """The thread's read buffer (whatever the hint: the loop reads at most its size)."""
        return _buffer()

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` arrived at the start of the buffer: hand a copy to ``data_received``."""
        self.data_received(_buffer()[:nbytes].tobytes())  # type: ignore[attr-defined]
