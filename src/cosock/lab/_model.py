"""Names, addresses, limits and errors of a lab: pure data, no IO.

Everything that turns "lab L, host h, guest g" into a namespace name, an interface name or an
address lives here, so the builder, the teardown and the migration code agree by construction.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .._errors import CosockError

#### Limits and naming

DEFAULT_NAME = "lab"
MAX_HOSTS = 8
MAX_GUESTS = 16  # per host
NAME_RE = re.compile(r"[a-z0-9]{1,8}")
#: Every namespace of lab L is called ``cs-L-...``; ``down`` deletes by this prefix.
NETNS_PREFIX = "cs-"
#: Matches our namespace names, so stale labs (no state file) can still be found.
NETNS_RE = re.compile(r"cs-([a-z0-9]{1,8})-h([0-9]+)(?:g([0-9]+))?")

BRIDGE = "br0"
GUEST_IFNAME = "eth0"
#: All guests of a lab share one L2 segment and this subnet (inside the lab's namespaces only).
SUBNET_PREFIX = "10.77"
PREFIXLEN = 16


#### Errors


class LabError(CosockError):
    """Base of the lab's errors; the message is always one line, fit for a CLI."""


class LabExists(LabError):
    """A lab with this name (state file or namespaces) is already there."""


class LabNotFound(LabError):
    """No state file for this lab name."""


class InvalidLabSpec(LabError, ValueError):
    """A lab name or size outside the documented limits."""


class UnknownGuest(LabError, LookupError):
    """No guest of that name in the lab."""


class UnknownHost(LabError, LookupError):
    """No host of that name in the lab."""


class MigrationError(LabError, ValueError):
    """A migration that cannot be done, e.g. to the host the guest already lives on."""


class NetemUnavailable(LabError):
    """A wire delay was asked for, but the kernel has no ``tc netem``."""


class NeedsRoot(LabError, PermissionError):
    """Network namespaces, bridges and setns need root (CAP_SYS_ADMIN + CAP_NET_ADMIN)."""


class AgentStartError(LabError):
    """A host agent did not come up (exited, or no socket within the timeout)."""


def require_root(what: str) -> None:
    """Fail early with one clear line instead of an EPERM deep inside netlink or mount."""
    if os.geteuid() != 0:
        raise NeedsRoot(f"{what} needs root (network namespaces); run it as root")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidLabSpec(f"invalid lab name {name!r}: use 1-8 characters from [a-z0-9]")
    return name


def validate_size(hosts: int, guests: int) -> None:
    if isinstance(hosts, bool) or not isinstance(hosts, int) or not 1 <= hosts <= MAX_HOSTS:
        raise InvalidLabSpec(f"invalid number of hosts {hosts!r}: must be 1..{MAX_HOSTS}")
    if isinstance(guests, bool) or not isinstance(guests, int) or not 1 <= guests <= MAX_GUESTS:
        raise InvalidLabSpec(
            f"invalid number of guests per host {guests!r}: must be 1..{MAX_GUESTS}"
        )


def host_name(h: int) -> str:
    return f"h{h}"


def guest_name(h: int, g: int) -> str:
    return f"h{h}g{g}"


def netns_name(lab: str, member: str) -> str:
    """``cs-<lab>-h1`` for host h1, ``cs-<lab>-h1g2`` for guest h1g2."""
    return f"{NETNS_PREFIX}{lab}-{member}"


def lab_of_netns(ns: str) -> str | None:
    """The lab a namespace belongs to, or None if it is not one of ours."""
    m = NETNS_RE.fullmatch(ns)
    return m.group(1) if m else None


def guest_address(h: int, g: int) -> str:
    return f"{SUBNET_PREFIX}.{h}.{10 + g}"


def bridge_address(h: int) -> str:
    return f"{SUBNET_PREFIX}.{h}.1"


def port_ifname(guest: str) -> str:
    """Bridge-side end of a guest's veth, named after the guest (not the host) so that it
    keeps a unique name when migration moves it into another host's namespace."""
    return f"v{guest}"


def wire_ifname(peer_host: str) -> str:
    """End of the host-to-host wire inside one host, named after the host at the other end."""
    return f"w{peer_host}"


#### Public records


@dataclass(frozen=True)
class Host:
    """A lab host: a namespace with bridge ``br0`` and one agent."""

    name: str
    netns: str
    agent_socket: Path
    agent_pid: int

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.netns


@dataclass(frozen=True)
class Guest:
    """A lab guest: a namespace whose ``eth0`` is a port of its host's bridge."""

    name: str
    netns: str
    host: str
    addresses: tuple[str, ...]

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.netns

    @property
    def address(self) -> str:
        """The guest's (first) IPv4 address, the one peers connect to."""
        return self.addresses[0]

    def netns_inode(self) -> int:
        """Inode of the namespace, the identity agents know guests by."""
        return os.stat(self.netns_path).st_ino
