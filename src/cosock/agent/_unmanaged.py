"""TCP connections no census lists: made by C code that bypasses Python sockets (uvloop,
grpcio) or by processes not under ``cosock run``.

The census (``cosock._census``) only knows ``CoSocket``s, so ``cosock status`` asks the
kernel too: the established TCP sockets of each namespace (``sock_diag``, or
``/proc/<pid>/net/tcp`` and ``tcp6`` of a process in it where we may not enter it),
minus the 4-tuples the census already lists.  Socket inodes are matched
to processes through ``/proc/<pid>/fd`` of that namespace's processes.  This runs only
for ``cosock status`` (the ``connections`` op), never on a data path, and is bounded:
at most :data:`MAX_ROWS` rows are kept and :data:`MAX_FDS` fds read per call, so a guest
with thousands of sockets costs milliseconds, not the agent's loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .._errors import FallbackReason

__all__ = ["MAX_FDS", "MAX_ROWS", "RawKey", "Scan", "Tuple4", "netns_inode", "normalize", "scan"]

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


#: (local IP, local port, peer IP, peer port), IPs packed (4 or 16 bytes, network order).
RawKey = tuple[bytes, int, bytes, int]


def _packed(addr: str) -> bytes | None:
    for family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            return socket.inet_pton(family, addr.split("%", 1)[0])
    return None


def _unpacked(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


@functools.lru_cache(maxsize=1024)
def _proc_ip(text: str) -> bytes:
    """An IP as /proc/net/tcp spells it (hex of host-order 32-bit words), packed."""
    raw = bytes.fromhex(text)
    return b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))


def _proc_table(pid: int) -> Iterator[tuple[RawKey, int, int]]:
    """Established connections of ``pid``'s netns from /proc: (key, uid, socket inode)."""
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
                    (lip, lport), (pip, pport) = fields[1].split(":"), fields[2].split(":")
                    key = (_proc_ip(lip), int(lport, 16), _proc_ip(pip), int(pport, 16))
                    yield key, int(fields[7]), int(fields[9])
                except ValueError:
                    continue


#### sock_diag: the kernel filters the states, so TIME_WAIT-heavy tables cost nothing

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_DUMP = 0x1 | 0x300  # REQUEST | ROOT | MATCH
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLMSG = struct.Struct("=IHHII")
#: inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed inet_diag_sockid.
_REQ = struct.Struct("=BBBxI48x")
#: inet_diag_msg: family, state, timer, retrans, sport, dport (big-endian), src, dst,
#: if, cookie, expires, rqueue, wqueue, uid, inode.
_MSG = struct.Struct("=BBBB2H16s16s4x8x4x4x4xII")
_CLONE_NEWNET = 0x40000000


def _diag_socket(nsfd: int | None) -> socket.socket:
    """A sock_diag socket in the namespace ``nsfd`` (None: ours).  Entering it takes a
    short-lived thread (setns moves only the calling thread; the socket stays there)."""
    if nsfd is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
    made: list[socket.socket | BaseException] = []

    def enter() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(nsfd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            made.append(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG))
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=enter, name="cosock-netns")
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def _diag_table(sock: socket.socket) -> Iterator[tuple[RawKey, int, int]]:
    """Established connections seen by the sock_diag socket ``sock``."""
    sock.settimeout(5.0)
    count = 0
    for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
        body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 1 << int(_ESTABLISHED, 16))
        sock.send(
            _NLMSG.pack(_NLMSG.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_DUMP, seq, 0) + body
        )
        iplen = 4 if family == socket.AF_INET else 16
        done = False
        while not done:
            data = sock.recv(1 << 16)
            if not data:
                raise OSError("sock_diag: connection closed")
            off = 0
            while off + _NLMSG.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
                if length < _NLMSG.size:
                    raise OSError("sock_diag: bad message length")
                if kind == _NLMSG_DONE:
                    done = True
                    break
                if kind == _NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + _NLMSG.size)
                    raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
                if kind == _SOCK_DIAG_BY_FAMILY and length >= _NLMSG.size + _MSG.size:
                    fam, _st, _t, _r, sport, dport, src, dst, uid, inode = _MSG.unpack_from(
                        data, off + _NLMSG.size
                    )
                    count += 1
                    if fam == family and count <= _MAX_LINES:
                        key = (src[:iplen], socket.ntohs(sport), dst[:iplen], socket.ntohs(dport))
                        yield key, uid, inode
                off += (length + 3) & ~3


def _table(pid: int, own_ns: int | None) -> Iterator[tuple[RawKey, int, int]]:
    """Established connections of ``pid``'s netns: sock_diag if we may enter it, else
    /proc/<pid>/net/tcp{,6} (readable without privileges, slower)."""
    try:
        if netns_inode(pid) == own_ns:
            sock = _diag_socket(None)
        else:
            nsfd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                sock = _diag_socket(nsfd)
            finally:
                os.close(nsfd)
        with sock:
            rows = list(_diag_table(sock))  # an error (no inet_diag module?) comes first
    except OSError:
        yield from _proc_table(pid)
        return
    yield from rows


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


def _holders(pids: Iterable[int], wanted: set[int], budget: int) -> tuple[dict[int, int], int]:
    """Socket inode -> the first pid (of ``pids``) holding it, reading at most ``budget``
    fds; and what is left of the budget."""
    found: dict[int, int] = {}
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
    return found, max(0, budget)


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
    raw_known: set[tuple[int, RawKey]] = set()
    for ns, (la, lp, pa, pp) in known:
        lraw, praw = _packed(la), _packed(pa)
        if ns in spaces and lraw is not None and praw is not None:
            raw_known.add((ns, (lraw, lp, praw, pp)))
    own_ns = netns_inode(os.getpid())
    out = Scan([])
    comms: dict[int, str | None] = {}
    budget = MAX_FDS
    for ns, name in spaces.items():
        pids = members[ns]
        # Any process of the namespace shows its table; re-checked as it may have exited.
        reader = next((p for p in pids if netns_inode(p) == ns), None)
        if reader is None:
            continue
        seen: set[RawKey] = set()
        inodes: dict[int, dict[str, Any]] = {}
        for key, owner, inode in _table(reader, own_ns):
            if (uid is not None and owner != uid) or (ns, key) in raw_known or key in seen:
                continue
            seen.add(key)
            if len(out.rows) >= MAX_ROWS:
                out.truncated += 1
                continue
            tup = (_unpacked(key[0]), key[1], _unpacked(key[2]), key[3])
            row = _row(name, tup, owner)
            out.rows.append(row)
            if inode:
                inodes[inode] = row
        holders, budget = _holders(pids, set(inodes), budget)
        for inode, pid in holders.items():
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
