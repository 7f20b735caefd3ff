"""Settings read from the environment, in one place.

Every knob is an environment variable so that ``cosock run`` children inherit it.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Path of the host agent's Unix socket.
ENV_AGENT = "COSOCK_AGENT"
#: "0" switches off acceleration of connections inside one guest (loopback).
ENV_LOOPBACK = "COSOCK_LOOPBACK"
#: Ring capacity per direction, in bytes (rounded up to a power of two).
ENV_RING_SIZE = "COSOCK_RING_SIZE"
#: Spin budget in microseconds before a waiter blocks.
ENV_SPIN_US = "COSOCK_SPIN_US"
#: Set by ``cosock run``: enable interception at interpreter start-up.
ENV_ENABLE = "COSOCK_ENABLE"

DEFAULT_RING_SIZE = 1 << 20
#: Largest ring per direction a server accepts from a peer's offer.
ENV_RING_MAX = "COSOCK_RING_MAX"
DEFAULT_RING_MAX = 64 << 20
MIN_RING_SIZE = 1 << 12
MAX_RING_SIZE = 1 << 30
DEFAULT_SPIN_US = 50
#: Upper bound of the adaptive spin budget, in microseconds.
ENV_SPIN_MAX_US = "COSOCK_SPIN_MAX_US"
DEFAULT_SPIN_MAX_US = 2000
#: Fresh channels a process keeps made ahead for its next connects (0: make on demand).
ENV_CHANNEL_POOL = "COSOCK_CHANNEL_POOL"
DEFAULT_CHANNEL_POOL = 2


def default_agent_path() -> Path:
    """Per-user agent socket path, used when ``COSOCK_AGENT`` is unset."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK):
        return Path(base) / "cosock" / "agent.sock"
    return Path(f"/tmp/cosock-{os.getuid()}") / "agent.sock"


def agent_path() -> Path:
    value = os.environ.get(ENV_AGENT)
    return Path(value) if value else default_agent_path()


def loopback_enabled() -> bool:
    return os.environ.get(ENV_LOOPBACK, "1") not in ("0", "false", "no", "off")


def ring_size() -> int:
    """Ring capacity from the environment, validated and rounded up to a power of two."""
    raw = os.environ.get(ENV_RING_SIZE)
    size = DEFAULT_RING_SIZE if not raw else int(raw)
    if not MIN_RING_SIZE <= size <= MAX_RING_SIZE:
        raise ValueError(
            f"{ENV_RING_SIZE}={raw!r}: must be between {MIN_RING_SIZE} and {MAX_RING_SIZE}"
        )
    return 1 << (size - 1).bit_length()


def spin_ns() -> int:
    raw = os.environ.get(ENV_SPIN_US)
    us = DEFAULT_SPIN_US if not raw else int(raw)
    if us < 0:
        raise ValueError(f"{ENV_SPIN_US}={raw!r}: must be >= 0")
    return us * 1000


def spin_max_ns() -> int:
    raw = os.environ.get(ENV_SPIN_MAX_US)
    us = DEFAULT_SPIN_MAX_US if not raw else int(raw)
    if us < 0:
        raise ValueError(f"{ENV_SPIN_MAX_US}={raw!r}: must be >= 0")
    return max(us * 1000, spin_ns())


def ring_max() -> int:
    raw = os.environ.get(ENV_RING_MAX)
    return max(DEFAULT_RING_MAX if not raw else int(raw), ring_size())


def channel_pool() -> int:
    raw = os.environ.get(ENV_CHANNEL_POOL)
    n = DEFAULT_CHANNEL_POOL if not raw else int(raw)
    if not 0 <= n <= 64:
        raise ValueError(f"{ENV_CHANNEL_POOL}={raw!r}: must be between 0 and 64")
    return n
