"""Wake up when another process writes a file: inotify on Linux, a slow poll elsewhere.

SQLite gives no cross-process notification. Shoal's SQLite adapters share one database
file between processes, and a reader must learn of new rows without busy-polling the
table; the kernel already knows when the database or its write-ahead log is written, so
we ask it (``inotify(7)`` through ``ctypes``, no dependency). Where inotify is missing we
fall back to polling at ``FALLBACK_POLL`` seconds, which is correct but slower.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
import weakref
from pathlib import Path

FALLBACK_POLL = 0.05
_IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x8, 0x80, 0x100
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000
_HEADER = struct.Struct("iIII")

_libc = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.inotify_init1  # noqa: B018 - probe
except (OSError, AttributeError):
    _libc = None


class FileChangeSignal:
    """An awaitable "something wrote these files" signal for one directory.

    ``wait(timeout)`` returns True after the next write to any watched file name (or
    False on timeout). One inotify descriptor serves every waiter in the loop; users
    get it from :func:`signal_for` and hand it back with :meth:`release`.
    """

    def __init__(self, paths: list[Path]) -> None:
        self._dir = paths[0].parent.resolve()
        self._names = {p.name.encode() for p in paths}
        self._event = asyncio.Event()
        self.generation = 0
        self._fd: int | None = None
        self._reading = False  # the loop reads the descriptor from the first wait() on
        self._loop = asyncio.get_running_loop()
        self._users = 0
        self.closed = False
        self._finalizer: weakref.finalize | None = None
        if _libc is not None:
            fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd >= 0:
                mask = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE
                if _libc.inotify_add_watch(fd, str(self._dir).encode(), mask) >= 0:
                    self._fd = fd
                    # inotify instances are few (fs.inotify.max_user_instances, often 128
                    # per user): one forgotten signal must not starve other processes.
                    self._finalizer = weakref.finalize(self, os.close, fd)
                else:
                    os.close(fd)

    @property
    def native(self) -> bool:
        """True when the kernel notifies us (no polling)."""
        return self._fd is not None

    def _on_readable(self) -> None:
        try:
            buf = os.read(self._fd, 64 * 1024)  # type: ignore[arg-type]
        except BlockingIOError:
            return
        hit, pos = False, 0
        while pos + _HEADER.size <= len(buf):
            _wd, _mask, _cookie, length = _HEADER.unpack_from(buf, pos)
            name = buf[pos + _HEADER.size : pos + _HEADER.size + length].rstrip(b"\0")
            pos += _HEADER.size + length
            if name in self._names:
                hit = True
        if hit:
            self.notify()

    def notify(self) -> None:
        """Wake every current waiter (also used by writers in the same process)."""
        self.generation += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, timeout: float | None = None, *, since: int | None = None) -> bool:
        """Wait for the next change (or for any since ``generation`` was ``since``).

        True if one came before ``timeout``.
        """
        if since is not None and since != self.generation:
            return True
        if self._fd is None:
            timeout = FALLBACK_POLL if timeout is None else min(timeout, FALLBACK_POLL)
        elif not self._reading:
            # Publish-only processes never get here, so their own writes never wake them.
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
            return True
        except TimeoutError:
            return self._fd is None  # polling: report a possible change

    def release(self) -> None:
        """Hand back one use from :func:`signal_for`; the last one stops watching."""
        self._users -= 1
        if self._users <= 0:
            self.close()

    def close(self) -> None:
        """Stop watching."""
        self.closed = True
        if self._fd is not None:
            try:
                if self._reading:
                    self._loop.remove_reader(self._fd)
            except Exception:
                pass
            if self._finalizer is not None:
                self._finalizer()  # closes the descriptor, once
            self._fd = None


class FileSetSignal(FileChangeSignal):
    """An awaitable "something wrote one of these files" signal, files watched one by one.

    Unlike ``FileChangeSignal`` (a directory: every write in it wakes the reader, even
    to files it ignores), only writes to the files ``add``-ed wake this process at all.
    The files must exist when added and stay (writers never delete them). Shared per
    directory and loop through :func:`file_set_signal_for`; hand a use back with
    :meth:`release`.
    """

    def __init__(self) -> None:  # not the base's: no directory watch
        self._event = asyncio.Event()
        self.generation = 0
        self._fd: int | None = None
        self._reading = False
        self._loop = asyncio.get_running_loop()
        self._users = 0
        self._watched: set[str] = set()
        self.closed = False
        self._finalizer: weakref.finalize | None = None
        if _libc is not None:
            fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd >= 0:
                self._fd = fd
                self._finalizer = weakref.finalize(self, os.close, fd)

    def add(self, path: Path) -> None:
        """Wake on writes to ``path`` too (an existing file); a no-op if already watched."""
        name = str(path)
        if name in self._watched or self._fd is None:
            return
        assert _libc is not None  # we have a descriptor
        if _libc.inotify_add_watch(self._fd, name.encode(), _IN_MODIFY) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify cannot watch {name}: {os.strerror(err)}")
        self._watched.add(name)

    def _on_readable(self) -> None:
        try:
            buf = os.read(self._fd, 64 * 1024)  # type: ignore[arg-type]
        except BlockingIOError:
            return
        if buf:
            self.notify()


_file_sets: weakref.WeakValueDictionary[tuple[int, str], FileSetSignal] = (
    weakref.WeakValueDictionary()
)


def file_set_signal_for(directory: Path) -> FileSetSignal:
    """The shared ``FileSetSignal`` for files in ``directory`` in the running loop.

    Each call is one use of the signal; give it back with :meth:`FileSetSignal.release`.
    """
    loop = asyncio.get_running_loop()
    key = (id(loop), str(directory.resolve()))
    sig = _file_sets.get(key)
    if sig is None or sig._loop is not loop or sig.closed:
        sig = FileSetSignal()
        _file_sets[key] = sig
    sig._users += 1
    return sig


_signals: weakref.WeakValueDictionary[tuple[int, str], FileChangeSignal] = (
    weakref.WeakValueDictionary()
)


def signal_for(db_path: Path) -> FileChangeSignal:
    """The shared signal for an SQLite database file (and its -wal) in the running loop.

    Each call is one use of the signal; give it back with :meth:`FileChangeSignal.release`.
    """
    loop = asyncio.get_running_loop()
    key = (id(loop), str(db_path.resolve()))
    sig = _signals.get(key)
    if sig is None or sig._loop is not loop or sig.closed:
        sig = FileChangeSignal([db_path, db_path.with_name(db_path.name + "-wal")])
        _signals[key] = sig
    sig._users += 1
    return sig
