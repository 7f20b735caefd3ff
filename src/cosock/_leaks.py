"""What a process holds that a connection may leak: fds, memfds (open and mapped), threads,
child processes, and network namespaces of labs.

Used by the test suite's ``leak_check`` fixture and by ``cosock torture``: take a
:func:`snapshot` before, another after, and :func:`compare` them.  Resources are named
(fd number + target, thread ident, pid), so a report says *what* leaked, not just how many.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["KINDS", "Snapshot", "compare", "settled_leaks", "snapshot"]

#: Leak kinds, in the order ``cosock torture`` reports them.
KINDS = ("fds", "memfds", "mappings", "threads", "processes", "namespaces")
#: Per-process service threads that live as long as the process, by design.
_SERVICE_THREADS = frozenset({"cosock-residency", "cosock-census"})
_NETNS_DIR = Path("/run/netns")


@dataclass(frozen=True)
class Snapshot:
    fds: dict[int, str]
    memfds: frozenset[str]  # "fd N" entries whose target is a memfd
    mappings: frozenset[str]  # memfd mappings (address range + name)
    threads: frozenset[int]
    processes: frozenset[int]
    namespaces: frozenset[str] = field(default=frozenset())


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the fd of the listdir itself, gone by now
    return out


def _mappings() -> frozenset[str]:
    with open("/proc/self/maps") as f:
        rows = (line.split(maxsplit=5) for line in f if "/memfd:" in line)
        return frozenset(f"{row[0]} {row[-1].strip()}" for row in rows)


def _children() -> frozenset[int]:
    kids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                kids.update(int(pid) for pid in f.read().split())
        except OSError:
            continue
    return frozenset(kids)


def _namespaces(prefixes: Iterable[str]) -> frozenset[str]:
    wanted = tuple(prefixes)
    if not wanted or not _NETNS_DIR.is_dir():
        return frozenset()
    return frozenset(n for n in os.listdir(_NETNS_DIR) if n.startswith(wanted))


def snapshot(netns_prefixes: Iterable[str] = (), ignore_fds: Iterable[int] = ()) -> Snapshot:
    """The resources this process holds now.

    Args:
        netns_prefixes: count /run/netns entries with these prefixes (a lab's namespaces).
        ignore_fds: process-lifetime singletons (e.g. the offer sender socket).
    """
    from . import _pool

    _pool.reset()  # stocked channels were never offered to anyone: not leaks
    skip = set(ignore_fds)
    fds = {fd: target for fd, target in _fds().items() if fd not in skip}
    return Snapshot(
        fds=fds,
        memfds=frozenset(f"fd {fd}" for fd, t in fds.items() if t.startswith("/memfd:")),
        mappings=_mappings(),
        threads=frozenset(
            t.ident or 0 for t in threading.enumerate() if t.name not in _SERVICE_THREADS
        ),
        processes=_children(),
        namespaces=_namespaces(netns_prefixes),
    )


def compare(before: Snapshot, after: Snapshot) -> dict[str, list[str]]:
    """What ``after`` holds that ``before`` did not, per kind (fds by number and target)."""
    new_fds = [f"fd {fd} -> {t}" for fd, t in sorted(after.fds.items()) if before.fds.get(fd) != t]
    return {
        "fds": new_fds,
        "memfds": sorted(after.memfds - before.memfds),
        "mappings": sorted(after.mappings - before.mappings),
        "threads": [str(t) for t in sorted(after.threads - before.threads)],
        "processes": [str(p) for p in sorted(after.processes - before.processes)],
        "namespaces": sorted(after.namespaces - before.namespaces),
    }


def settled_leaks(
    before: Snapshot, take: Callable[[], Snapshot], patience: float = 3.0
) -> dict[str, list[str]]:
    """``compare(before, take())``, retried until empty or ``patience`` runs out: threads
    and children of a finished test may need a moment to exit (and be reaped)."""
    deadline = time.monotonic() + patience
    while True:
        leaks = compare(before, take())
        if not any(leaks.values()) or time.monotonic() >= deadline:
            return leaks
        time.sleep(0.05)
