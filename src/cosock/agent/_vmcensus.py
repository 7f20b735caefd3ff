"""The census of the processes inside QEMU guests, as their VM gateway holds it.

A process in a VM cannot publish into the host agent's census directory (another kernel), so
its census thread (``cosock._census``) sends the same document to the gateway over the
connection it already has (``census`` request, only when something changed, at most once a
second). The gateway knows the sender by its fw_cfg token (never by source address), so
every row it keeps is marked with that VM's name: a VM cannot report rows for another VM.
The host agent lists these processes beside its own in ``connections`` and ``metrics``.

A VM is not trusted: each report is checked field by field and bounded (rows, string
lengths, reports per VM, one report per connection every half second); a bad one is refused
with a message saying what is wrong and changes nothing (the sender's previous report, the
other VMs' rows and the agent stay as they were). A report lives as long as the gateway
connection that sent it, or until its process sends ``null`` (nothing left to list).
"""

from __future__ import annotations

import functools
import ipaddress
import threading
import time
from typing import Any

from ._connections import PATHS

#: Rows one report may hold (the guest sends at most this many and counts the rest).
MAX_CONNECTIONS = 1000
MAX_LISTENERS = 256
MAX_FALLBACK_REASONS = 64
#: Rows (connections + listeners) one VM may have listed over all its processes.
MAX_ROWS_PER_VM = 4096
#: Processes (gateway connections with a report) one VM may have listed.
MAX_REPORTS_PER_VM = 64
#: A connection's reports come at most this often (the census thread sends once a second).
MIN_INTERVAL_S = 0.5
#: Longest string accepted for an address, a reason or a path; for an error; for ``comm``.
MAX_WORD = 64
MAX_ERROR = 256
MAX_COMM = 64

_INT_FIELDS = ("local_port", "peer_port", "switches", "upgrades", "upgrades_refused")
_OPT_INT_FIELDS = ("bytes_sent", "bytes_received")
_INT_MAX = (1 << 63) - 1
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class CensusRejected(ValueError):
    """A census report the gateway refuses (the message says why; nothing was changed)."""


class VmCensus:
    """The latest census report of each gateway connection, by VM; thread-safe (the gateway
    serves each connection in its own thread, the agent's loop reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: gateway connection id -> (guest, checked document, monotonic time received).
        self._reports: dict[int, tuple[str, dict[str, Any], float]] = {}
        #: Refused reports by VM since the gateway started (shown by ``cosock status``).
        self.rejected: dict[str, int] = {}

    def report(
        self, conn: int, guest: str, address: str, doc: object, others: dict[str, str]
    ) -> None:
        """Keep ``doc`` as connection ``conn``'s census (``None``: drop it). ``address`` is
        the VM's, ``others`` the other VMs of the host (name -> address): a row whose local
        address is another VM's is refused.

        Raises:
            CensusRejected: the document is malformed, too big, or comes too soon.
        """
        if doc is None:
            self.drop(conn)
            return
        try:
            checked = _checked(doc, address, {a: g for g, a in others.items() if g != guest})
        except CensusRejected:
            with self._lock:
                self.rejected[guest] = self.rejected.get(guest, 0) + 1
            raise
        rows = len(checked["connections"]) + len(checked["listeners"])
        now = time.monotonic()
        with self._lock:
            try:
                previous = self._reports.get(conn)
                if previous is not None and now - previous[2] < MIN_INTERVAL_S:
                    raise CensusRejected(
                        f"census: at most one report every {MIN_INTERVAL_S} s per connection"
                    )
                siblings = [d for c, (g, d, _) in self._reports.items() if g == guest and c != conn]
                if previous is None and len(siblings) >= MAX_REPORTS_PER_VM:
                    raise CensusRejected(
                        f"census: {guest} already has {MAX_REPORTS_PER_VM} processes listed"
                    )
                held = sum(len(d["connections"]) + len(d["listeners"]) for d in siblings)
                if held + rows > MAX_ROWS_PER_VM:
                    raise CensusRejected(
                        f"census: {guest} would list {held + rows} rows, more than "
                        f"{MAX_ROWS_PER_VM}"
                    )
            except CensusRejected:
                self.rejected[guest] = self.rejected.get(guest, 0) + 1
                raise
            self._reports[conn] = (guest, checked, now)

    def drop(self, conn: int) -> None:
        """Forget connection ``conn``'s report (it closed, or its process has nothing left)."""
        with self._lock:
            self._reports.pop(conn, None)

    def drop_guest(self, guest: str) -> None:
        """Forget every report of ``guest`` (it left this host)."""
        with self._lock:
            for conn in [c for c, (g, _, _) in self._reports.items() if g == guest]:
                del self._reports[conn]

    def processes(self) -> list[dict[str, Any]]:
        """Every report as the agent lists a process (``_connections.collect``'s shape), with
        ``guest`` the VM's name, ``vm`` true and ``uid`` the VM's (not a host user), sorted by
        VM and pid."""
        now = time.monotonic()
        with self._lock:
            reports = list(self._reports.values())
        out = [
            {**doc, "guest": guest, "vm": True, "age": round(now - at, 3)}
            for guest, doc, at in reports
        ]
        return sorted(out, key=lambda p: (p["guest"], p["pid"]))


#### Checking a report (every field; the first problem is the error)


def _checked(doc: object, address: str, others: dict[str, str]) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise CensusRejected("census: the report is not an object")
    pid = doc.get("pid")
    if type(pid) is not int or not 0 < pid < 1 << 22:
        raise CensusRejected(f"census: pid {pid!r} is not a process id")
    comm = doc.get("comm", "")
    if not isinstance(comm, str) or len(comm) > MAX_COMM:
        raise CensusRejected(f"census: comm must be a string of at most {MAX_COMM} characters")
    conns, listeners, fallbacks = doc.get("connections"), doc.get("listeners"), doc.get("fallbacks")
    if not isinstance(conns, list) or not isinstance(listeners, list):
        raise CensusRejected("census: connections and listeners must be lists")
    if not isinstance(fallbacks, dict):
        raise CensusRejected("census: fallbacks must be an object")
    if len(conns) > MAX_CONNECTIONS:
        raise CensusRejected(
            f"census: {len(conns)} connections in one report, more than {MAX_CONNECTIONS}"
        )
    if len(listeners) > MAX_LISTENERS:
        raise CensusRejected(
            f"census: {len(listeners)} listeners in one report, more than {MAX_LISTENERS}"
        )
    if len(fallbacks) > MAX_FALLBACK_REASONS:
        raise CensusRejected(f"census: more than {MAX_FALLBACK_REASONS} fallback reasons")
    truncated = doc.get("truncated", 0)
    if not _is_int(truncated):
        raise CensusRejected("census: truncated must be a count")
    for reason, count in fallbacks.items():
        if not _word(reason) or not _is_int(count):
            raise CensusRejected(f"census: fallback {reason!r}: {count!r} is not reason: count")
    own = _ip(address)
    theirs = {ip: name for ip, name in ((_ip(a), g) for a, g in others.items()) if ip is not None}
    rows = []
    for i, c in enumerate(conns):
        try:
            rows.append(_connection(c, own, theirs))
        except CensusRejected as exc:
            raise CensusRejected(f"census: connection {i}: {exc}") from None
    outs = []
    for i, x in enumerate(listeners):
        try:
            outs.append(_listener(x, own, theirs))
        except CensusRejected as exc:
            raise CensusRejected(f"census: listener {i}: {exc}") from None
    return {
        "pid": pid,
        "uid": None,  # a VM's user ids mean nothing on the host
        "comm": comm,
        "connections": rows,
        "listeners": outs,
        "fallbacks": {str(k): int(v) for k, v in fallbacks.items()},
        "truncated": truncated,
    }


def _connection(c: object, own: _IP | None, theirs: dict[_IP, str]) -> Any:
    if not isinstance(c, dict):
        raise CensusRejected("not an object")
    for key in _INT_FIELDS:
        if not _is_int(c.get(key)):
            raise CensusRejected(f"{key} must be a non-negative integer")
    for key in ("local_port", "peer_port"):
        if not 0 < c[key] < 65536:
            raise CensusRejected(f"{key} {c[key]} is outside 1..65535")
    for key in _OPT_INT_FIELDS:
        if c.get(key) is not None and not _is_int(c.get(key)):
            raise CensusRejected(f"{key} must be a non-negative integer or null")
    if c.get("path") not in PATHS:
        raise CensusRejected(f"path {c.get('path')!r} is not one of {', '.join(PATHS)}")
    if not isinstance(c.get("accelerated"), bool):
        raise CensusRejected("accelerated must be true or false")
    reason, error = c.get("fallback_reason"), c.get("error")
    if reason is not None and not _word(reason):
        raise CensusRejected(f"fallback_reason must be a word of at most {MAX_WORD} characters")
    if error is not None and not (isinstance(error, str) and len(error) <= MAX_ERROR):
        raise CensusRejected(f"error must be a string of at most {MAX_ERROR} characters")
    local, peer = _ip(c.get("local_addr")), _ip(c.get("peer_addr"))
    if local is None or peer is None:
        raise CensusRejected("local_addr and peer_addr must be IP addresses")
    _mine(local, own, theirs)
    return {
        "local_addr": str(c["local_addr"]),
        "local_port": c["local_port"],
        "peer_addr": str(c["peer_addr"]),
        "peer_port": c["peer_port"],
        "accelerated": c["accelerated"],
        "path": c["path"],
        "fallback_reason": reason,
        "error": error,
        "bytes_sent": c.get("bytes_sent"),
        "bytes_received": c.get("bytes_received"),
        "switches": c["switches"],
        "upgrades": c["upgrades"],
        "upgrades_refused": c["upgrades_refused"],
    }


def _listener(x: object, own: _IP | None, theirs: dict[_IP, str]) -> Any:
    if not isinstance(x, dict):
        raise CensusRejected("not an object")
    addr, port, reason = x.get("addr"), x.get("port"), x.get("fallback_reason")
    ip = _ip(addr)
    if ip is None:
        raise CensusRejected(f"address {addr!r} is not an IP address")
    if not ip.is_unspecified:
        _mine(ip, own, theirs)
    if type(port) is not int or not 0 < port < 65536:
        raise CensusRejected(f"port {port!r} is outside 1..65535")
    if reason is not None and not _word(reason):
        raise CensusRejected(f"fallback_reason must be a word of at most {MAX_WORD} characters")
    return {"addr": str(addr), "port": port, "fallback_reason": reason}


def _mine(ip: _IP, own: _IP | None, theirs: dict[_IP, str]) -> None:
    """``ip`` is this VM's address, or a loopback address no other VM of the host has."""
    if _same(ip, own):
        return
    other = next((name for addr, name in theirs.items() if _same(ip, addr)), None)
    if other is not None:
        raise CensusRejected(f"local address {ip} is {other}'s, not this VM's")
    if not ip.is_loopback:
        raise CensusRejected(f"local address {ip} is not this VM's")


def _is_int(value: object) -> bool:
    return type(value) is int and 0 <= value <= _INT_MAX


def _word(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_WORD and value.isprintable()


def _ip(value: object) -> _IP | None:
    if not isinstance(value, str) or len(value) > MAX_WORD:
        return None
    return _parse_ip(value)


@functools.lru_cache(maxsize=1024)  # a report repeats a few addresses many times
def _parse_ip(value: str) -> _IP | None:
    try:
        return ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return None


def _same(a: _IP, b: _IP | None) -> bool:
    """``a`` is ``b`` (an IPv4-mapped IPv6 address counts as its IPv4 address)."""
    if b is None:
        return False
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return a == b


__all__ = ["MAX_CONNECTIONS", "MAX_ERROR", "CensusRejected", "VmCensus"]
