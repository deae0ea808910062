"""Marks on the start-up timeline of ``shoal up`` (what ``bench/shop.py`` prints).

Off unless ``SHOAL_TIMELINE`` names a file: then ``mark("what")`` appends one line to it,
``<unix time> <pid> <CPU seconds of this process> <what>``, with one ``write`` on a file
opened for appending (lines of concurrent processes do not interleave). Every process of
``shoal up`` inherits the variable: the CLI, the plane, the fork server and the instances.
Nothing is imported here that the interpreter has not already loaded.
"""

from __future__ import annotations

import os
import time

ENV = "SHOAL_TIMELINE"


def mark(what: str) -> None:
    """Append ``what`` to the timeline file, if there is one."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = f"{time.time():.6f} {os.getpid()} {time.process_time():.3f} {what}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError:
        return
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read(path: str | os.PathLike[str]) -> list[tuple[float, int, float, str]]:
    """The marks in a timeline file, in time order: (unix time, pid, CPU seconds, what)."""
    marks = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split(" ", 3)
            if len(parts) != 4:
                continue
            try:
                marks.append((float(parts[0]), int(parts[1]), float(parts[2]), parts[3]))
            except ValueError:
                continue
    return sorted(marks)
