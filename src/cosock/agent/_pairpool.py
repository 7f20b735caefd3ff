"""Per-pair ivshmem pools: only the two VMs of a connection map its memory.

One pool shared by every VM of a host isolates nothing (docs/security.md): a guest's root maps
the whole BAR. So with per-pair pools the gateway creates, on the first co-resident connection
between VMs A and B, a pool file ``<prefix>A-B.ivshmem`` whose header carries a random pool id
and the pair's names, and hot-plugs it into A and B only, by QMP (``object-add``
memory-backend-file + ``device_add ivshmem-plain,master=on``: ACPI PCI hot-plug on the ``pc``
machine). Every A<->B connection is a slot of it. When the pair holds no slot for
:data:`LINGER_S` (or at once when one of them is leaving or left the host), the pool is
unplugged from both and its file removed. See docs/vm-backend.md, section 4.

A pair whose pool is full gets another one (``<prefix>A-B.2.ivshmem``, ...), up to
``max_pools`` per pair (:data:`MAX_POOLS`, the agent's ``--vm-pair-max-pools``); only then is a
connection refused (``resource``). Each extra pool is a device of its own, reaped on its own.
QOM ids carry the pool's id (``cpair-B-<8 hex>``), so they never repeat: a restarted agent
plugs a pair afresh although its crashed predecessor left devices plugged, and it unplugs
those (:meth:`PairPools.sweep`: every device and object of ours it did not make).

An agent that stops (SIGTERM: :meth:`PairPools.close`) unplugs and removes only the pools no
connection uses; one with a slot still granted or marked mapped stays plugged with its file,
as after a crash, so that the VMs' connections on it carry on and the next agent unplugs it
once they are done. (``cosock lab down`` stops the QEMUs first and removes every pool file
by name afterwards.)

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
#: Pools one pair may have at once by default (each 16 MiB, 7 channels, one PCI slot in both
#: VMs): 28 connections per pair.
MAX_POOLS = 4
#: The most the agent accepts: a VM has up to 3 neighbours in a lab, and 3 x 8 pool devices
#: plus its own few stay within the 32 slots of the ``pc`` machine's PCI bus 0.
MAX_POOLS_LIMIT = 8
#: The agent's default for ``--vm-pair-max-pools``.
ENV_PAIR_MAX_POOLS = "COSOCK_VM_PAIR_MAX_POOLS"
#: The QOM id prefixes of pair pools (memory backend, device): ours, whichever agent made them.
OBJECT_PREFIX, DEVICE_PREFIX = "cpair-", "cpaird-"


class PlugError(Exception):
    """QEMU refused (or could not be asked for) a hot-plug; the message says which step."""


def object_id(peer: str, tag: str = "") -> str:
    """QOM id of the memory backend of the pool ``tag`` (its id's first 8 hex digits) shared
    with ``peer``, in this VM's QEMU; ``object_id("")`` is the prefix of them all."""
    return f"{OBJECT_PREFIX}{peer}" + (f"-{tag}" if tag else "")


def device_id(peer: str, tag: str = "") -> str:
    return f"{DEVICE_PREFIX}{peer}" + (f"-{tag}" if tag else "")


class Qmp:
    """The QMP side: plug or unplug a pair's pool in one VM's QEMU (``lab.qemu._qmp``)."""

    def plug(self, qmp: Path, pool: Path, size: int, obj: str, dev: str) -> None:
        """``object-add`` + ``device_add``; ids are new for every pool, so no RAM block of an
        earlier pool (freed after an RCU grace period) can clash with this one."""
        from ..lab.qemu import _qmp

        try:
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

    def unplug(
        self, qmp: Path, devs: set[str], objs: set[str], timeout: float = UNPLUG_TIMEOUT_S
    ) -> None:
        """``device_del`` (the guest acks the ACPI eject) then ``object-del``; either may
        already be gone (the lab unplugs a migrating VM's pools itself)."""
        from ..lab.qemu import _qmp

        unplug_devices(qmp, devs, timeout)
        objects = {o.get("name") for o in _qmp.command(qmp, "qom-list", path="/objects")}
        for obj in objs & objects:
            with contextlib.suppress(_qmp.QmpError):
                _qmp.command(qmp, "object-del", id=obj)

    def ours(self, qmp: Path) -> tuple[set[str], dict[str, str]]:
        """The pair-pool devices plugged into a VM and its pair-pool memory backends with
        their files (``mem-path``), by our id prefixes, whichever agent plugged them."""
        from ..lab.qemu import _qmp

        devs = {d for d in ivshmem_qdev_ids(qmp) if d.startswith(DEVICE_PREFIX)}
        objs = {}
        for o in _qmp.command(qmp, "qom-list", path="/objects"):
            name = str(o.get("name", ""))
            if name.startswith(OBJECT_PREFIX):
                try:
                    path = _qmp.command(
                        qmp, "qom-get", path=f"/objects/{name}", property="mem-path"
                    )
                except _qmp.QmpError:
                    path = ""  # deleted meanwhile
                objs[name] = str(path or "")
        return devs, objs


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


def _busy(path: Path, tag: str) -> bool:
    """Whether the old pool in ``path`` (its id starting with ``tag``) has a slot a guest
    still has mapped; a file that is gone or holds another pool cannot say: not busy."""
    try:
        pool = Pool(path)
    except (OSError, PoolError):
        return False
    with pool:
        try:
            if pool.identity()[0].hex()[: len(tag)] != tag:
                return False
            return bool(pool.slots_in_use(pool.layout()))
        except (OSError, PoolError, ValueError):
            return False


@dataclass(eq=False)
class _Leftovers:
    """Pair-pool devices and backends (with their files) an earlier agent left in a VM."""

    guest: str
    devs: set[str]
    objs: dict[str, str]


@dataclass(eq=False)
class PairPool:
    """One pool of a pair: its file, layout, slots, and whom it is plugged into."""

    members: tuple[str, str]  # sorted guest names
    index: int  # 1, 2, ...: the pair's first, second, ... pool (its file name says which)
    path: Path
    pool: Pool
    layout: PoolLayout
    table: SlotTable
    pool_id: bytes
    plugged: set[str] = field(default_factory=set)
    idle_since: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    gone: bool = False  # unplugged and removed: a new pool is made for the next connection
    left: bool = False  # left plugged by a stopping gateway: its successor adopts it

    @property
    def tag(self) -> str:
        """What makes its QOM ids unique: the first 8 hex digits of its random id."""
        return self.pool_id.hex()[:8]

    def other(self, guest: str) -> str:
        """The member that is not ``guest``."""
        return self.members[1] if guest == self.members[0] else self.members[0]

    def ids_in(self, guest: str) -> tuple[str, str]:
        """(memory backend, device) QOM ids of this pool in ``guest``'s QEMU."""
        peer = self.other(guest)
        return object_id(peer, self.tag), device_id(peer, self.tag)


class PairPools:
    """The gateway's per-pair pools (created on demand, reaped when idle).

    ``qmp_of(guest)``: the guest's QMP socket if it runs on this host (None: it left);
    ``status_of(guest)``: "here", "leaving" or "gone"; ``guests()``: the VMs of the host
    now (whose QEMUs :meth:`sweep` clears of a previous agent's devices).
    """

    def __init__(
        self,
        prefix: str,
        size: int,
        capacity: int,
        qmp_of: Callable[[str], Path | None],
        status_of: Callable[[str], str],
        qmp: Qmp | None = None,
        max_pools: int = MAX_POOLS,
        guests: Callable[[], set[str]] | None = None,
    ) -> None:
        if max_pools < 1:
            raise ValueError(f"a pair needs at least one pool, not {max_pools}")
        self.prefix = prefix
        self.size = size
        self.capacity = capacity
        self.max_pools = max_pools
        self._qmp_of = qmp_of
        self._status_of = status_of
        self._guests = guests or (lambda: set())
        self._qmp = qmp or Qmp()
        self._lock = threading.Lock()
        self._pairs: dict[tuple[str, str], list[PairPool]] = {}
        #: VMs whose QEMU was looked at (by QMP socket: a VM that migrated in has a new one).
        self._discovered: set[Path] = set()
        self._sweep_warned: set[Path] = set()
        self._busy_noted: set[tuple[Path, str]] = set()
        #: What an earlier agent left plugged, by VM QMP socket; the files of those pools.
        self._left: dict[Path, _Leftovers] = {}
        self._stale_paths: set[Path] = set()
        self._closing = threading.Event()
        #: Figures for people and tests: hot-plugs done, their last duration, devices of an
        #: earlier agent unplugged.
        self.plugs = 0
        self.last_plug_s = 0.0
        self.swept: list[str] = []
        self._reaper = threading.Thread(target=self._reap_loop, name="cosock-pair-reaper")
        self._reaper.daemon = True
        self._reaper.start()

    def path_of(self, a: str, b: str, index: int = 1) -> Path:
        x, y = sorted((a, b))
        return Path(f"{self.prefix}{x}-{y}{'' if index == 1 else f'.{index}'}.ivshmem")

    #### Finding and making pools

    def acquire(self, a: str, b: str) -> PairPool:
        """A live pool of pair {a, b} with a free slot, plugged into both: the first one that
        has room, else a new one (made and plugged) while the pair has fewer than
        ``max_pools``. Its ``lock`` is held on return (the caller allocates a slot, then
        releases it), so neither the reaper nor another connection takes it in between.

        Raises:
            PlugError: the file could not be made or QEMU refused the hot-plug (nothing of
                the attempt is left: plugged halves unplugged, file removed).
            PoolError: every one of the pair's ``max_pools`` pools is full.
        """
        members: tuple[str, str] = tuple(sorted((a, b)))  # type: ignore[assignment]
        if self._closing.is_set():
            raise PlugError("the gateway is stopping")
        for guest in members:  # before any file is made: an old pool's must not be reused
            self._discover(guest)
        for _ in range(4 * self.max_pools + 4):  # bounded: each round sees a pool come or go
            with self._lock:
                pools = list(self._pairs.get(members, ()))
            for pair in pools:
                pair.lock.acquire()
                if not (pair.gone or pair.left) and pair.table.free_count:
                    return self._plugged(pair)
                pair.lock.release()
            with self._lock:
                if self._closing.is_set():  # close() looks at every pool it lists after this
                    raise PlugError("the gateway is stopping")
                now = [p for p in self._pairs.get(members, ()) if not p.gone]
                if [p for p in now if p not in pools]:
                    continue  # another connection made one meanwhile: look at it
                if len(now) >= self.max_pools:
                    raise PoolError(
                        f"all {self.max_pools} pools of the pair {members[0]}-{members[1]} are"
                        f" full ({sum(p.layout.slot_count for p in now)} channels)"
                    )
                used = {p.index for p in now}
                index = next(
                    i
                    for i in range(1, self.max_pools + len(self._stale_paths) + 1)
                    if i not in used and self.path_of(*members, i) not in self._stale_paths
                )
                pair = self._make(members, index)
                self._pairs[members] = [*now, pair]
                pair.lock.acquire()
            return self._plugged(pair)
        raise PoolError(f"no pool of the pair {members[0]}-{members[1]} settled")

    def _plugged(self, pair: PairPool) -> PairPool:
        """``pair`` (lock held) plugged into both members; on failure removed, lock released."""
        if pair.plugged == set(pair.members):
            return pair
        try:
            self._plug(pair)
        except BaseException:
            self._remove(pair)
            pair.lock.release()
            raise
        return pair

    def _make(self, members: tuple[str, str], index: int) -> PairPool:
        path = self.path_of(*members, index)
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
        table = SlotTable(layout.slot_count)
        return PairPool(members, index, path, pool, layout, table, pool_id)

    def _plug(self, pair: PairPool) -> None:
        t = time.monotonic()
        for guest in pair.members:
            if guest in pair.plugged:
                continue
            qmp = self._qmp_of(guest)
            if qmp is None:
                raise PlugError(f"{guest} has no QMP socket on this host")
            if not qmp.exists():  # its QEMU is gone: do not wait _qmp's 10 s for a new one
                raise PlugError(f"hot-plug into {guest}: its QMP socket {qmp} is gone")
            try:
                self._qmp.plug(qmp, pair.path, self.size, *pair.ids_in(guest))
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
            if qmp is not None and qmp.exists():  # else its QEMU is gone, and the device too
                obj, dev = pair.ids_in(guest)
                try:
                    self._qmp.unplug(qmp, {dev}, {obj})
                except Exception as exc:  # a guest that does not ack: say so, go on
                    log.warning("unplugging %s from %s: %s", pair.path.name, guest, exc)
            pair.plugged.discard(guest)
        pair.gone = True
        pair.pool.close()
        with contextlib.suppress(FileNotFoundError):
            pair.path.unlink()
        with self._lock:
            pools = self._pairs.get(pair.members, [])
            if pair in pools:
                pools.remove(pair)
            if not pools:
                self._pairs.pop(pair.members, None)

    #### Slots

    def _all(self) -> list[PairPool]:
        with self._lock:
            return [p for pools in self._pairs.values() for p in pools]

    def find(self, pool_id: bytes) -> PairPool | None:
        return next((p for p in self._all() if p.pool_id == pool_id), None)

    def of(self, a: str, b: str) -> list[PairPool]:
        """The pair's pools now (first made first)."""
        with self._lock:
            return list(self._pairs.get(tuple(sorted((a, b))), ()))  # type: ignore[arg-type]

    def count_of(self, guest: str) -> int:
        return sum(p.table.count_of(guest) for p in self._all() if guest in p.members)

    def drop_guest(self, guest: str) -> list[tuple[str, int]]:
        """A guest left the host: its slots in every pair are released (the reaper then
        unplugs those pools from the other member)."""
        pairs = [p for p in self._all() if guest in p.members]
        dropped = []
        for p in pairs:
            dropped += [(p.path.name, s) for s in p.table.drop_guest(guest)]
            p.plugged.discard(guest)  # its QEMU is elsewhere now (or gone)
        return dropped

    def note_idle(self, pair: PairPool) -> None:
        if pair.table.held == 0 and pair.idle_since is None:
            pair.idle_since = time.monotonic()

    #### What an earlier agent left

    def _discover(self, guest: str) -> None:
        """Once per QEMU: note the pair-pool devices and backends of ours in ``guest`` that
        this gateway did not make (a crashed agent's), and keep their files' names from
        being reused before :meth:`sweep` could read whether a slot of theirs is in use."""
        qmp = self._qmp_of(guest)
        if qmp is None or qmp in self._discovered:
            return
        try:
            devs, objs = self._qmp.ours(qmp)
        except Exception as exc:  # QEMU not up yet, busy or gone: next time
            if qmp not in self._sweep_warned:  # once: a booting VM fails for seconds
                self._sweep_warned.add(qmp)
                log.info("not yet looked for old pair pools in %s's QEMU: %s", guest, exc)
            return
        with self._lock:
            if qmp in self._discovered:
                return
            mine = {
                x
                for pools in self._pairs.values()
                for p in pools
                if guest in p.members
                for x in p.ids_in(guest)
            }
            left = _Leftovers(guest, devs - mine, {o: f for o, f in objs.items() if o not in mine})
            self._discovered.add(qmp)
            if left.devs or left.objs:
                self._left[qmp] = left
                self._stale_paths |= {Path(f) for f in left.objs.values() if f}
                found = sorted(left.devs | set(left.objs))
                log.info("%s: pair pools left by an earlier agent: %s", guest, found)

    def sweep(self) -> list[str]:
        """Unplug what an earlier agent left in the VMs of this host (found by
        :meth:`_discover`): each of its pools as soon as no slot of it is MAPPED (the
        guests mark their use in the slot itself, ``_ivshmem.mark_use``), so a connection
        still running on it is never pulled from under; then its file is removed. A QEMU
        that does not answer is tried again at the next sweep. Returns ``"guest:id"`` of
        each device and backend removed."""
        for guest in sorted(self._guests()):
            self._discover(guest)
        removed = []
        with self._lock:
            left_now = list(self._left.items())
        for qmp, left in left_now:
            if self._qmp_of(left.guest) != qmp:  # the VM left the host (or is another QEMU):
                with self._lock:  # a migration unplugs all its pools, nothing is ours there
                    self._left.pop(qmp, None)
                continue
            for obj, file in sorted(left.objs.items()):
                tag = obj[len(OBJECT_PREFIX) :]
                dev = DEVICE_PREFIX + tag
                ident = tag.rpartition("-")[2]  # the pool id's first 8 hex digits
                if len(ident) != 8 or not all(c in "0123456789abcdef" for c in ident):
                    ident = ""  # an id without a tag (an agent before tags): any pool
                if file and _busy(Path(file), ident):
                    if (qmp, obj) not in self._busy_noted:
                        self._busy_noted.add((qmp, obj))
                        log.info("%s: %s still has a connection: kept for now", left.guest, obj)
                    continue
                try:
                    self._qmp.unplug(qmp, {dev} & left.devs, {obj})
                except Exception as exc:  # tried again at the next sweep; said once
                    if (qmp, "!" + obj) not in self._busy_noted:
                        self._busy_noted.add((qmp, "!" + obj))
                        log.warning("unplugging %s from %s: %s", obj, left.guest, exc)
                    continue
                removed += [f"{left.guest}:{x}" for x in sorted({dev} & left.devs)]
                removed.append(f"{left.guest}:{obj}")
                left.devs.discard(dev)
                del left.objs[obj]
            lone = {
                d for d in left.devs if OBJECT_PREFIX + d[len(DEVICE_PREFIX) :] not in left.objs
            }
            if lone:  # a device whose backend is not listed: nothing to read, unplug it
                try:
                    self._qmp.unplug(qmp, lone, set())
                    removed += [f"{left.guest}:{d}" for d in sorted(lone)]
                    left.devs -= lone
                except Exception as exc:
                    log.warning("unplugging %s from %s: %s", sorted(lone), left.guest, exc)
            with self._lock:
                if not left.devs and not left.objs:
                    self._left.pop(qmp, None)
        if removed:
            self._drop_stale_files()
            for x in removed:
                log.info("removed %s: left by an earlier agent", x)
        self.swept += removed
        return removed

    def _drop_stale_files(self) -> None:
        """Remove the files of old pools that no VM maps any more."""
        with self._lock:
            still = {Path(f) for left in self._left.values() for f in left.objs.values() if f}
            done = {p for p in self._stale_paths - still if str(p).startswith(self.prefix)}
            self._stale_paths -= done
        for path in done:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    #### The reaper

    def _reap_loop(self) -> None:
        while not self._closing.wait(REAP_EVERY_S):
            try:
                self.sweep()
                self.reap()
            except Exception:  # never let the reaper die: log and go on
                log.exception("pair pool reaper")

    def reap(self, now: float | None = None) -> list[str]:
        """Unplug and remove idle pools: no slot held for LINGER_S, or at once when one of
        the pair is leaving or gone. Each of a pair's pools goes on its own. Returns the
        files removed."""
        now = time.monotonic() if now is None else now
        removed = []
        for pair in self._all():
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
                if pair.table.held or pair.gone or pair.left:  # (a reaper close() outwaited)
                    continue
                self._remove(pair)
                removed.append(pair.path.name)
                log.info("pair pool %s unplugged and removed", pair.path.name)
            finally:
                pair.lock.release()
        return removed

    def close(self) -> list[str]:
        """The agent is going away (SIGTERM): stop the reaper and new pools; unplug and remove
        each pool no connection uses, and leave each one in use plugged, with its file, for
        the next agent (:meth:`sweep` unplugs it once released). Pulling a pool from under
        connections that run on it would break them, which a crash does not. Returns the
        files left."""
        self._closing.set()
        if self._reaper is not threading.current_thread():
            self._reaper.join(5.0)
        left = []
        for pair in self._all():
            with pair.lock:
                if pair.gone or pair.left:
                    continue
                used = self._in_use(pair)
                if used and not self._away(pair):
                    pair.left = True
                    pair.pool.close()  # ours only: the VMs keep their mappings
                    left.append(pair.path.name)
                    log.info(
                        "pair pool %s left plugged: %d slot(s) in use; a new agent unplugs it"
                        " once released",
                        pair.path.name,
                        used,
                    )
                    continue
                self._remove(pair)
                log.info("pair pool %s unplugged and removed", pair.path.name)
        return left

    @staticmethod
    def _in_use(pair: PairPool) -> int:
        """Slots of ``pair`` granted in its table or marked mapped by an end in its file
        (a process may have mapped a slot its gateway connection no longer holds)."""
        try:
            marked = set(pair.pool.slots_in_use(pair.layout))
        except (OSError, PoolError, ValueError) as exc:  # unreadable: trust the table
            log.warning("reading the use marks of %s: %s", pair.path.name, exc)
            marked = set()
        return len(marked | set(pair.table.held_slots()))

    def _away(self, pair: PairPool) -> bool:
        """Whether a member of ``pair`` left the host or its QEMU is gone: no connection of
        the pair can still run on the pool (``cosock lab down`` stops the QEMUs first)."""
        for guest in pair.members:
            qmp = self._qmp_of(guest)
            if self._status_of(guest) == "gone" or qmp is None or not qmp.exists():
                return True
        return False


__all__ = [
    "DEVICE_PREFIX",
    "ENV_PAIR_MAX_POOLS",
    "LINGER_S",
    "MAX_POOLS",
    "MAX_POOLS_LIMIT",
    "OBJECT_PREFIX",
    "PairPool",
    "PairPools",
    "PlugError",
    "Qmp",
    "device_id",
    "ivshmem_qdev_ids",
    "object_id",
    "unplug_devices",
]
