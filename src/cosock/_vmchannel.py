"""The ivshmem channel provider: how a ``CoSocket`` inside a QEMU guest gets its channel.

One protocol, two providers. On one kernel a channel is a fresh memfd that the client hands
to the listener's rendezvous socket (SCM_RIGHTS). Between VMs no fd crosses, so inside a
guest (``COSOCK_VM_GATEWAY`` set by the lab) the same steps go through the host agent's VM
gateway (``agent/_vmgate.py``) and the channel is a slot of the host's ivshmem pool:

* listen: the listener is published to the gateway (instead of the agent's Unix socket);
* connect: the client asks the gateway for a slot for exactly its 4-tuple, giving its nonce
  (the gateway checks that the destination is a cosock listener on *another* VM of this
  host); it maps the slot through its own BAR2 and sends HELLO(nonce) in-band, as always;
* accept: the server asks the gateway for the grant of exactly the accepted 4-tuple (given
  only to the VM owning the server address), maps the same slot, and the in-band nonce
  check, ACCEPT/REJECT, rings, BELL/SPACE frames, SWITCH and fallback are unchanged.

A slot is given back to the gateway when its mapping is closed (the channel's release), or
when the process's gateway connection drops. A mapping shared by ``fork`` is given back by the
last process to let go of it (a ForkingMixIn child, typically: its parent closes its copy at
once), so a forking server does not use up its pool.

The objects here stand in for ``AgentClient``, ``Rendezvous`` and ``Pending`` (the same
attribute names), so ``_socket.py`` needs only a few branches. The residency watch gets the
gateway's guest list pushed on a change (``_vmwatch``; asked once a second without a watch):
before a VM migrates, the lab marks it leaving, the gateway
then lists no neighbours to it and omits it from the others' lists, and the watches on both
sides switch their connections to TCP at the exact offset and give their slots back. After the
move the old gateway redirects the VM to its new host's gateway (or, if the old host is gone,
the dropped connection is redialled to the gateway the new QEMU's fw_cfg names): the directory
follows, re-publishes its listeners there and reopens the pool (the new host's, hot-plugged),
and the watch upgrades the connections to the VMs of the new host to fresh slots (UPGRADE, as
on one kernel).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ._errors import AgentUnavailable, FallbackReason
from ._ivshmem import (
    CLIENT,
    ENV_IVSHMEM,
    MAPPED,
    RELEASED,
    SERVER,
    Pool,
    PoolError,
    PoolLayout,
    find_device,
    mark_use,
    read_stamp,
)
from ._offer import Offer, normalise_host
from ._ring import channel_headers_ok
from ._sharedwords import SharedWords
from ._vmagent import ENV_GATEWAY, GatewayMoved, Key, SlotRefused, VmAgent
from ._vmwatch import GuestWatch

#: ``ListenerInfo.rendezvous`` of a listener in another VM: the offer goes to the gateway.
RENDEZVOUS_PREFIX = "ivshmem:"
#: How long the list of this host's VMs is trusted (a migration changes it).
_GUESTS_TTL = 1.0
#: A list younger than this is fresh enough to confirm a switch (one fetch per judge round).
_CONFIRM_S = 0.05
#: After the gateway could not be reached, how long until it is tried again.
_RETRY_S = 1.0
#: Redirects followed in one attempt (old host -> new host; one more if it moved meanwhile).
_MAX_HOPS = 3
#: How long a connect (or accept) waits for a pair's pool to show up in this VM: the gateway
#: hot-plugged it before granting the slot, and the guest kernel adds the device on the ACPI
#: event (measured: ~30 ms under TCG); a rescan is asked for after _RESCAN_AFTER_S.
PLUG_WAIT_S = 5.0
_RESCAN_AFTER_S = 1.0
PCI_RESCAN = Path("/sys/bus/pci/rescan")
#: After a watch could not be opened (or ended), how long until one is tried again.
_WATCH_RETRY_S = 2.0
#: ``0``: no watch, ask the gateway for its guest list once a second (as before pushes).
ENV_WATCH = "COSOCK_VM_WATCH"


def active() -> bool:
    """Are we a QEMU guest of the lab (or told to act as one)?"""
    return bool(os.environ.get(ENV_GATEWAY))


@dataclass(frozen=True, slots=True)
class _Guest:
    name: str


@dataclass(frozen=True, slots=True)
class VmListenerInfo:
    """What ``lookup`` returns: the attributes of ``agent.client.ListenerInfo`` used."""

    guest: str
    addr: str
    port: int
    rendezvous: str
    pid: int = 0


class SlotGrant(NamedTuple):
    """Whose a slot's mapping is to give back, and what the gateway needs for it."""

    pid: int  # the process that may give it back (a fork's child: itself, see _Holders)
    directory: VmDirectory
    slot: int
    generation: int
    epoch: int
    pool_id: str


class _Holders(SharedWords):
    """How many processes hold one slot's mapping since a ``fork()``: the last to let go
    gives the slot back."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__("cosock-holders", 8)
        self.words[0] = 1  # this process

    def add(self) -> None:
        """One more holder: the child of the fork about to happen."""
        with self.locked() as count:
            count[0] += 1

    def let_go(self) -> bool:
        """This process is done with the mapping; True if it was the last holder."""
        with self.locked() as count:
            left = max(int(count[0]) - 1, 0)
            count[0] = left
        self.close()
        return left == 0


#: Guards each mapping's grant and holders in this process (a close in one thread against
#: the fork hook in another: lockf excludes processes, not threads); held across a fork.
_holders_lock = threading.Lock()


class SlotMapping(mmap.mmap):
    """A slot's mapping that gives the slot back to the gateway when it is closed, or as soon
    as the connection left its rings for good (:meth:`give_back` after a path switch: the
    rings are frozen and never read again, so the slot may serve another connection).

    A given-back mapping no longer shows the slot (:func:`_detach`): the guest kernel does
    not revoke a mapping of a hot-unplugged BAR, so once the pair's pool is reaped and the next
    one plugged at the same address, a mapping kept past its grant would read and write that
    pool's slot, another connection's rings (docs/vm-backend.md, section 4)."""

    def give_back(self) -> None:
        grant, last = self._let_go()
        if grant is not None:
            if last:
                self._released()
            _detach(self)
            if last:
                grant.directory.free(grant.slot, grant.generation, grant.epoch, grant.pool_id)

    def grant_lost(self) -> bool:
        """Does the slot hold another grant than ours now (it was taken back and granted
        again, or this is a mapping of a pool that another one replaced)?"""
        stamp = self.__dict__.get("_stamp", 0)
        try:
            return bool(stamp) and not self.closed and read_stamp(self) != stamp
        except (ValueError, OSError):
            return False

    def close(self) -> None:
        grant, last = self._let_go()
        if last and not self.closed:
            self._released()
        super().close()
        if grant is not None and last:
            grant.directory.free(grant.slot, grant.generation, grant.epoch, grant.pool_id)

    def _let_go(self) -> tuple[SlotGrant | None, bool]:
        """This process is done with the slot: its grant if it may give it back (None: not
        ours), and whether it is the last process holding it (since a fork: _Holders)."""
        with _holders_lock:
            grant: SlotGrant | None = self.__dict__.pop("_give_back", None)
            holders: _Holders | None = self.__dict__.pop("_holders", None)
        if grant is None or grant.pid != os.getpid():
            if holders is not None:
                holders.close()
            return None, False
        return grant, holders is None or holders.let_go()

    def _released(self) -> None:
        """Mark the slot done with in its own memory (a restarted gateway reads it), unless
        it holds another grant now: that one's marks are not ours to write."""
        side = self.__dict__.get("_side")
        if side is not None and not self.grant_lost():
            with contextlib.suppress(ValueError, OSError):
                mark_use(self, side, RELEASED)


_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2  # Linux
_libc: Any = None


def _detach(mm: mmap.mmap) -> None:
    """Put a private copy of the pages under ``mm`` in their place, in one step (``mremap``
    of a filled anonymous mapping over them): the same addresses, so views of the frozen rings
    stay valid and show what they showed, but no longer the slot. Best effort: where it cannot
    be done the mapping stays as it was."""
    global _libc
    if mm.closed:
        return
    try:
        if _libc is None:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_long,
            ]
            libc.mremap.restype = ctypes.c_void_p
            libc.mremap.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_void_p,
            ]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            _libc = libc
        size = len(mm)
        buf = (ctypes.c_char * size).from_buffer(mm)
        addr = ctypes.addressof(buf)
        del buf
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        copy = _libc.mmap(None, size, _PROT_RW, flags, -1, 0)
        if copy in (None, ctypes.c_void_p(-1).value):
            return
        ctypes.memmove(copy, addr, size)
        moved = _libc.mremap(copy, size, size, _MREMAP_MAYMOVE | _MREMAP_FIXED, addr)
        if moved != addr:
            _libc.munmap(copy, size)
    except (OSError, ValueError, TypeError, BufferError, AttributeError):
        pass


def switched(mm: object) -> None:
    """A connection finished its switch to TCP: give its slot back (see SlotMapping)."""
    if isinstance(mm, SlotMapping):
        mm.give_back()


_mappings: weakref.WeakSet[SlotMapping] = weakref.WeakSet()


class VmDirectory:
    """The gateway as ``CoSocket`` sees it: lookups, listeners, offers, claims."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gate: VmAgent | None = None
        self._why = "not connected yet"
        self._retry_at = 0.0
        self._guests: dict[str, str] = {}
        self._guests_at = -_GUESTS_TTL
        self._listeners: set[tuple[str, int]] = set()
        #: Asks the gateway once a second while listeners are published (see _keep).
        self._keeper: threading.Thread | None = None
        self._closing = threading.Event()
        #: Open pools by id (hex; "": the host's shared pool, or the only device).
        self._pools: dict[str, tuple[Pool, PoolLayout]] = {}
        self.me: _Guest | None = None
        #: The gateway a redirect named (this VM migrated); None: the one fw_cfg names
        #: now (the current host's), else the boot-time one.
        self._learned: tuple[str, int] | None = None
        #: The gateway of the last connection, and how many times it changed (a slot
        #: granted under an older epoch is never given back to a newer host's gateway).
        self._gate_addr: tuple[str, int] | None = None
        self.epoch = 0
        #: Gateway changes seen (a migration): ``cosock_info``-style figures for tests.
        self.moves = 0
        #: The gateway's (or the device search's) words for the last refused offer.
        self.last_refusal = ""
        #: The gateway's pushes of the guest list (``_vmwatch``), when it has them.
        self._watch: GuestWatch | None = None
        self._watch_lock = threading.Lock()
        self._watch_at = 0.0

    #### The gateway connection

    def _gateway(self) -> VmAgent:
        """Connected and greeted (listeners re-published after a reconnect).

        After a migration the gateway asked (the boot-time one, or the last one) is the old
        host's: it answers with the new host's, which is followed (and remembered). A new
        gateway means a new host, so the pool is reopened: the BAR opened before is a
        deleted device's, and the new host's pool is another device (hot-plugged).

        Raises:
            AgentUnavailable: no gateway (the reason is kept for the next second).
        """
        with self._lock:
            if self._gate is not None:
                return self._gate
            now = time.monotonic()
            if now < self._retry_at:
                raise AgentUnavailable(self._why)
            address = self._learned
            try:
                for _ in range(_MAX_HOPS):
                    try:
                        gate = VmAgent(address, timeout=5.0)
                        break
                    except GatewayMoved as moved:
                        address = self._learned = moved.address
                else:
                    raise AgentUnavailable(f"more than {_MAX_HOPS} redirects")
                for addr, port in self._listeners:
                    gate.listen(addr, port)
            except (AgentUnavailable, SlotRefused, OSError, ValueError) as exc:
                where = "" if address is None else f" (this VM moved: {address[0]}:{address[1]})"
                self._why = f"VM gateway{where}: {exc}"
                self._retry_at = now + _RETRY_S
                # Ask the current host's (fw_cfg) or boot-time gateway next time: either
                # knows where we are now.
                self._learned = None
                raise AgentUnavailable(self._why) from None
            if self._gate_addr is not None and gate.gateway != self._gate_addr:
                self._moved_locked()
            self._gate_addr = gate.gateway
            self._gate, self.me = gate, _Guest(gate.guest)
            return gate

    @property
    def connection(self) -> VmAgent | None:
        """The current gateway connection, if any (a new one means a new gateway session)."""
        return self._gate

    def _moved_locked(self) -> None:
        """Another host's gateway: forget the old host's pool and guest list."""
        pools, self._pools = self._pools, {}
        for pool, _ in pools.values():
            pool.close()
        self._guests, self._guests_at = {}, -_GUESTS_TTL
        self.epoch += 1
        self.moves += 1

    def _call(self, method: str, *args: Any) -> Any:
        """One gateway request; a dropped connection is reconnected on the next call, a
        redirect (this VM migrated) is followed at once."""
        for attempt in range(2):
            gate = self._gateway()
            try:
                return getattr(gate, method)(*args)
            except AgentUnavailable as exc:
                with self._lock:
                    if self._gate is gate:
                        self._gate = None
                    if isinstance(exc, GatewayMoved):
                        self._learned = exc.address
                gate.close()
                if not isinstance(exc, GatewayMoved) or attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._closing.set()
        keeper = self._keeper
        if keeper is not None and keeper is not threading.current_thread():
            keeper.join(5.0)
        with self._watch_lock:
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()
        with self._lock:
            gate, self._gate = self._gate, None
            pools, self._pools = self._pools, {}
        if gate is not None:
            gate.close()
        for pool, _ in pools.values():
            pool.close()

    def _after_fork_in_child(self) -> None:
        """The parent's gateway connection is the parent's: never speak on it here."""
        self._lock = threading.Lock()
        gate, self._gate = self._gate, None
        if gate is not None:  # a thread may have been mid-request: its fd only
            gate.abandon()
        self._listeners.clear()
        self._keeper = None
        self._watch_lock = threading.Lock()
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.forget()

    #### What AgentClient offers CoSocket

    @property
    def available(self) -> bool:
        """Connected to the gateway: the residency watch may judge (with the pushed list, or
        asking ``guests`` cached for a second)."""
        return self.self_guest is not None

    def poll(self) -> None:
        watch = self._watch
        if watch is not None:
            watch.drain()

    def wait_fileno(self) -> int | None:
        """Readable when the gateway pushed a new guest list (the residency watch wakes)."""
        watch = self._watch
        return None if watch is None else watch.fileno()

    @property
    def version(self) -> int:
        """Changes with each pushed list (the residency watch then judges at once)."""
        watch = self._watch
        return 0 if watch is None else watch.version

    @property
    def self_guest(self) -> _Guest | None:
        try:
            self._gateway()
        except AgentUnavailable:
            return None
        return self.me

    @property
    def last_self_guest(self) -> _Guest | None:
        return self.me

    @property
    def rendezvous_dir(self) -> Path | None:
        """Not a directory: a listener here has no rendezvous socket (see :meth:`listener`)."""
        return Path("/") if self.self_guest is not None else None

    def guest_owning(self, ip: str) -> _Guest | None:
        """The other VM of this host that owns ``ip``, per the gateway now; None when ``ip``
        is no VM here, or when we are leaving (the gateway lists no neighbours to a VM about
        to migrate): the residency watch then switches our connections to TCP.

        Raises:
            AgentUnavailable: no gateway (the watch stays undecided).
        """
        try:
            norm = normalise_host(ip)
        except ValueError:
            return None
        owner = next((g for g, a in self._coresident().items() if a == norm), None)
        if owner is None or self.me is None or owner == self.me.name:
            return None
        return _Guest(owner)

    def gone_for_sure(self, ip: str) -> bool:
        """Before a switch to TCP: is ``ip`` still no neighbour in a list fetched now (not
        the cached one, unless it is < 50 ms old)? The list cached a second may predate a
        change the peer has already acted on: right after a ``leaving`` mark is undone, the
        peer re-upgrades on its fresh list while ours still lacks it, and a switch on ours
        would undo that upgrade at once (seen in test_vm_cosock's leave-and-undo).

        Raises:
            AgentUnavailable: no gateway (the watch stays undecided).
        """
        if time.monotonic() - self._guests_at > _CONFIRM_S:
            self._guests_at = -_GUESTS_TTL
        return self.guest_owning(ip) is None

    def lookup(self, ip: str, port: int) -> tuple[VmListenerInfo | None, str]:
        """A listener is presumed when ``ip`` belongs to another VM of this host; the offer
        itself checks that it exists (one gateway round trip per connect, not two)."""
        try:
            guests = self._coresident()
        except AgentUnavailable as exc:
            return None, f"agent-unreachable: {exc}"
        try:
            norm = normalise_host(ip)
        except ValueError:
            return None, "not-coresident"
        owner = next((g for g, a in guests.items() if a == norm), None)
        if owner is None or self.me is None or owner == self.me.name:
            return None, "not-coresident"
        return VmListenerInfo(owner, norm, port, RENDEZVOUS_PREFIX + owner), ""

    def _coresident(self) -> dict[str, str]:
        watch = self._watched()
        pushed = None if watch is None else watch.current()
        if pushed is not None:  # the gateway pushes changes: nothing to ask
            self._guests = pushed
            return pushed
        now = time.monotonic()
        if now - self._guests_at >= _GUESTS_TTL:
            self._guests = self._call("guests")
            self._guests_at = now
        return self._guests

    def _watched(self) -> GuestWatch | None:
        """The live watch on the current gateway, opened if there is none (at most once in
        ``_WATCH_RETRY_S``); None while there is none: ask (once a second, cached)."""
        watch = self._watch
        address = self._gate_addr
        if watch is not None and watch.current() is not None and watch.gateway == address:
            return watch
        if address is None or self._closing.is_set() or os.environ.get(ENV_WATCH) == "0":
            return None
        if not self._watch_lock.acquire(False):
            return None
        try:
            now = time.monotonic()
            if self._watch is not None:  # ended, or another host's: ask, and open anew
                self._watch.close()
                self._watch = None
                self._watch_at = now  # let the next request follow a redirect first
            if now - self._watch_at < _WATCH_RETRY_S and self._watch_at:
                return None
            self._watch_at = now
            try:
                self._watch = GuestWatch(address)
            except SlotRefused:  # a gateway without pushes: ask, and try again in a minute
                self._watch_at = now + 60.0
                return None
            except (AgentUnavailable, OSError):
                return None
            return self._watch
        finally:
            self._watch_lock.release()

    def listen(self, addr: str, port: int, rendezvous: str = "") -> None:
        """Publish a listener to the gateway.

        Raises:
            AgentUnavailable: no gateway, or it refused (e.g. a loopback address: only
                another VM can be offered a slot, and it cannot reach our loopback).
        """
        norm = addr if addr in ("0.0.0.0", "::") else normalise_host(addr)
        try:
            self._call("listen", norm, port)
        except SlotRefused as exc:
            raise AgentUnavailable(f"VM gateway refused the listener: {exc}") from None
        self._listeners.add((norm, port))
        with self._lock:
            if self._keeper is None and not self._closing.is_set():
                self._keeper = threading.Thread(
                    target=self._keep, name="cosock-vm-listeners", daemon=True
                )
                self._keeper.start()

    def _keep(self) -> None:
        """While listeners are published, look at the guest list once a second (a request
        only without a watch: with one the old gateway's redirect ends it).

        A process that only listens makes no gateway request of its own until a connection
        arrives. After a live migration its gateway connection is the old host's, so its
        listeners would stay unknown at the new host, and every new neighbour's first
        connection would fall back to TCP for good. Asking (cheap, the list is cached for
        the residency watch anyway) follows the old gateway's redirect, which re-publishes
        them at the new one within about a second.
        """
        while not self._closing.wait(_GUESTS_TTL):
            with self._lock:
                if not self._listeners:
                    self._keeper = None
                    return
            try:
                self._coresident()
            except AgentUnavailable:
                pass  # reconnected (and re-published) on the next round

    def unlisten(self, addr: str, port: int) -> None:
        norm = addr if addr in ("0.0.0.0", "::") else normalise_host(addr)
        if (norm, port) in self._listeners:
            self._listeners.discard((norm, port))
            try:
                self._call("unlisten", norm, port)
            except (AgentUnavailable, SlotRefused):
                pass  # the gateway forgot it with our connection

    def listener(self) -> VmListener:
        return VmListener(self)

    #### Channels

    def _open_pool(self, pool_id: str = "", wait: float = 0.0) -> tuple[Pool, PoolLayout]:
        """A pool of this guest, opened once per process: the host's shared pool (``""``), or
        the per-pair pool the gateway named in a grant, found by the id in its header; for
        that one, wait up to ``wait`` seconds for its hot-plugged device to appear.

        Raises:
            PoolError: no such ivshmem device, or its header is not a cosock pool.
        """
        with self._lock:
            known = self._pools.get(pool_id)
            if known is not None:
                return known
        ident = bytes.fromhex(pool_id) if pool_id else None
        # Only a hot-plugged pair pool is worth waiting for (the shared one is there from boot).
        waits = ident is not None and not os.environ.get(ENV_IVSHMEM)
        deadline = time.monotonic() + (wait if waits else 0.0)
        rescan_at = time.monotonic() + _RESCAN_AFTER_S
        while True:
            try:
                path = find_device(pool_id=ident)
                pool = Pool(path)
                break
            except (PoolError, OSError) as exc:
                now = time.monotonic()
                if now >= deadline:
                    raise PoolError(str(exc)) from None
                if now >= rescan_at:  # the ACPI event did not add it: ask the kernel
                    rescan_at = deadline
                    with contextlib.suppress(OSError):
                        PCI_RESCAN.write_text("1")
                time.sleep(0.02)
        try:
            layout = pool.layout()
            if ident is not None and pool.identity()[0] != ident:
                raise PoolError(f"{path}: not pool {pool_id}")
        except BaseException:
            pool.close()
            raise
        with self._lock:
            if pool_id in self._pools:  # another thread opened it meanwhile
                pool.close()
                return self._pools[pool_id]
            self._prune_locked()
            self._pools[pool_id] = (pool, layout)
            return pool, layout

    def _prune_locked(self) -> None:
        """Forget pair pools whose device was unplugged (the pair had no connection left)."""
        for key, (pool, _) in list(self._pools.items()):
            if key and not pool.path.exists():
                pool.close()
                del self._pools[key]

    def _map(
        self, slot: int, generation: int, pool_id: str = "", side: int = CLIENT, stamp: int = 0
    ) -> SlotMapping:
        """Map one slot, checked (headers, and the grant's ``stamp`` if the gateway gave
        one), and mark it MAPPED by ``side``; it is given back (and marked RELEASED) when the
        mapping closes.

        Raises:
            PoolError, OSError: the slot cannot be mapped, its headers are wrong, or it
                holds another grant than ours.
        """
        pool, layout = self._open_pool(pool_id, PLUG_WAIT_S)
        fd = os.open(pool.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            mm = SlotMapping(fd, layout.slot_size, offset=layout.offset(slot))
        finally:
            os.close(fd)
        if not channel_headers_ok(mm, layout.capacity):
            mm.close()
            raise PoolError(f"slot {slot} does not hold a channel of {layout.capacity}")
        if stamp and read_stamp(mm) != stamp:
            mm.close()
            raise PoolError(f"slot {slot} holds another grant than ours (granted again?)")
        mm._stamp = stamp  # type: ignore[attr-defined]
        mark_use(mm, side, MAPPED)
        mm._side = side  # type: ignore[attr-defined]
        mm._give_back = SlotGrant(  # type: ignore[attr-defined]
            os.getpid(), self, slot, generation, self.epoch, pool_id
        )
        _mappings.add(mm)
        return mm

    def free(self, slot: int, generation: int, epoch: int | None = None, pool_id: str = "") -> None:
        """Give a slot back; not one granted by another host's gateway (``epoch``): that
        one was dropped when we left, and its number may be a live grant here."""
        if epoch is not None and epoch != self.epoch:
            return
        try:
            self._call("free_slot", slot, generation, pool_id)
        except (AgentUnavailable, SlotRefused):
            pass  # the gateway frees it when our connection drops

    def offer(
        self, local: tuple[str, int], server: tuple[str, int], upgrade: bool = False
    ) -> tuple[bytes, SlotMapping, int] | FallbackReason:
        """Client: a slot for our connection to a listener on another VM of this host,
        mapped: ``(nonce, mapping, capacity)``, or why the connection stays on TCP.
        ``upgrade``: the connection exists (on TCP) and its server may have closed the
        listener it came through since."""
        try:
            shared = self._gateway().pools == "shared"
            if shared:  # no device, no need to ask (per pair: it is plugged on demand)
                self._open_pool()
        except AgentUnavailable:
            return FallbackReason.AGENT_UNREACHABLE
        except (PoolError, OSError):
            return FallbackReason.NO_SHM_DEVICE
        key: Key = (normalise_host(local[0]), int(local[1]), server[0], server[1])
        nonce = os.urandom(16)
        try:
            slot, generation, capacity, pool_id, stamp = self._call(
                "offer_grant", key, nonce, upgrade
            )
        except AgentUnavailable:
            return FallbackReason.AGENT_UNREACHABLE
        except SlotRefused as exc:
            self.last_refusal = str(exc)
            return _refusal(str(exc))
        try:
            _, layout = self._open_pool(pool_id, PLUG_WAIT_S)
        except (PoolError, OSError, ValueError) as exc:
            self.last_refusal = f"no-shm-device: {exc}"
            self.free(slot, generation, None, pool_id)
            return FallbackReason.NO_SHM_DEVICE
        if capacity != layout.capacity:
            self.free(slot, generation, None, pool_id)
            return FallbackReason.RESOURCE
        try:
            mm = self._map(slot, generation, pool_id, CLIENT, stamp)
        except (PoolError, OSError):
            self.free(slot, generation, None, pool_id)
            return FallbackReason.RESOURCE
        return nonce, mm, capacity

    def claim(self, key: Key) -> VmPending | None:
        """Server: the offer the gateway holds for exactly this accepted connection."""
        try:
            slot, generation, nonce, _, pool_id, stamp = self._call("claim_offer_grant", key)
        except (AgentUnavailable, SlotRefused):
            return None
        try:
            _, layout = self._open_pool(pool_id, PLUG_WAIT_S)
            offer = Offer(
                client=(key[0], key[1]),
                server=(key[2], key[3]),
                nonce=nonce,
                capacity=layout.capacity,
                family=6 if ":" in key[0] else 4,
            )
        except Exception:
            self.free(slot, generation, None, pool_id)
            return None
        return VmPending(offer, slot, generation, self, pool_id, stamp)


def _refusal(message: str) -> FallbackReason:
    """The gateway's refusal as a fallback reason (its message starts with a reason word)."""
    if message.startswith(("not-coresident", "no-listener")):
        return FallbackReason.NOT_CORESIDENT
    if message.startswith("resource"):
        return FallbackReason.RESOURCE
    return FallbackReason.OFFER_UNDELIVERED


class VmListener:
    """A listener's stand-in for its rendezvous socket: offers come from the gateway."""

    netns = 0

    def __init__(self, directory: VmDirectory) -> None:
        self._directory = directory
        self._owner = os.getpid()
        me = directory.me
        self.path = RENDEZVOUS_PREFIX + (me.name if me is not None else "?")
        self.dropped: dict[str, int] = {}

    def take(self, key: Key) -> VmPending | None:
        return self._directory.claim(key)

    def drain(self) -> None:
        pass

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(slots=True)
class VmPending:
    """An offer the gateway held for an accepted connection; :meth:`map` maps its slot."""

    offer: Offer
    slot: int
    generation: int
    directory: VmDirectory
    pool_id: str = ""
    stamp: int = 0

    def map(self) -> tuple[SlotMapping | None, FallbackReason | None]:
        try:
            mm = self.directory._map(self.slot, self.generation, self.pool_id, SERVER, self.stamp)
            return mm, None
        except (PoolError, OSError):
            self.directory.free(self.slot, self.generation, None, self.pool_id)
            return None, FallbackReason.RESOURCE


#### Observability: census files and `cosock status` inside a VM

#: Where the processes of a VM publish their census (``cosock._census``): no agent runs in a
#: VM, so ``cosock status`` there reads the files itself (:func:`status`).
ENV_CENSUS = "COSOCK_VM_CENSUS"


def census_dir() -> Path | None:
    """This VM's census directory, made if missing; None if it cannot be."""
    path = Path(os.environ.get(ENV_CENSUS) or "/run/cosock/conn")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path if path.is_dir() else None


def status() -> dict[str, Any]:
    """What ``cosock status`` shows inside a VM: this VM's processes and their connections
    (their census files), and the VMs of this host as the gateway lists them.

    Raises:
        AgentUnavailable: the gateway cannot be reached.
    """
    from .agent._connections import collect

    d = directory()
    if d is None:
        raise AgentUnavailable(f"{ENV_GATEWAY} is not set: not a lab VM")
    guests = d._call("guests")
    me = d.me.name if d.me is not None else None
    where = census_dir()
    gate = d._gate_addr  # after a migration not the boot-time one (ENV_GATEWAY)
    return {
        "host": f"VM gateway {f'{gate[0]}:{gate[1]}' if gate else os.environ.get(ENV_GATEWAY)}",
        "pid": None,
        "guests": [{"name": g, "netns": "vm", "addresses": [a]} for g, a in guests.items()],
        "listeners": [],
        "processes": [] if where is None else collect(where, guest_of=lambda _pid: me),
    }


#### The process's directory

_directory: VmDirectory | None = None
_directory_lock = threading.Lock()


def directory() -> VmDirectory | None:
    """This process's gateway directory inside a VM; None elsewhere (memfd provider)."""
    global _directory
    if _directory is not None:
        return _directory
    if not active():
        return None
    with _directory_lock:
        if _directory is None:
            _directory = VmDirectory()
        return _directory


def reset() -> None:
    """Close this process's directory (tests; the next use opens a new one)."""
    global _directory
    with _directory_lock:
        d, _directory = _directory, None
    if d is not None:
        d.close()


#: A fork is under way: the child's reset (_after_fork_in_child) is still to be done.
_child_reset_due = False


def _before_fork() -> None:
    """Each slot mapping this process may give back gets one more holder, the child: the
    last of the two to let go gives it back (before, neither did, and a long-running
    ForkingTCPServer used up its pair's pool: one slot per connection).  A fork that fails
    leaves the count one too high: that slot then goes back only when the gateway
    connections close, as every slot shared by fork did before."""
    global _child_reset_due
    _holders_lock.acquire()  # released after the fork (parent), made anew (child)
    _child_reset_due = True
    me = os.getpid()
    for mm in list(_mappings):
        grant = mm.__dict__.get("_give_back")
        if grant is None or grant.pid != me or mm.closed:
            continue
        holders = mm.__dict__.get("_holders")
        try:
            if holders is None:
                holders = mm._holders = _Holders()  # type: ignore[attr-defined]
            holders.add()
        except Exception:
            # No count (no descriptor left, say): neither process gives it back; the
            # gateway frees it when their connections to it close (as before the count).
            mm.__dict__.pop("_give_back", None)
            dropped = mm.__dict__.pop("_holders", None)
            if dropped is not None:
                dropped.close()


def _after_fork_in_parent() -> None:
    global _child_reset_due
    _child_reset_due = False
    _holders_lock.release()


def _after_fork_in_child() -> None:
    """The child never speaks on the parent's gateway connection.  Once per fork: the
    census's fork hook calls this before it restarts the census and residency threads
    (which may ask the gateway at once), and fork hooks run in the order modules were
    imported; as this module's own hook ran later, a child's first census went out on the
    parent's connection and the parent read its answer for a claim (a KeyError in
    accept(), the server gone)."""
    global _directory_lock, _child_reset_due, _holders_lock
    if not _child_reset_due:
        return
    _child_reset_due = False
    _holders_lock = threading.Lock()
    _directory_lock = threading.Lock()
    if _directory is not None:
        _directory._after_fork_in_child()
    me = os.getpid()
    for mm in list(_mappings):
        grant = mm.__dict__.get("_give_back")
        if grant is not None and "_holders" in mm.__dict__:
            mm._give_back = grant._replace(pid=me)  # type: ignore[attr-defined]


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)

__all__ = [
    "RENDEZVOUS_PREFIX",
    "SlotMapping",
    "VmDirectory",
    "VmListener",
    "VmPending",
    "active",
    "census_dir",
    "directory",
    "reset",
    "status",
]
