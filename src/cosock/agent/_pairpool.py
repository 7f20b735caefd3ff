"""Per-pair ivshmem pools: only the two VMs of a connection map its memory.

One pool shared by every VM of a host isolates nothing (docs/security.md): a guest's root maps
the whole BAR. So with per-pair pools the gateway creates, on the first co-resident connection
between VMs A and B, a pool file ``<prefix>A-B.ivshmem`` whose header carries a random pool id
and the pair's names, and hot-plugs it into A and B only, by QMP (``object-add``
memory-backend-file + ``device_add ivshmem-plain,master=on``: ACPI PCI hot-plug on the ``pc``
machine). Every A<->B connection is a slot of it. When the pair holds no slot for
:data:`LINGER_S` (or at once when one of them is leaving or left the host), the pool is
unplugged from both and its file removed. See docs/vm-backend.md, section 4.

QMP is reached through each guest's monitor socket, whose path the lab writes into the guests
file; a refused ``object-add``/``device_add`` undoes what was plugged and removes the file, and
the connection stays on TCP with the reason (``resource: hot-plug ...``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .._ivshmem import Pool, PoolError, PoolLayout, SlotTable

log = logging.getLogger("cosock.agent.vm")

#: A pair's pool stays plugged this long after its last slot was freed: a program that
#: opens connections one after the other does not pay a hot-plug for each.
LINGER_S = 2.0
#: How often the reaper looks for idle pairs.
REAP_EVERY_S = 0.25
#: How long a guest may take to release a hot-unplugged device (ACPI eject).
UNPLUG_TIMEOUT_S = 20.0
IVSHMEM_DEVICE_ID = 0x1110


class PlugError(Exception):
    """QEMU refused (or could not be asked for) a hot-plug; the message says which step."""


def object_id(peer: str) -> str:
    """QOM id of the memory backend of the pool shared with ``peer`` (in this VM's QEMU)."""
    return f"cpair-{peer}"


def device_id(peer: str) -> str:
    return f"cpaird-{peer}"


class Qmp:
    """The QMP side: plug or unplug a pair's pool in one VM's QEMU (``lab.qemu._qmp``)."""

    def plug(self, qmp: Path, pool: Path, size: int, peer: str) -> None:
        from ..lab.qemu import _qmp

        obj, dev = object_id(peer), device_id(peer)
        try:
            # The pair's previous pool (same backend id, likely the same PCI slot) may not be
            # freed yet: plugging over it aborts QEMU.
            if held := _qmp.ram_released(qmp, lambda b: b == obj, UNPLUG_TIMEOUT_S):
                raise PlugError(f"QEMU still holds the RAM of {held}")
            _qmp.command(
                qmp,
                "object-add",
                **{
                    "qom-type": "memory-backend-file",
                    "id": obj,
                    "mem-path": str(pool),
                    "size": size,
                    "share": True,
                },
            )
        except _qmp.QmpError as exc:
            raise PlugError(f"object-add {obj}: {exc}") from None
        try:
            _qmp.command(qmp, "device_add", driver="ivshmem-plain", id=dev, memdev=obj, master="on")
        except _qmp.QmpError as exc:
            with contextlib.suppress(_qmp.QmpError):
                _qmp.command(qmp, "object-del", id=obj)
            raise PlugError(f"device_add {dev}: {exc}") from None

    def unplug(self, qmp: Path, peer: str, timeout: float = UNPLUG_TIMEOUT_S) -> None:
        """``device_del`` (the guest acks the ACPI eject) then ``object-del``; either may
        already be gone (the lab unplugs a migrating VM's pools itself)."""
        from ..lab.qemu import _qmp

        unplug_devices(qmp, {device_id(peer)}, timeout)
        objects = {o.get("name") for o in _qmp.command(qmp, "qom-list", path="/objects")}
        if object_id(peer) in objects:
            with contextlib.suppress(_qmp.QmpError):
                _qmp.command(qmp, "object-del", id=object_id(peer))


def ivshmem_qdev_ids(qmp: Path) -> set[str]:
    """The qdev ids of the ivshmem devices plugged into a VM (its QEMU's ``query-pci``)."""
    from ..lab.qemu import _qmp

    return {
        str(dev.get("qdev_id", ""))
        for bus in _qmp.command(qmp, "query-pci")
        for dev in bus.get("devices", [])
        if dev.get("id", {}).get("device") == IVSHMEM_DEVICE_ID
    }


def unplug_devices(qmp: Path, ids: set[str], timeout: float) -> None:
    """Hot-unplug these devices and wait until QEMU no longer lists them.

    Raises:
        PlugError: still there after ``timeout`` (the guest did not ack the eject).
    """
    from ..lab.qemu import _qmp

    present = ivshmem_qdev_ids(qmp) & ids
    for dev in present:
        with contextlib.suppress(_qmp.QmpError):  # already being unplugged: fine
            _qmp.command(qmp, "device_del", id=dev)
    deadline = time.monotonic() + timeout
    while present:
        present = ivshmem_qdev_ids(qmp) & ids
        if present and time.monotonic() > deadline:
            raise PlugError(f"the guest did not release {sorted(present)} within {timeout:g} s")
        if present:
            time.sleep(0.05)


@dataclass(eq=False)
class PairPool:
    """One pair's pool: its file, layout, slots, and whom it is plugged into."""

    members: tuple[str, str]  # sorted guest names
    path: Path
    pool: Pool
    layout: PoolLayout
    table: SlotTable
    pool_id: bytes
    plugged: set[str] = field(default_factory=set)
    idle_since: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    gone: bool = False  # unplugged and removed: a new pool is made for the next connection

    def other(self, guest: str) -> str:
        """The member that is not ``guest``."""
        return self.members[1] if guest == self.members[0] else self.members[0]


class PairPools:
    """The gateway's per-pair pools (created on demand, reaped when idle).

    ``qmp_of(guest)``: the guest's QMP socket if it runs on this host (None: it left);
    ``status_of(guest)``: "here", "leaving" or "gone".
    """

    def __init__(
        self,
        prefix: str,
        size: int,
        capacity: int,
        qmp_of: Callable[[str], Path | None],
        status_of: Callable[[str], str],
        qmp: Qmp | None = None,
    ) -> None:
        self.prefix = prefix
        self.size = size
        self.capacity = capacity
        self._qmp_of = qmp_of
        self._status_of = status_of
        self._qmp = qmp or Qmp()
        self._lock = threading.Lock()
        self._pairs: dict[tuple[str, str], PairPool] = {}
        self._closing = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="cosock-pair-reaper")
        self._reaper.daemon = True
        self._reaper.start()
        #: Figures for people and tests: hot-plugs done, their last duration.
        self.plugs = 0
        self.last_plug_s = 0.0

    def path_of(self, a: str, b: str) -> Path:
        x, y = sorted((a, b))
        return Path(f"{self.prefix}{x}-{y}.ivshmem")

    #### Finding and making pools

    def acquire(self, a: str, b: str) -> PairPool:
        """The live pool of pair {a, b}, made and plugged into both if there is none; its
        ``lock`` is held on return (the caller allocates a slot, then releases it), so the
        reaper cannot unplug it in between.

        Raises:
            PlugError: the file could not be made or QEMU refused the hot-plug (nothing of
                the attempt is left: plugged halves unplugged, file removed).
        """
        members: tuple[str, str] = tuple(sorted((a, b)))  # type: ignore[assignment]
        while True:
            with self._lock:
                pair = self._pairs.get(members)
                if pair is None:
                    pair = self._make(members)
                    self._pairs[members] = pair
            pair.lock.acquire()
            if not pair.gone:
                break
            pair.lock.release()  # reaped meanwhile: make a new one
        if pair.plugged == set(members):
            return pair
        try:
            self._plug(pair)
        except BaseException:
            self._remove(pair)
            pair.lock.release()
            raise
        return pair

    def _make(self, members: tuple[str, str]) -> PairPool:
        path = self.path_of(*members)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale file of a crashed agent: never reused
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, self.size)
            finally:
                os.close(fd)
            pool = Pool(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            raise PlugError(f"creating {path}: {exc.strerror}") from None
        pool_id = os.urandom(16)
        try:
            layout = pool.format(self.capacity, pool_id, f"{members[0]}-{members[1]}")
        except PoolError:
            pool.close()
            path.unlink()
            raise
        return PairPool(members, path, pool, layout, SlotTable(layout.slot_count), pool_id)

    def _plug(self, pair: PairPool) -> None:
        t = time.monotonic()
        for guest in pair.members:
            if guest in pair.plugged:
                continue
            peer = pair.other(guest)
            qmp = self._qmp_of(guest)
            if qmp is None:
                raise PlugError(f"{guest} has no QMP socket on this host")
            try:
                self._qmp.plug(qmp, pair.path, self.size, peer)
            except Exception as exc:  # refused; or the QMP socket gone, QEMU died mid-command
                raise PlugError(f"hot-plug into {guest}: {exc}") from None
            pair.plugged.add(guest)
        self.plugs += 1
        self.last_plug_s = time.monotonic() - t
        log.info(
            "pair pool %s plugged into %s in %.3f s", pair.path.name, pair.members, self.last_plug_s
        )

    def _remove(self, pair: PairPool) -> None:
        """Unplug from whoever still has it, drop the file (pair lock held)."""
        for guest in sorted(pair.plugged):
            qmp = self._qmp_of(guest)
            peer = pair.other(guest)
            if qmp is not None:
                try:
                    self._qmp.unplug(qmp, peer)
                except Exception as exc:  # a guest that does not ack: say so, go on
                    log.warning("unplugging %s from %s: %s", pair.path.name, guest, exc)
            pair.plugged.discard(guest)
        pair.gone = True
        pair.pool.close()
        with contextlib.suppress(FileNotFoundError):
            pair.path.unlink()
        with self._lock:
            if self._pairs.get(pair.members) is pair:
                del self._pairs[pair.members]

    #### Slots

    def find(self, pool_id: bytes) -> PairPool | None:
        with self._lock:
            return next((p for p in self._pairs.values() if p.pool_id == pool_id), None)

    def of(self, a: str, b: str) -> PairPool | None:
        with self._lock:
            return self._pairs.get(tuple(sorted((a, b))))  # type: ignore[arg-type]

    def count_of(self, guest: str) -> int:
        with self._lock:
            pairs = list(self._pairs.values())
        return sum(p.table.count_of(guest) for p in pairs if guest in p.members)

    def drop_guest(self, guest: str) -> list[tuple[str, int]]:
        """A guest left the host: its slots in every pair are released (the reaper then
        unplugs those pools from the other member)."""
        with self._lock:
            pairs = [p for p in self._pairs.values() if guest in p.members]
        dropped = []
        for p in pairs:
            dropped += [(p.path.name, s) for s in p.table.drop_guest(guest)]
            p.plugged.discard(guest)  # its QEMU is elsewhere now (or gone)
        return dropped

    def note_idle(self, pair: PairPool) -> None:
        if pair.table.held == 0 and pair.idle_since is None:
            pair.idle_since = time.monotonic()

    #### The reaper

    def _reap_loop(self) -> None:
        while not self._closing.wait(REAP_EVERY_S):
            try:
                self.reap()
            except Exception:  # never let the reaper die: log and go on
                log.exception("pair pool reaper")

    def reap(self, now: float | None = None) -> list[str]:
        """Unplug and remove idle pools: no slot held for LINGER_S, or at once when one of
        the pair is leaving or gone. Returns the files removed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            pairs = list(self._pairs.values())
        removed = []
        for pair in pairs:
            if pair.table.held:
                pair.idle_since = None
                continue
            if pair.idle_since is None:
                pair.idle_since = now
            away = any(self._status_of(g) != "here" for g in pair.members)
            if not away and now - pair.idle_since < LINGER_S:
                continue
            if not pair.lock.acquire(blocking=False):
                continue  # a connection is being set up on it
            try:
                if pair.table.held or pair.gone:
                    continue
                self._remove(pair)
                removed.append(pair.path.name)
                log.info("pair pool %s unplugged and removed", pair.path.name)
            finally:
                pair.lock.release()
        return removed

    def close(self) -> None:
        """Stop the reaper and remove every pool (the agent is going away)."""
        self._closing.set()
        if self._reaper is not threading.current_thread():
            self._reaper.join(5.0)
        with self._lock:
            pairs = list(self._pairs.values())
        for pair in pairs:
            with pair.lock:
                if not pair.gone:
                    self._remove(pair)


__all__ = [
    "LINGER_S",
    "PairPool",
    "PairPools",
    "PlugError",
    "Qmp",
    "device_id",
    "ivshmem_qdev_ids",
    "object_id",
    "unplug_devices",
]
