"""The lab's state file: where it lives, how it is reserved, written and read.

The state file is both the record of what ``up`` built and the lock that stops two ``up`` of one
name from racing: it is created with O_EXCL before anything else. ``down`` never trusts it alone
(a crash can leave it stale or missing) and also scans namespaces and processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Root of all lab state; one ``<lab>.json`` and one ``<lab>/`` directory per lab.
LABS_DIR = Path("/run/cosock/labs")
STATE_VERSION = 1

State = dict[str, Any]


def state_path(lab: str) -> Path:
    return LABS_DIR / f"{lab}.json"


def lab_dir(lab: str) -> Path:
    return LABS_DIR / lab


def host_dir(lab: str, host: str) -> Path:
    return lab_dir(lab) / host


def agent_socket_path(lab: str, host: str) -> Path:
    return host_dir(lab, host) / "agent.sock"


def agent_log_path(lab: str, host: str) -> Path:
    return host_dir(lab, host) / "agent.log"


def guest_agent_dir(lab: str, guest: str) -> Path:
    """``<lab>/guests/<guest>``: a symlink to the directory of the host the guest is on."""
    return lab_dir(lab) / "guests" / guest


def guest_agent_socket(lab: str, guest: str) -> Path:
    """The agent path a guest's processes use; stable across migrations (see point_guest)."""
    return guest_agent_dir(lab, guest) / "agent.sock"


def point_guest(lab: str, guest: str, host: str) -> None:
    """(Re-)point the guest's agent directory at ``host``'s, atomically.

    Why a directory symlink: the agent socket and its version page both sit in the host's
    directory, so one rename moves a guest's processes to the new agent (on their next
    connect) without anyone having to change their environment. The target is relative, so
    the link stays right wherever the lab directory is looked at from.
    """
    link = guest_agent_dir(lab, guest)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{guest}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(os.path.join("..", host), tmp)
    os.replace(tmp, link)  # rename(2) replaces the old link itself, never what it points to


def reserve(lab: str) -> bool:
    """Atomically create an empty 'creating' state file; False if one already exists."""
    LABS_DIR.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(state_path(lab), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"version": STATE_VERSION, "name": lab, "status": "creating"}, f)
    return True


def write(lab: str, state: State) -> None:
    """Replace the state file atomically, so readers never see half a file."""
    path = state_path(lab)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read(lab: str) -> State | None:
    """The state, or None when the file is absent or unreadable (e.g. torn by a crash)."""
    try:
        data = json.loads(state_path(lab).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove(lab: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(lab).unlink()
    with contextlib.suppress(FileNotFoundError):
        (LABS_DIR / f".{lab}.lock").unlink()


def names() -> list[str]:
    """Lab names that have a state file."""
    try:
        return sorted(p.stem for p in LABS_DIR.glob("*.json") if not p.name.startswith("."))
    except OSError:
        return []


@contextlib.contextmanager
def lab_lock(lab: str) -> Iterator[None]:
    """Serialise changes of one lab's state (two migrations at once would lose an update)."""
    LABS_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(LABS_DIR / f".{lab}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def global_lock() -> Iterator[None]:
    """Serialise namespace creation/removal across processes (pytest-xdist workers, CLIs).

    The first ``netns.create`` turns /run/netns into a shared bind mount; two processes doing that
    at once can stack mounts, like concurrent ``ip netns add``. A short flock avoids the race.
    """
    LABS_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(LABS_DIR / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
