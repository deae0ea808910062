"""Inotify descriptors are few per user: opening and closing SQLite stores and buses
must hand every one back (a leak once starved another process of its watcher in CI)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from shoal.events import EventBus
from shoal.filewatch import file_set_signal_for, signal_for
from shoal.store.sqlite import SqliteStore


def inotify_descriptors() -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in os.listdir(fds):
        try:
            count += os.readlink(fds / fd) == "anon_inode:inotify"
        except OSError:
            pass
    return count


async def test_closed_stores_and_buses_release_their_watchers(tmp_path: Path) -> None:
    before = inotify_descriptors()
    for i in range(150):  # more than the usual fs.inotify.max_user_instances (128)
        store = await SqliteStore.open(f"sqlite:///{tmp_path}/s{i}.db")
        bus = await EventBus.connect(f"sqlite:///{tmp_path}/b{i}.db")
        await bus.close()
        await store.close()
    assert inotify_descriptors() == before


async def test_a_signal_lives_while_any_user_holds_it(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    first, second = signal_for(db), signal_for(db)
    assert first is second and first.native
    first.release()
    assert not second.closed and second.native
    second.release()
    assert second.closed
    third = signal_for(db)  # a released signal is never handed out again
    assert third is not second and third.native
    third.release()


async def test_a_forgotten_signal_closes_its_descriptor_when_collected(tmp_path: Path) -> None:
    before = inotify_descriptors()
    sig = signal_for(tmp_path / "y.db")
    assert inotify_descriptors() == before + 1
    del sig
    assert inotify_descriptors() == before


async def test_a_file_set_signal_wakes_only_for_the_files_added(tmp_path: Path) -> None:
    watched, other = tmp_path / "watched", tmp_path / "other"
    watched.write_bytes(b"")
    other.write_bytes(b"")
    signal = file_set_signal_for(tmp_path)
    try:
        assert signal.native
        signal.add(watched)
        signal.add(watched)  # twice: one watch
        waiting = asyncio.ensure_future(signal.wait(0.3))
        await asyncio.sleep(0.01)
        other.write_bytes(b"x")
        assert await waiting is False
        waiting = asyncio.ensure_future(signal.wait(5))
        await asyncio.sleep(0.01)
        watched.write_bytes(b"x")
        assert await waiting is True
        with pytest.raises(OSError, match="inotify cannot watch"):
            signal.add(tmp_path / "missing")
    finally:
        signal.release()
    assert signal.closed
