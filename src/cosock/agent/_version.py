"""The agent's version page: one little-endian u64 at offset 0 of ``<socket>.version``.

The agent stores its registry version there before pushing a snapshot; a client compares
it with its own snapshot's version by reading memory, so it knows when pushes are still in
flight (its socket buffer was full) and waits for them instead of acting on a stale table.
"""

from __future__ import annotations

import struct
from pathlib import Path

VERSION = struct.Struct("<Q")


def version_path(socket_path: Path) -> Path:
    return socket_path.with_name(socket_path.name + ".version")
