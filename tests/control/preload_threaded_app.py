"""An app whose import starts a thread: forking after importing it would be unsafe, so the
fork server must not preload it."""

from __future__ import annotations

import os
import threading

from tests.control.preload_app import probe

IMPORTED_IN = os.getpid()
_stop = threading.Event()
threading.Thread(target=_stop.wait, daemon=True, name="preload-test").start()
svc = probe("preload-threaded", IMPORTED_IN)
