"""Start-up timeline marks: written only when SHOAL_TIMELINE names a file; read back in
time order, a malformed line skipped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shoal.control.timeline import ENV, mark, read


def test_marks_go_to_the_named_file_and_malformed_lines_are_skipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "timeline"
    monkeypatch.delenv(ENV, raising=False)
    mark("unseen")
    assert not path.exists()
    monkeypatch.setenv(ENV, str(path))
    mark("plane: one thing")
    with path.open("a") as f:
        f.write("garbage\nx 1 2 not a time\n1.0 pid 0.1 not a pid\n")
    mark("then another")
    marks = read(path)
    assert [what for _, _, _, what in marks] == ["plane: one thing", "then another"]
    assert {pid for _, pid, _, _ in marks} == {os.getpid()}
    assert marks[0][0] <= marks[1][0] and marks[0][2] <= marks[1][2]


def test_an_unwritable_timeline_is_ignored(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, str(tmp_path / "no" / "such" / "dir"))
    mark("nowhere")  # no exception: a timeline never breaks what it watches
