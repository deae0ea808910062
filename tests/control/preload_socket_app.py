"""An app whose import opens a socket (as a database client connecting at import would):
every instance forked after it would share that one connection, so the fork server must
not preload it."""

from __future__ import annotations

import socket

CONNECTION = socket.socket()  # never connected: the descriptor is the point
