"""Channels in an ivshmem pool: the shared-memory provider for QEMU guests.

Inside a VM, QEMU's ``ivshmem-plain`` device (PCI 1af4:1110) exposes a host file as BAR2; the
guest maps ``/sys/bus/pci/devices/<bdf>/resource2`` (root, no driver). On the host the same
memory is the pool file in /dev/shm. The pool is cut into page-aligned slots, each exactly one
channel (``_ring`` layout), so a slot mapped with ``mmap(offset=...)`` is an ordinary channel
mapping and ``RingWriter``/``RingReader`` use it unchanged. See docs/vm-backend.md.

Layout: a 4 KiB pool header (written only by the host agent, validated by guests) then
``slot_count`` slots of ``slot_size`` bytes from ``data_offset``. :class:`SlotTable` is the
agent's bookkeeping of who may use which slot (pure data, no IO).
"""

from __future__ import annotations

import collections
import mmap
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import CosockError
from ._ring import channel_headers_ok, channel_size, check_capacity, format_channel

POOL_MAGIC = 0x504B5343  # b"CSKP" little-endian
POOL_VERSION = 1
POOL_HEADER_SIZE = 4096
#: magic, version, capacity, slot_size, slot_count, data_offset (all u64, little-endian).
_HEADER = struct.Struct("<6Q")
#: After it: the pool's identity (16 random bytes; zero for a host's shared pool) and a label
#: for people (the pair's guest names, NUL-padded). A per-pair pool is told apart by its id:
#: a guest may see several ivshmem devices (one per neighbour it talks to).
_IDENT = struct.Struct("<16s64s")
_IDENT_OFFSET = _HEADER.size
IVSHMEM_VENDOR = "0x1af4"
IVSHMEM_DEVICE = "0x1110"
PCI_DEVICES = Path("/sys/bus/pci/devices")
ENV_IVSHMEM = "COSOCK_IVSHMEM"


class PoolError(CosockError):
    """No ivshmem device, or a pool whose header is missing or out of bounds."""


@dataclass(frozen=True)
class PoolLayout:
    capacity: int  # bytes per ring (per direction)
    slot_size: int
    slot_count: int
    data_offset: int

    def offset(self, slot: int) -> int:
        if not 0 <= slot < self.slot_count:
            raise PoolError(f"slot {slot} outside the pool (0..{self.slot_count - 1})")
        return self.data_offset + slot * self.slot_size


def plan(pool_size: int, capacity: int) -> PoolLayout:
    """As many channels of ``capacity`` as fit after the header."""
    check_capacity(capacity)
    slot = channel_size(capacity)
    count = (pool_size - POOL_HEADER_SIZE) // slot
    if count < 1:
        raise PoolError(f"a pool of {pool_size} bytes holds no channel of {capacity}")
    return PoolLayout(capacity, slot, count, POOL_HEADER_SIZE)


def ivshmem_devices(root: Path = PCI_DEVICES) -> list[Path]:
    """Every ivshmem-plain device under ``root`` (sysfs PCI devices), sorted."""
    try:
        devices = sorted(root.iterdir())
    except OSError:
        return []
    found = []
    for dev in devices:
        try:
            vendor = (dev / "vendor").read_text().strip()
            device = (dev / "device").read_text().strip()
        except OSError:
            continue
        if (vendor, device) == (IVSHMEM_VENDOR, IVSHMEM_DEVICE):
            found.append(dev)
    return found


def find_device(root: Path = PCI_DEVICES, pool_id: bytes | None = None) -> Path:
    """The guest's pool: ``$COSOCK_IVSHMEM`` (a file, or a PCI address under ``root``) or the
    ``resource2`` of the first ivshmem device; with ``pool_id``, of the device whose header
    carries that identity (a per-pair pool: the gateway names it in the grant).

    Raises:
        PoolError: no such device (not a QEMU guest with ivshmem, sysfs not mounted, or the
            pair's pool is not plugged in (yet)).
    """
    chosen = os.environ.get(ENV_IVSHMEM, "")
    if chosen:
        path = Path(chosen)
        if path.is_dir():  # a directory of pool files (pretend guests on the host)
            return _by_id(sorted(path.glob("*.ivshmem")), pool_id, path)
        return path if path.is_file() else root / chosen / "resource2"
    devices = [dev / "resource2" for dev in ivshmem_devices(root)]
    if pool_id is None and devices:
        return devices[0]
    if not devices:
        raise PoolError(f"no ivshmem device (PCI {IVSHMEM_VENDOR}:{IVSHMEM_DEVICE}) under {root}")
    return _by_id(devices, pool_id, root)


def _by_id(candidates: list[Path], pool_id: bytes | None, where: Path) -> Path:
    for path in candidates:
        if pool_id is None:
            return path
        try:
            with Pool(path) as pool:
                if pool.identity()[0] == pool_id:
                    return path
        except (OSError, ValueError, PoolError):
            continue  # a device being unplugged, or a BAR not mapped (yet)
    want = "any pool" if pool_id is None else f"pool {pool_id.hex()}"
    raise PoolError(f"no ivshmem device holding {want} under {where}")


class Pool:
    """An open pool: a BAR2 resource file in a guest, or the pool file on the host."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            # sysfs resource files report their size in st_size as well.
            self.size = os.fstat(self._fd).st_size
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    #### Header: written by the host agent, validated by guests

    def format(self, capacity: int, pool_id: bytes = b"", label: str = "") -> PoolLayout:
        """Write the pool header for slots of ``capacity`` (host agent only; zeroes nothing
        else: each slot is formatted when it is handed out); ``pool_id``/``label``: a
        per-pair pool's identity (zero for a host's shared pool)."""
        layout = plan(self.size, capacity)
        if len(pool_id) not in (0, 16):
            raise PoolError("a pool id is 16 bytes")
        with mmap.mmap(self._fd, POOL_HEADER_SIZE) as mm:
            mm[: _HEADER.size] = _HEADER.pack(
                POOL_MAGIC,
                POOL_VERSION,
                layout.capacity,
                layout.slot_size,
                layout.slot_count,
                layout.data_offset,
            )
            mm[_IDENT_OFFSET : _IDENT_OFFSET + _IDENT.size] = _IDENT.pack(
                pool_id, label.encode()[:64]
            )
        return layout

    def identity(self) -> tuple[bytes, str]:
        """(pool id, label) from the header: which pair's pool this is. Read, never trusted:
        the slot grant still comes from the gateway, and an id only picks a device."""
        if self.size < POOL_HEADER_SIZE:
            raise PoolError(f"{self.path}: too small for a pool header")
        with mmap.mmap(self._fd, POOL_HEADER_SIZE) as mm:
            pool_id, label = _IDENT.unpack(mm[_IDENT_OFFSET : _IDENT_OFFSET + _IDENT.size])
        return pool_id, label.rstrip(b"\0").decode(errors="replace")

    def layout(self) -> PoolLayout:
        """The pool header, checked: ours, and every slot inside the pool.

        Raises:
            PoolError: no or foreign header, or values that would reach outside the pool.
        """
        with mmap.mmap(self._fd, POOL_HEADER_SIZE) as mm:
            magic, version, capacity, slot_size, count, offset = _HEADER.unpack(mm[: _HEADER.size])
        if (magic, version) != (POOL_MAGIC, POOL_VERSION):
            raise PoolError(f"{self.path}: not a formatted cosock pool")
        try:
            check_capacity(capacity)
        except ValueError as exc:
            raise PoolError(f"{self.path}: {exc}") from None
        if (
            slot_size != channel_size(capacity)
            or offset < POOL_HEADER_SIZE
            or offset % mmap.ALLOCATIONGRANULARITY
            or count < 1
            or offset + count * slot_size > self.size
        ):
            raise PoolError(f"{self.path}: pool header out of bounds")
        return PoolLayout(capacity, slot_size, count, offset)

    #### Slots

    def map_slot(self, layout: PoolLayout, slot: int) -> mmap.mmap:
        """A mapping of exactly one slot: a channel for ``RingWriter``/``RingReader``."""
        return mmap.mmap(self._fd, layout.slot_size, offset=layout.offset(slot))

    def format_slot(self, layout: PoolLayout, slot: int, stamp: int = 0) -> None:
        """Zero a slot's ring headers (done by whoever hands the slot out: the agent) and
        write the grant's ``stamp`` into it (:func:`read_stamp`)."""
        with self.map_slot(layout, slot) as mm:
            format_channel(mm, layout.capacity)
            if stamp:
                mm[_STAMP_WORD : _STAMP_WORD + 8] = stamp.to_bytes(8, "little")

    def slot_ok(self, layout: PoolLayout, slot: int) -> bool:
        with self.map_slot(layout, slot) as mm:
            return channel_headers_ok(mm, layout.capacity)

    def slot_use(self, layout: PoolLayout, slot: int) -> tuple[int, int]:
        """The client's and the server's :func:`mark_use` of a slot (0: never mapped)."""
        with self.map_slot(layout, slot) as mm:
            return _use(mm, CLIENT), _use(mm, SERVER)

    def slots_in_use(self, layout: PoolLayout) -> list[int]:
        """Slots a party has mapped and not given back (:func:`mark_use`): what a gateway
        that did not hand them out (its predecessor crashed) must not pull from under them,
        and what it hands out again only when no other slot is free (a process whose
        gateway connection dropped, or whose guest left, may still use it)."""
        used = []
        for slot in range(layout.slot_count):  # the first page of each slot is enough
            with mmap.mmap(self._fd, mmap.PAGESIZE, offset=layout.offset(slot)) as mm:
                if MAPPED in (_use(mm, CLIENT), _use(mm, SERVER)):
                    used.append(slot)
        return used


#### Use marks: who still has a slot mapped (read only by a gateway after a crash)

#: A party's mark, in a word of the slot's first ring header that the rings never touch
#: (they use its first 8 cache lines); :meth:`Pool.format_slot` zeroes both.
CLIENT, SERVER = 0, 1
MAPPED, RELEASED = 1, 2
_USE_WORD = (64 * 8, 72 * 8)


def mark_use(mm: mmap.mmap, side: int, state: int) -> None:
    """``side`` (CLIENT or SERVER) has mapped the slot (MAPPED) or is done with it for good
    (RELEASED). A gateway that lost its slot table (a crash) unplugs a pool left plugged only
    when no slot of it is MAPPED."""
    mm[_USE_WORD[side] : _USE_WORD[side] + 8] = state.to_bytes(8, "little")


def _use(mm: mmap.mmap, side: int) -> int:
    return int.from_bytes(mm[_USE_WORD[side] : _USE_WORD[side] + 8], "little")


#### Grant stamps: which grant a slot's memory belongs to now

#: A random word the gateway writes into a slot when it hands it out (next to the use marks,
#: zeroed by :meth:`Pool.format_slot` like them) and names in the grant. A guest process keeps
#: its mapping of a slot after the gateway took the slot back, and a hot-unplugged pool's
#: mapping stays too: the guest kernel does not revoke it, and the pair's next pool, plugged
#: at the same BAR address, shows through it (docs/vm-backend.md, section 4). The stamp tells
#: such a mapping from the grant's own: checked when a slot is mapped, before a party writes
#: into a slot it is done with, and when a ring counter looks corrupt.
_STAMP_WORD = 80 * 8


def new_stamp() -> int:
    """A fresh grant stamp (never 0: 0 means "no stamp", a gateway without them)."""
    return int.from_bytes(os.urandom(8), "little") | 1


def read_stamp(mm: mmap.mmap) -> int:
    """The stamp of the grant the slot mapped by ``mm`` holds now."""
    return int.from_bytes(mm[_STAMP_WORD : _STAMP_WORD + 8], "little")


#### The agent's bookkeeping


@dataclass
class _Grant:
    owner: str  # guest that asked for the slot (the client)
    peer: str  # guest allowed to claim it (the server)
    key: tuple[str, int, str, int]  # the connection's 4-tuple
    generation: int
    nonce: str = ""  # hex; the in-band HELLO must carry it (a CoSocket offer)
    stamp: int = 0  # written into the slot (read_stamp); the parties check it
    claimed: bool = False
    freed_by: set[str] = field(default_factory=set)


class SlotTable:
    """Which slot belongs to which connection, as the host agent hands them out.

    Cooperative, not enforcement: on a shared pool any guest can map every slot (see
    docs/vm-backend.md, section 4). What it does guarantee is that an honest server only maps
    a slot the agent granted for exactly its connection, and that a freed slot's number is
    refused afterwards (the generation changes).
    """

    def __init__(self, slot_count: int) -> None:
        #: Oldest freed first: a slot just taken back is handed out again last, so a
        #: process that still maps it (see :meth:`alloc`) meets a stranger's grant late.
        self._free = collections.deque(range(slot_count))
        self._grants: dict[int, _Grant] = {}
        self._generation = 0

    @property
    def free_count(self) -> int:
        return len(self._free)

    def alloc(
        self,
        owner: str,
        peer: str,
        key: tuple[str, int, str, int],
        nonce: str = "",
        avoid: Collection[int] = (),
    ) -> tuple[int, int]:
        """A free slot for ``owner``'s connection ``key`` to ``peer``; (slot, generation).
        The slot freed longest ago, and not one of ``avoid`` (slots a process may still map:
        :meth:`Pool.slots_in_use`) unless no other is free.

        Raises:
            PoolError: no free slot (the connection stays on TCP).
        """
        if not self._free:
            raise PoolError("no free slot in the pool")
        slot = next((s for s in self._free if s not in avoid), self._free[0])
        self._free.remove(slot)
        self._generation += 1
        self._grants[slot] = _Grant(owner, peer, key, self._generation, nonce, new_stamp())
        return slot, self._generation

    def stamp_of(self, slot: int) -> int:
        """The stamp of the slot's grant (0: not granted)."""
        grant = self._grants.get(slot)
        return 0 if grant is None else grant.stamp

    def claim_key(
        self, claimer: str, key: tuple[str, int, str, int]
    ) -> tuple[int, int, str] | None:
        """The server's side of a CoSocket offer: the unclaimed grant for exactly this
        connection to ``claimer``, now claimed; ``(slot, generation, nonce)`` or None."""
        for slot, grant in self._grants.items():
            if not grant.claimed and grant.nonce and (grant.peer, grant.key) == (claimer, key):
                grant.claimed = True
                return slot, grant.generation, grant.nonce
        return None

    def claim(
        self, slot: int, generation: int, claimer: str, key: tuple[str, int, str, int]
    ) -> bool:
        """True once, for the granted peer, the same 4-tuple and the current generation."""
        grant = self._grants.get(slot)
        if grant is None or grant.claimed:
            return False
        if (grant.generation, grant.peer, grant.key) != (generation, claimer, key):
            return False
        grant.claimed = True
        return True

    def free(self, slot: int, generation: int, guest: str) -> bool:
        """A party is done with the slot; the slot is free again when both are (or when the
        owner frees an unclaimed one: the peer never mapped it). False for a stale or
        foreign request."""
        grant = self._grants.get(slot)
        if (
            grant is None
            or grant.generation != generation
            or guest not in (grant.owner, grant.peer)
        ):
            return False
        grant.freed_by.add(guest)
        if grant.freed_by >= {grant.owner, grant.peer} or (
            not grant.claimed and grant.owner in grant.freed_by
        ):
            self._release(slot)
        return True

    @property
    def held(self) -> int:
        """Slots granted and not free again."""
        return len(self._grants)

    def held_slots(self) -> list[int]:
        """The slots granted and not free again."""
        return sorted(self._grants)

    def count_of(self, guest: str) -> int:
        """Grants with ``guest`` as a party that ``guest`` has not freed yet."""
        return sum(
            1
            for g in self._grants.values()
            if guest in (g.owner, g.peer) and guest not in g.freed_by
        )

    def drop_guest(self, guest: str) -> list[int]:
        """A guest left (stopped, migrated away): it is done with every slot it was party
        to, as if it had freed each one. A slot the other party still uses stays granted
        until that one frees it too (its process may not have noticed yet: taking the slot
        from under it would let the next grant share its rings). Returns those slots."""
        gone = [s for s, g in self._grants.items() if guest in (g.owner, g.peer)]
        for slot in gone:
            grant = self._grants[slot]
            self.free(slot, grant.generation, guest)
        return gone

    def _release(self, slot: int) -> None:
        del self._grants[slot]
        self._free.append(slot)


__all__ = [
    "CLIENT",
    "MAPPED",
    "RELEASED",
    "SERVER",
    "Pool",
    "PoolError",
    "PoolLayout",
    "SlotTable",
    "find_device",
    "ivshmem_devices",
    "mark_use",
    "new_stamp",
    "plan",
    "read_stamp",
]
