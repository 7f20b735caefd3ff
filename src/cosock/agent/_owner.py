"""Does a process really listen where it claims?  Read from /proc, never from the claim.

Why: the agent publishes a listener's rendezvous path to every client of its guest, and
clients hand that path their channel memfd (and write their first bytes into it before the
verdict).  Were any process in the guest able to claim any ``addr:port``, it could collect
the offers meant for another process's server.  So a claim stands only if the claiming
process holds a TCP socket in LISTEN state on exactly that address and port, in its own
network namespace (``/proc/<pid>/net/tcp{,6}`` show the namespace of ``<pid>``).
"""

from __future__ import annotations

import ipaddress
import os

_LISTEN = "0A"
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_v4(hex_addr: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(bytes.fromhex(hex_addr)[::-1])


def _parse_v6(hex_addr: str) -> _IPAddress:
    raw = bytes.fromhex(hex_addr)
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # four LE u32 words
    address = ipaddress.IPv6Address(packed)
    return address.ipv4_mapped or address


def _same(a: _IPAddress, b: _IPAddress) -> bool:
    return a == b or (a.is_unspecified and b.is_unspecified)


def _listening_inodes(pid: int, addr: _IPAddress, port: int) -> set[int]:
    found: set[int] = set()
    for name, parse in (("tcp", _parse_v4), ("tcp6", _parse_v6)):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)  # header
                for line in f:
                    fields = line.split()
                    if len(fields) < 10 or fields[3] != _LISTEN:
                        continue
                    host, _, hex_port = fields[1].partition(":")
                    if int(hex_port, 16) == port and _same(parse(host), addr):
                        found.add(int(fields[9]))
        except (OSError, ValueError):
            continue
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            target = os.readlink(f"{base}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def holds_listener(pid: int, addr: str, port: int) -> bool:
    """True if process ``pid`` has a listening TCP socket bound to ``addr:port``.

    False when we cannot tell (the process is gone, or /proc is not readable for us).
    """
    try:
        address = ipaddress.ip_address(addr.partition("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        wanted = _listening_inodes(pid, address, port)
        return bool(wanted) and bool(wanted & _socket_inodes(pid))
    except (OSError, ValueError):
        return False
