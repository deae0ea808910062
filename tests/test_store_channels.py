"""The SQLite Store wakes a process only for writes under prefixes it watches."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from shoal.filewatch import file_set_signal_for
from shoal.store.channels import ALL, NAMES, key_channels, prefix_channel
from shoal.store.sqlite import SqliteStore

KEYS = ["a", "a/", "a/b", "a/b/", "a/b/c", "a/bc/d", "a//x", "/", "//", "/x/y",
        "shoal/registry/orders/orders-1", "shoal/groups/t/g/offsets/3", "shop/view/o1",
        "ü/ñ/日本", "x" * 1024, "a/" * 500]
PREFIXES = ["", "a", "a/", "a/b", "a/b/", "a/b/c", "a//", "/", "//", "shoal/",
            "shoal/registry/", "shoal/groups/t/g/", "shoal/gateway/routes", "ü/", "ü/ñ/"]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_every_key_under_a_prefix_touches_the_channel_its_watch_listens_to(prefix: str
                                                                           ) -> None:
    channel = prefix_channel(prefix)
    assert channel in NAMES
    for key in KEYS + [prefix + k for k in KEYS]:
        touched = key_channels(key)
        assert touched[0] == ALL and set(touched) <= set(NAMES)
        if key.startswith(prefix):
            assert channel in touched, (prefix, key)


def test_prefixes_with_fewer_than_one_complete_segment_listen_to_every_write() -> None:
    assert prefix_channel("") == prefix_channel("shoal") == ALL
    assert prefix_channel("shoal/registry/") != ALL
    assert prefix_channel("shoal/registry/") != prefix_channel("shop/view/")


async def test_a_write_nobody_watches_wakes_no_watcher(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    watcher, writer = await SqliteStore.open(url), await SqliteStore.open(url)
    try:
        signal = file_set_signal_for(tmp_path / "s.db-watch")
        signal.release()  # only looked at: the stores hold their own uses
        if not signal.native:
            pytest.skip("no inotify here: the fallback polls")
        stream = watcher.watch("shoal/registry/")
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        generation = signal.generation
        for i in range(20):
            await writer.put(f"shop/view/o{i}", b"{}")
        await asyncio.sleep(0.2)
        assert signal.generation == generation and not first.done()
        await writer.put("shoal/registry/orders/orders-1", b"up")
        change = await asyncio.wait_for(first, 5)
        assert change.key == "shoal/registry/orders/orders-1"
        assert signal.generation > generation
        await stream.aclose()
    finally:
        await writer.close()
        await watcher.close()


async def test_a_watch_sees_a_write_whose_wakeup_was_lost(tmp_path: Path) -> None:
    """A writer killed between its commit and its touch: the idle poll finds the change."""
    url = f"sqlite:///{tmp_path}/s.db"
    watcher, writer = await SqliteStore.open(url), await SqliteStore.open(url)
    try:
        writer._touch = lambda channels: None  # type: ignore[method-assign]
        stream = watcher.watch("shoal/registry/")
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        await writer.put("shoal/registry/x", b"1")
        change = await asyncio.wait_for(first, 5)
        assert change.key == "shoal/registry/x"
        await stream.aclose()
    finally:
        await writer.close()
        await watcher.close()


async def test_channel_files_are_created_and_closed_with_the_store(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    store = await SqliteStore.open(f"sqlite:///{tmp_path}/s.db")
    await store.put("a/b/c", b"1")
    names = set(os.listdir(tmp_path / "s.db-watch"))
    assert set(key_channels("a/b/c")) <= names <= set(NAMES)
    await store.close()
    assert len(os.listdir("/proc/self/fd")) == before
