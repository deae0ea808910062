"""``shoal routes`` for real: a file that does not validate is never stored (exit 2, one line
naming the file, line and key); a valid one is stored, shown and cleared."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from shoal.store import connect_store

KEY = "shoal/gateway/routes"


def shoal(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SHOAL_BROKER", "SHOAL_STORE")}
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], cwd=cwd, env=env,
                          text=True, capture_output=True, timeout=60)


def stored(url: str) -> bytes | None:
    async def get() -> bytes | None:
        store = await connect_store(url)
        try:
            entry = await store.get(KEY)
            return None if entry is None else entry.value
        finally:
            await store.close()

    return asyncio.run(get())


def test_set_show_clear(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/store.db"
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {name: a, service: svc-a}\n- name: b\n  service: svc-b\n  tmeout: 2s\n")
    result = shoal("routes", "set", str(bad), "--store", url, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"shoal: error: {bad}, line 4: routes: route 'b' (routes[1]): "
                               "tmeout: unknown key (did you mean 'timeout'?)"), lines
    assert stored(url) is None

    good = tmp_path / "routes.yaml"
    text = ("- {name: api, match: {path: {prefix: /api}, methods: [GET]}, service: api}\n"
            "- {name: rest, match: {path: {prefix: /api/users}}, service: users}\n")
    good.write_text(text)
    result = shoal("routes", "set", str(good), "--store", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "stored 2 route(s)" in result.stdout and "note: route 'api'" in result.stdout
    assert stored(url) == text.encode()

    result = shoal("routes", "show", "--store", url, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == text, result

    result = shoal("routes", "clear", "--store", url, cwd=tmp_path)
    assert result.returncode == 0 and stored(url) is None, result
