"""The agent's state: guests, listeners and the snapshots built from them, without IO.

Rules kept here, in one place:

- A guest is identified by its network-namespace inode; at most one guest per inode and
  per name, and an address belongs to at most one guest.
- A listener is recorded under its owner's netns, not under a guest name, so a guest that
  is re-registered (or renamed by the lab) keeps its listeners; a listener whose netns has
  no guest is hidden from snapshots until one appears.
- With ``auto_guests``, a subscriber from an unknown netns gets a guest ``netns-<inode>``
  without addresses (loopback only), which lives as long as a subscriber from that netns.
- Every visible change bumps ``version``; the server pushes when it sees the bump.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .._errors import CosockError

AUTO_PREFIX = "netns-"
_AUTO_NAME = re.compile(r"netns-[0-9]+\Z")
_MAX_NAME = 255
_MAX_ADDRESSES = 256
_MAX_PATH = 4096
#: Listener addresses meaning "every address of the guest".
WILDCARDS = frozenset({"", "0.0.0.0", "::"})


class RequestError(CosockError):
    """A request the agent refuses; it becomes ``{"ok": false, "error": ...}``."""


@dataclass(slots=True)
class Guest:
    name: str
    netns: int
    addresses: tuple[str, ...]
    host: str
    auto: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "netns": self.netns,
            "addresses": list(self.addresses),
            "host": self.host,
        }


@dataclass(frozen=True, slots=True)
class Listener:
    owner: int  # id of the agent connection that registered it
    netns: int
    addr: str
    port: int
    rendezvous: str
    pid: int


def normalize_ip(text: str) -> str:
    """Canonical text of an IP address; IPv4-mapped IPv6 becomes plain IPv4.

    Raises:
        RequestError: not an IP address.
    """
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise RequestError(f"not an IP address: {text!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def check_name(name: object, what: str = "name") -> str:
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
        raise RequestError(f"{what} must be a non-empty string of at most {_MAX_NAME} chars")
    if not name.isprintable():
        raise RequestError(f"{what} must be printable")
    return name


class Registry:
    """Guests and listeners of one host agent."""

    def __init__(self, host: str, rendezvous_dir: str, auto_guests: bool) -> None:
        self.host = host
        self.rendezvous_dir = rendezvous_dir
        self.auto_guests = auto_guests
        self.version = 1
        self._guests: dict[str, Guest] = {}  # registered, by name
        self._auto: dict[int, Guest] = {}  # automatic, by netns
        self._by_netns: dict[int, Guest] = {}  # registered ones only
        self._listeners: dict[tuple[int, str, int], list[Listener]] = {}
        self._subscribers: Counter[int] = Counter()  # netns -> subscribed connections
        self._common: dict[str, Any] | None = None

    #### Guests

    def guest_for(self, netns: int | None) -> Guest | None:
        if netns is None:
            return None
        return self._by_netns.get(netns) or self._auto.get(netns)

    def register_guest(
        self, name: object, netns: object, addresses: object, host: object = None
    ) -> None:
        """Add or replace a guest; an older guest with the same netns is replaced too.

        Raises:
            RequestError: invalid fields, a reserved name, or an address of another guest.
        """
        name = check_name(name)
        if _AUTO_NAME.match(name):
            raise RequestError(f"guest name {name!r} is reserved for automatic guests")
        if isinstance(netns, bool) or not isinstance(netns, int) or netns <= 0:
            raise RequestError("netns must be a positive integer (a namespace inode)")
        if not isinstance(addresses, list) or len(addresses) > _MAX_ADDRESSES:
            raise RequestError(f"addresses must be a list of at most {_MAX_ADDRESSES} strings")
        normal: list[str] = []
        for text in addresses:
            if not isinstance(text, str):
                raise RequestError("addresses must be strings")
            addr = normalize_ip(text)
            ip = ipaddress.ip_address(addr)
            if ip.is_loopback or ip.is_unspecified or ip.is_multicast:
                raise RequestError(f"{addr} cannot belong to a guest")
            if addr not in normal:
                normal.append(addr)
        host = check_name(host, "host") if host else self.host
        replaced = [g for g in self._guests.values() if g.name == name or g.netns == netns]
        for other in self._guests.values():
            if other in replaced:
                continue
            for addr in normal:
                if addr in other.addresses:
                    raise RequestError(f"address {addr} already belongs to guest {other.name!r}")
        for old in replaced:
            del self._guests[old.name]
            self._by_netns.pop(old.netns, None)
        guest = Guest(name, netns, tuple(normal), host)
        self._guests[name] = guest
        self._by_netns[netns] = guest
        self._auto.pop(netns, None)
        for old in replaced:
            self._ensure_auto(old.netns)
        self._changed()

    def guest_named(self, name: object) -> Guest | None:
        """The registered guest called ``name``, if any (automatic guests have none)."""
        return self._guests.get(check_name(name))

    def unregister_guest(self, name: object) -> bool:
        """Forget a registered guest; True if it existed."""
        guest = self._guests.pop(check_name(name), None)
        if guest is None:
            return False
        self._by_netns.pop(guest.netns, None)
        self._ensure_auto(guest.netns)
        self._changed()
        return True

    def _ensure_auto(self, netns: int) -> None:
        if self.auto_guests and self._subscribers[netns] and netns not in self._by_netns:
            self._auto.setdefault(netns, Guest(f"{AUTO_PREFIX}{netns}", netns, (), self.host, True))

    #### Subscribers

    def subscribe(self, netns: int | None) -> None:
        if netns is None:
            return
        self._subscribers[netns] += 1
        if self.guest_for(netns) is None:
            self._ensure_auto(netns)
            if netns in self._auto:
                self._changed()

    def unsubscribe(self, netns: int | None) -> None:
        if netns is None:
            return
        self._subscribers[netns] -= 1
        if self._subscribers[netns] <= 0:
            del self._subscribers[netns]
            if self._auto.pop(netns, None) is not None:
                self._changed()

    #### Listeners

    def listen(
        self,
        owner: int,
        netns: int | None,
        pid: int,
        addr: object,
        port: object,
        rendezvous: object,
    ) -> Guest:
        """Record a listener of the caller's guest; the newest one per address wins.

        Raises:
            RequestError: the caller is in no known guest, or the fields are invalid.
        """
        guest = self.guest_for(netns)
        if guest is None or netns is None:
            raise RequestError("the caller's network namespace is not a known guest")
        key = (netns, _listen_addr(addr), _port(port))
        if not isinstance(rendezvous, str) or not rendezvous or len(rendezvous) > _MAX_PATH:
            raise RequestError("rendezvous must be a non-empty path")
        stack = self._listeners.setdefault(key, [])
        stack[:] = [x for x in stack if x.owner != owner]
        stack.append(Listener(owner, netns, key[1], key[2], rendezvous, pid))
        self._changed()
        return guest

    def unlisten(self, owner: int, netns: int | None, addr: object, port: object) -> bool:
        """Remove the caller's listener; True if there was one.

        Raises:
            RequestError: invalid fields, or only other processes listen there.
        """
        if netns is None:
            return False
        key = (netns, _listen_addr(addr), _port(port))
        stack = self._listeners.get(key)
        if not stack:
            return False
        mine = [x for x in stack if x.owner == owner]
        if not mine:
            raise RequestError("that listener belongs to another process")
        self._remove(key, owner)
        return True

    def drop_owner(self, owner: int) -> None:
        """A connection closed: its listeners go (the process died or stopped listening)."""
        for key in [k for k, v in self._listeners.items() if any(x.owner == owner for x in v)]:
            self._remove(key, owner)

    def _remove(self, key: tuple[int, str, int], owner: int) -> None:
        stack = [x for x in self._listeners[key] if x.owner != owner]
        if stack:
            self._listeners[key] = stack
        else:
            del self._listeners[key]
        self._changed()

    #### Views

    def _changed(self) -> None:
        self.version += 1
        self._common = None

    def guests(self) -> list[Guest]:
        return [*self._guests.values(), *self._auto.values()]

    def listeners_wire(self) -> list[dict[str, Any]]:
        out = []
        for stack in self._listeners.values():
            top = stack[-1]
            guest = self.guest_for(top.netns)
            if guest is not None:
                out.append(
                    {
                        "guest": guest.name,
                        "addr": top.addr,
                        "port": top.port,
                        "rendezvous": top.rendezvous,
                        "pid": top.pid,
                    }
                )
        return out

    def snapshot_for(self, netns: int | None) -> dict[str, Any]:
        """The table a subscriber in ``netns`` sees; ``self`` is its own guest or None."""
        if self._common is None:
            self._common = {
                "version": self.version,
                "host": self.host,
                "guests": [g.to_wire() for g in self.guests()],
                "listeners": self.listeners_wire(),
                "rendezvous_dir": self.rendezvous_dir,
            }
        guest = self.guest_for(netns)
        return {**self._common, "self": guest.to_wire() if guest else None}


def _listen_addr(addr: object) -> str:
    if not isinstance(addr, str):
        raise RequestError("addr must be a string")
    return addr if addr == "" else normalize_ip(addr)


def _port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise RequestError("port must be an integer in 1..65535")
    return port
