"""Network plumbing of the lab with pyroute2: namespaces, bridges, veths, addresses, processes.

Every link is created from inside a lab namespace, and every veth peer is placed straight into
its target namespace by the same netlink request (IFLA_NET_NS_FD), so no interface ever exists
in the root namespace, not even for a moment.

Namespace fds are opened and closed here explicitly: an fd that outlives a namespace's name
keeps the namespace (and its links) alive invisibly after ``down``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import ipaddress
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from ._model import BRIDGE, GUEST_IFNAME, PREFIXLEN, NetemUnavailable, lab_of_netns

NETNS_DIR = Path("/run/netns")

#: Minimum TCP retransmission timeout on the guests' lab route, in ms.
GUEST_RTO_MIN_MS = 5
_RTAX_RTO_MIN = 13  # linux/rtnetlink.h
#: Neighbour state of static FDB entries (the bridge's and ports' own addresses).
NUD_PERMANENT = 0x80

#: (st_dev, st_ino) of a namespace: how /proc/<pid>/ns/net is matched against our namespaces.
NsKey = tuple[int, int]

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """libc loaded once in the parent: loading it inside a preexec_fn (after fork) would run
    ``ldconfig`` from the half-initialised child."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


#### Namespaces


@contextlib.contextmanager
def forking() -> Iterator[None]:
    """Around a fork of this process (pyroute2's namespace helpers, ``Popen`` with a
    ``preexec_fn``): a Ctrl-C that arrives meanwhile is raised when the block ends.

    Python runs ``os.register_at_fork`` hooks (logging's, for one) in the parent after each
    such fork, and an exception raised inside one is printed as "Exception ignored" and
    dropped. The KeyboardInterrupt of a SIGINT that lands there was lost: ``cosock demo``
    built its lab and moved its gibibytes anyway, ``lab up`` finished. Here the handler
    only notes the signal while the fork runs; the original handler runs right after, in
    this frame, where the exception unwinds (and tears down) as usual.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers run (and can be replaced) in the main thread only
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


def netns_path(ns: str) -> Path:
    return NETNS_DIR / ns


def create_netns(ns: str) -> None:
    with forking():  # pyroute2 creates it in a forked child
        netns.create(ns, libc=libc())


def remove_netns(ns: str) -> None:
    """Drop the name (unmount + unlink); the kernel frees the namespace with its last user."""
    try:
        netns.remove(ns, libc=libc())
    except FileNotFoundError:
        pass


def netns_key(ns: str) -> NsKey | None:
    try:
        st = os.stat(netns_path(ns))
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def list_netns(lab: str | None = None) -> list[str]:
    """Our namespaces (``cs-<lab>-h…``), of one lab or of all labs."""
    try:
        entries = os.listdir(NETNS_DIR)
    except OSError:
        return []
    found = [ns for ns in entries if (owner := lab_of_netns(ns)) and (lab is None or owner == lab)]
    return sorted(found)


@contextlib.contextmanager
def open_netns(ns: str) -> Iterator[int]:
    """An O_CLOEXEC fd on a named namespace, closed on exit."""
    try:
        fd = os.open(netns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(f"network namespace {ns!r} does not exist") from None
    try:
        yield fd
    finally:
        os.close(fd)


def setns_preexec(fd: int, then: Callable[[], Any] | None = None) -> Callable[[], None]:
    """A Popen preexec_fn that moves the child into the namespace open as ``fd``.

    The fd is opened by the parent, so a missing namespace fails before the fork with a clear
    message; ``preexec_fn`` runs before Popen closes inherited fds, so ``fd`` is still valid.
    """
    lib = libc()

    def preexec() -> None:
        netns.setns(fd, flags=0, libc=lib)
        if then is not None:
            then()

    return preexec


class Netlinks:
    """One RTNL socket per namespace, opened on first use and closed together.

    Opening a socket inside a namespace costs a fork (pyroute2 creates it in a child that
    setns()es, so no thread of ours ever changes namespace); sharing them makes ``up`` cheap.
    """

    def __init__(self) -> None:
        self._socks: dict[str, Any] = {}

    def __enter__(self) -> Netlinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, ns: str) -> Any:
        """The IPRoute inside ``ns`` (flags=0: never create the namespace)."""
        if ns not in self._socks:
            with forking():
                self._socks[ns] = IPRoute(netns=ns, flags=0)
        return self._socks[ns]

    def close(self) -> None:
        socks, self._socks = self._socks, {}
        for ipr in socks.values():
            ipr.close()


#: Netlink sockets kept per lab between migrations (each costs a fork to open); closed by
#: :func:`close_lab_netlinks`, which ``down`` calls before the namespaces go (an open netlink
#: socket keeps its namespace alive).
_lab_netlinks: dict[str, Netlinks] = {}


def lab_netlinks(lab: str) -> Netlinks:
    """This process's long-lived :class:`Netlinks` for ``lab`` (callers hold the lab lock)."""
    nl = _lab_netlinks.get(lab)
    if nl is None:
        nl = _lab_netlinks[lab] = Netlinks()
    return nl


def close_lab_netlinks(lab: str) -> None:
    nl = _lab_netlinks.pop(lab, None)
    if nl is not None:
        nl.close()


def _index(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise FileNotFoundError(f"no interface {ifname!r}")
    return int(found[0])


#### Building blocks


def bridge_mac(address: str) -> str:
    """A fixed, locally administered MAC for the bridge owning IPv4 ``address`` (unique in the
    lab, as the address is)."""
    return "02:63:" + ":".join(f"{int(b):02x}" for b in address.split("."))


def build_host(nl: Netlinks, ns: str, address: str) -> None:
    """``lo`` and a bridge ``br0`` (no STP, no forward delay: ports forward at once), up.

    The bridge gets a MAC of its own: by default it takes the lowest MAC of its ports, so it
    changed whenever a guest's port came or went (a migration), and every guest that still
    had the old one cached could not reach the host's address for seconds (its VM gateway,
    after a live migration: ARP probes to a MAC that no longer exists, until they fail).
    """
    ipr = nl(ns)
    ipr.link("set", index=_index(ipr, "lo"), state="up")
    ipr.link(
        "add",
        ifname=BRIDGE,
        kind="bridge",
        address=bridge_mac(address),
        br_stp_state=0,
        br_forward_delay=0,
    )
    br = _index(ipr, BRIDGE)
    ipr.addr("add", index=br, address=address, prefixlen=PREFIXLEN)
    ipr.link("set", index=br, state="up")


def _add_veth_into(ipr: Any, ifname: str, peer: str, peer_ns: str, index: int = 0) -> None:
    """Create veth ``ifname`` (ifindex ``index``, 0: any) in ``ipr``'s namespace with ``peer``
    born in ``peer_ns``."""
    extra = {"index": index} if index else {}
    with open_netns(peer_ns) as fd:
        ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": peer, "net_ns_fd": fd}, **extra)


def _enslave_up(ipr: Any, ifname: str) -> None:
    ipr.link("set", index=_index(ipr, ifname), master=_index(ipr, BRIDGE), state="up")


def attach_guest(nl: Netlinks, host_ns: str, guest_ns: str, port: str, address: str) -> None:
    """Give the guest ``eth0`` with ``address``, its other end ``port`` on the host's bridge."""
    ipr = nl(host_ns)
    _add_veth_into(ipr, port, GUEST_IFNAME, guest_ns)
    _enslave_up(ipr, port)
    ipr = nl(guest_ns)
    ipr.link("set", index=_index(ipr, "lo"), state="up")
    eth = _index(ipr, GUEST_IFNAME)
    ipr.addr("add", index=eth, address=address, prefixlen=PREFIXLEN)
    ipr.link("set", index=eth, state="up")
    # A data-centre retransmission floor (Linux's default minimum RTO is 200 ms): a segment
    # lost while a migrating guest's port moves is resent in milliseconds, not ~1 s.
    net = str(ipaddress.ip_network(f"{address}/{PREFIXLEN}", strict=False).network_address)
    ipr.route(
        "replace",
        dst=net,
        dst_len=PREFIXLEN,
        oif=eth,
        scope="link",
        proto="kernel",
        prefsrc=address,
        # rto_min counts only when locked (as `ip route ... rto_min 5ms` does it).
        metrics={"RTAX_LOCK": 1 << _RTAX_RTO_MIN, "RTAX_RTO_MIN": GUEST_RTO_MIN_MS},
    )


def add_wire(nl: Netlinks, ns_a: str, if_a: str, ns_b: str, if_b: str, index_a: int) -> None:
    """Join two hosts' bridges with a veth pair, so all guests share one L2 segment.

    ``index_a`` must differ from whatever ifindex the kernel gives ``if_b``: two symmetric
    hosts would otherwise number both ends alike, and linkwatch treats a link whose ifindex
    equals its iflink as non-urgent, leaving it dropping packets for up to a second.
    """
    _add_veth_into(nl(ns_a), if_a, if_b, ns_b, index=index_a)
    _enslave_up(nl(ns_a), if_a)
    _enslave_up(nl(ns_b), if_b)


def move_port(nl: Netlinks, port: str, from_ns: str, to_ns: str) -> None:
    """Move a guest's bridge port to another host's bridge: the migration primitive.

    The guest's ``eth0`` (and every socket of its processes) stays untouched; only the wire
    behind it is re-plugged. Moving a link resets it to down and unenslaved, hence the re-plug.
    Follow with :func:`wait_operational` before relying on the new path.
    """
    ipr = nl(from_ns)
    with open_netns(to_ns) as fd:
        ipr.link("set", index=_index(ipr, port), net_ns_fd=fd)
    _enslave_up(nl(to_ns), port)


def wait_operational(nl: Netlinks, ns: str, ifnames: Iterable[str], deadline: float) -> None:
    """Wait until the links report operstate UP.

    "up" is not yet "passing packets": the kernel attaches a link's qdisc from the linkwatch
    work, which may run up to a second later, and until then the link drops every packet (see
    net/core/link_watch.c). Without this wait the first SYN after ``up`` can be lost and a
    connection then takes the 1 s SYN retransmit. Operstate flips in that same work item.
    """
    wanted = set(ifnames)
    ipr = nl(ns)
    while True:
        states = {link.get("ifname"): link.get("operstate") for link in ipr.get_links()}
        down = sorted(name for name in wanted if states.get(name) != "UP")
        if not down:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"links {', '.join(down)} in {ns} did not come up")
        time.sleep(0.02)


#### Processes


def pids_in(keys: set[NsKey]) -> list[int]:
    """Processes whose network namespace is one of ``keys`` (zombies have none)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in keys:
            found.append(int(entry))
    return found


def kill_all_in(keys: set[NsKey], timeout: float = 5.0) -> list[int]:
    """SIGKILL every process in the namespaces until none is left (children forked meanwhile
    included). Returns the pids killed. Zombies are left to their parents to reap."""
    killed: list[int] = []
    if not keys:
        return killed
    deadline = time.monotonic() + timeout
    while pids := pids_in(keys):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if pid not in killed:
                killed.append(pid)
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return killed


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def terminate(pids: Iterable[int], grace: float = 2.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL what is left."""
    pending = [pid for pid in pids if alive(pid)]
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pending and time.monotonic() < deadline:
        time.sleep(0.01)
        pending = [pid for pid in pending if alive(pid)]
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


#### Migration helpers


def mac_of(nl: Netlinks, ns: str, ifname: str) -> str:
    """The link-layer address of ``ifname`` in ``ns`` (a guest's eth0: its identity on L2)."""
    ipr = nl(ns)
    (link,) = ipr.get_links(_index(ipr, ifname))
    return str(link.get("address"))


def forget_mac(nl: Netlinks, ns: str, mac: str) -> int:
    """Delete the learned (non-permanent) FDB entries for ``mac`` on the bridge in ``ns``.

    Why: after a guest's port moved, the other bridges still send its frames towards where
    it was (a bridge drops a frame whose learned port is the one it came in on) until the
    guest happens to transmit. Forgotten, the address is flooded, reaches the guest at once,
    and is learned again from its first reply. Returns how many entries were removed.
    """
    ipr = nl(ns)
    removed = 0
    for entry in ipr.fdb("dump"):
        if str(entry.get("NDA_LLADDR", "")).lower() != mac.lower():
            continue
        if entry.get("state", 0) & NUD_PERMANENT:
            continue  # the bridge's own or a port's own address
        with contextlib.suppress(NetlinkError):
            ipr.fdb("del", ifindex=entry["ifindex"], lladdr=mac, master=True)
            removed += 1
    return removed


def set_delay(nl: Netlinks, ns: str, ifname: str, delay_ms: float) -> None:
    """Make ``ifname`` in ``ns`` send every packet ``delay_ms`` late (tc netem); 0 removes it.

    Raises:
        NetemUnavailable: the kernel has no netem queueing discipline.
    """
    ipr = nl(ns)
    index = _index(ipr, ifname)
    if delay_ms <= 0:
        with contextlib.suppress(NetlinkError):
            ipr.tc("del", index=index, handle="root")
        return
    try:
        ipr.tc("replace", "netem", index=index, handle="1:", delay=int(delay_ms * 1000))
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.EOPNOTSUPP, errno.EINVAL):
            raise NetemUnavailable(
                "the kernel has no tc netem (CONFIG_NET_SCH_NETEM), so the wire cannot be"
                " delayed; run without a delay"
            ) from None
        raise


def link_bytes(nl: Netlinks, ns: str, ifname: str) -> tuple[int, int]:
    """(rx_bytes, tx_bytes) of ``ifname`` in ``ns``: proof of which way traffic went."""
    ipr = nl(ns)
    (link,) = ipr.get_links(_index(ipr, ifname))
    stats = link.get("IFLA_STATS64") or link.get("IFLA_STATS")
    return int(stats["rx_bytes"]), int(stats["tx_bytes"])
