"""TCP connections no census lists: made by C code that bypasses Python sockets (uvloop,
grpcio) or by processes not under ``cosock run``.

The census (``cosock._census``) only knows ``CoSocket``s, so ``cosock status`` asks the
kernel too: the established rows of ``/proc/<pid>/net/tcp`` and ``tcp6`` of a process in
each namespace, minus the 4-tuples the census already lists.  Socket inodes are matched
to processes through ``/proc/<pid>/fd`` of that namespace's processes.  This runs only
for ``cosock status`` (the ``connections`` op), never on a data path, and is bounded:
at most :data:`MAX_ROWS` rows are kept and :data:`MAX_FDS` fds read per call, so a guest
with thousands of sockets costs milliseconds, not the agent's loop.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .._errors import FallbackReason

__all__ = ["MAX_FDS", "MAX_ROWS", "Scan", "normalize", "scan"]

#: Rows kept per call (over all namespaces); the rest are only counted.
MAX_ROWS = 1000
#: ``/proc/<pid>/fd`` entries read per call to find the processes of the rows.
MAX_FDS = 20000
#: Lines read per table (a namespace with more sockets is listed in part).
_MAX_LINES = 200_000
_ESTABLISHED = "01"

Tuple4 = tuple[str, int, str, int]


@dataclass
class Scan:
    """What :func:`scan` found: rows (wire dicts) and how many more there were."""

    rows: list[dict[str, Any]]
    truncated: int = 0


def normalize(addr: str) -> str:
    """One spelling per address, as ``getsockname`` spells it (``::ffff:127.0.0.1``)."""
    host = addr.split("%", 1)[0]
    for family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            return socket.inet_ntop(family, socket.inet_pton(family, host))
    return addr


def _to_kernel(addr: str, port: int) -> str:
    """``addr:port`` as /proc/net/tcp spells it (host-order 32-bit words, upper hex)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            raw = socket.inet_pton(family, addr.split("%", 1)[0])
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            return f"{words.hex().upper()}:{port:04X}"
    return f"?{addr}:{port}"


@functools.lru_cache(maxsize=1024)
def _host(text: str) -> str:
    raw = bytes.fromhex(text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words)


def _addr(text: str) -> tuple[str, int]:
    host, port = text.split(":")
    return _host(host), int(port, 16)


def _table(pid: int) -> Iterator[tuple[str, str, int, int]]:
    """Established connections of ``pid``'s netns as the kernel spells them:
    (local, peer, uid, socket inode)."""
    for name in ("tcp", "tcp6"):
        try:
            f = open(f"/proc/{pid}/net/{name}", encoding="ascii", errors="replace")  # noqa: SIM115
        except OSError:
            continue
        with f:
            next(f, None)  # header
            for n, line in enumerate(f):
                if n >= _MAX_LINES:
                    break
                fields = line.split()
                if len(fields) < 10 or fields[3] != _ESTABLISHED:
                    continue
                try:
                    uid, inode = int(fields[7]), int(fields[9])
                except ValueError:
                    continue
                yield fields[1], fields[2], uid, inode


def netns_inode(pid: int) -> int | None:
    """Inode of ``pid``'s network namespace, or None if we cannot see it."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _pids() -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir("/proc") if n.isdigit())
    except OSError:
        return []


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _holders(pids: Iterable[int], wanted: set[int]) -> dict[int, int]:
    """Socket inode -> the first pid (of ``pids``) holding it, reading at most MAX_FDS fds."""
    found: dict[int, int] = {}
    budget = MAX_FDS
    for pid in pids:
        if budget <= 0 or len(found) == len(wanted):
            break
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds[:budget]:
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inode = int(link[8:-1])
                    if inode in wanted:
                        found.setdefault(inode, pid)
        budget -= len(fds)
    return found


def scan(
    spaces: Mapping[int, str | None],
    known: set[tuple[int, Tuple4]],
    uid: int | None = None,
) -> Scan:
    """Established TCP connections in the namespaces ``spaces`` (netns inode -> guest
    name) that are not in ``known`` ((netns, normalized 4-tuple) the census lists).

    Args:
        uid: only sockets and processes of this user (``None``: everyone's).
    """
    members: dict[int, list[int]] = {ns: [] for ns in spaces}
    for pid in _pids():
        ns = netns_inode(pid)
        if ns in members and (uid is None or _owner(pid) == uid):
            members[ns].append(pid)
    raw_known = {
        (ns, _to_kernel(t[0], t[1]), _to_kernel(t[2], t[3])) for ns, t in known if ns in spaces
    }
    out = Scan([])
    comms: dict[int, str | None] = {}
    for ns, name in spaces.items():
        pids = members[ns]
        # Any process of the namespace shows its table; re-checked as it may have exited.
        reader = next((p for p in pids if netns_inode(p) == ns), None)
        if reader is None:
            continue
        seen: set[tuple[str, str]] = set()
        inodes: dict[int, dict[str, Any]] = {}
        for local, peer, owner, inode in _table(reader):
            if (uid is not None and owner != uid) or (ns, local, peer) in raw_known:
                continue
            if (local, peer) in seen:
                continue
            seen.add((local, peer))
            if len(out.rows) >= MAX_ROWS:
                out.truncated += 1
                continue
            try:
                tup = (*_addr(local), *_addr(peer))
            except (ValueError, OSError):
                continue
            row = _row(name, tup, owner)
            out.rows.append(row)
            if inode:
                inodes[inode] = row
        for inode, pid in _holders(pids, set(inodes)).items():
            if pid not in comms:
                comms[pid] = _comm(pid)
            inodes[inode]["pid"] = pid
            inodes[inode]["comm"] = comms[pid]
    return out


def _row(guest: str | None, tup: Tuple4, uid: int) -> dict[str, Any]:
    return {
        "guest": guest,
        "pid": None,
        "comm": None,
        "uid": uid,
        "local_addr": tup[0],
        "local_port": tup[1],
        "peer_addr": tup[2],
        "peer_port": tup[3],
        "path": "tcp",
        "accelerated": False,
        "fallback_reason": FallbackReason.NOT_INTERCEPTED.value,
        "error": None,
        "bytes_sent": None,
        "bytes_received": None,
        "switches": 0,
        "upgrades": 0,
        "upgrades_refused": 0,
    }
