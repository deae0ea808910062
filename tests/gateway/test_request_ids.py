"""X-Request-Id values the gateway generates: unique in a process and across forked workers."""

from __future__ import annotations

import os
import re

from shoal.gateway import proxy

ID = re.compile(rb"[0-9a-f]{32}")


def test_generated_ids_are_unique_and_32_hex_digits() -> None:
    ids = [proxy._request_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert all(ID.fullmatch(i) for i in ids[:1000] + ids[-1000:])


def test_forked_workers_do_not_repeat_each_other() -> None:
    mine = [proxy._request_id() for _ in range(100)]
    theirs: list[bytes] = []
    for _ in range(2):  # the gateway's workers are forked after the module was imported
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.write(write, b"\n".join(proxy._request_id() for _ in range(100)))
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            theirs += f.read().split(b"\n")
        assert os.waitpid(pid, 0)[1] == 0
    assert len(theirs) == 200
    every = mine + theirs
    assert len(set(every)) == len(every)
    assert len({i[:16] for i in every}) == 3  # a prefix per process
