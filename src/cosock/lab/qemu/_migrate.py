"""Real QEMU live migration of a lab VM to another host of the lab.

Steps (each failure names its step; the guest keeps running on its source if anything before
the switch-over fails):

0. switch the guest's cosock connections to TCP: mark it ``leaving`` in its host's VM-gateway
   file; the residency watches in the guest and in its neighbours then judge every connection
   between them not co-resident, switch it to TCP at its exact offset and give its slot back;
   wait until the gateway says the guest holds no slot (its rings are never touched again,
   so the pool can go);
1. unplug the ivshmem pool from the running guest (QMP ``device_del`` → ACPI eject, which the
   guest acks at once since no driver holds the device; then ``object-del``). Why: with the
   pool attached, QEMU would migrate the *source* pool's contents into the destination host's
   pool file, overwriting the channels of every VM there (docs/vm-backend.md, section 5);
2. start the target QEMU in the destination host's namespace with the same devices (no pool)
   and ``-incoming unix:...``, and plug its tap into that host's bridge;
3. ``migrate`` over QMP and poll ``query-migrate`` until ``completed`` (or fail);
4. stop the source QEMU, hot-plug the destination host's pool (``object-add`` +
   ``device_add``), and rewrite the state and both hosts' VM-gateway files.

The guest's address, MAC, processes and TCP connections carry on; QEMU announces the guest's
MAC after the switch, so the bridges relearn where it is.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from .. import _netns, _state
from .._model import BRIDGE, MigrationError, UnknownGuest, UnknownHost
from . import _qmp, _vm
from ._model import BootError

UNPLUG_TIMEOUT = 30.0
MIGRATE_TIMEOUT = 180.0
SWITCH_TIMEOUT = 60.0
IVSHMEM_DEVICE_ID = 0x1110


def _pool_present(qmp: Path) -> bool:
    for bus in _qmp.command(qmp, "query-pci"):
        for dev in bus.get("devices", []):
            if dev.get("id", {}).get("device") == IVSHMEM_DEVICE_ID:
                return True
    return False


def unplug_pool(qmp: Path, timeout: float = UNPLUG_TIMEOUT) -> None:
    """Hot-unplug the ivshmem device and drop its memory backend (each a no-op if absent)."""
    if _pool_present(qmp):
        _qmp.command(qmp, "device_del", id=_vm.POOL_DEVICE)
    deadline = time.monotonic() + timeout
    while _pool_present(qmp):
        if time.monotonic() > deadline:
            raise MigrationError(
                "migration step 'unplug the ivshmem pool': the guest did not release the"
                f" device within {timeout:g} s"
            )
        time.sleep(0.1)
    objects = {o.get("name") for o in _qmp.command(qmp, "qom-list", path="/objects")}
    if _vm.POOL_OBJECT in objects:
        _qmp.command(qmp, "object-del", id=_vm.POOL_OBJECT)


def unplug_pair_pools(qmp: Path, timeout: float = UNPLUG_TIMEOUT) -> None:
    """Per-pair pools: hot-unplug every ivshmem device of the guest and drop their memory
    backends (the gateway may be doing the same: its pairs with a leaving VM and no slot are
    removed at once; either way they are gone after this)."""
    from ...agent import _pairpool

    try:
        _pairpool.unplug_devices(qmp, _pairpool.ivshmem_qdev_ids(qmp), timeout)
    except _pairpool.PlugError as exc:
        raise MigrationError(f"migration step 'unplug the pair pools': {exc}") from None
    for o in _qmp.command(qmp, "qom-list", path="/objects"):
        name = str(o.get("name", ""))
        if name.startswith(_pairpool.object_id("")):
            try:
                _qmp.command(qmp, "object-del", id=name)
            except _qmp.QmpError:
                pass  # deleted by the gateway meanwhile


def wait_pool_ram_released(qmp: Path, timeout: float = UNPLUG_TIMEOUT) -> None:
    """Wait until QEMU has freed the RAM of every pool unplugged from the guest (see
    ``_qmp.ram_released``: a migration begun before sends blocks the target has not got).

    Raises:
        MigrationError: still held after ``timeout``.
    """
    from ...agent import _pairpool

    def is_pool(backend: str) -> bool:
        return backend == _vm.POOL_OBJECT or backend.startswith(_pairpool.object_id(""))

    if held := _qmp.ram_released(qmp, is_pool, timeout):
        raise MigrationError(
            f"migration step 'unplug the pools': QEMU still holds the RAM of {held}"
            f" after {timeout:g} s"
        )


def plug_pool(qmp: Path, pool: Path, size_mb: int) -> None:
    """Hot-plug a host's pool into a running guest (the guest's PCI hot-plug rescans)."""
    if held := _qmp.ram_released(qmp, lambda b: b == _vm.POOL_OBJECT, UNPLUG_TIMEOUT):
        raise MigrationError(f"hot-plug of the pool: QEMU still holds the RAM of {held}")
    _qmp.command(
        qmp,
        "object-add",
        **{
            "qom-type": "memory-backend-file",
            "id": _vm.POOL_OBJECT,
            "mem-path": str(pool),
            "size": size_mb << 20,
            "share": True,
        },
    )
    _qmp.command(
        qmp,
        "device_add",
        driver="ivshmem-plain",
        id=_vm.POOL_DEVICE,
        memdev=_vm.POOL_OBJECT,
        master="on",
    )


def _plug_tap(netns: str, tap: str, proc: Any, log: Path, deadline: float) -> None:
    with _netns.Netlinks() as nl:
        ipr = nl(netns)
        while not ipr.link_lookup(ifname=tap):
            if proc.poll() is not None:
                raise MigrationError(
                    f"migration step 'start the target QEMU': it exited with status"
                    f" {proc.returncode} ({_vm.tail(log) or 'no output'})"
                )
            if time.monotonic() > deadline:
                raise MigrationError(f"migration step 'start the target QEMU': no tap {tap}")
            time.sleep(0.02)
        index = ipr.link_lookup(ifname=tap)[0]
        ipr.link("set", index=index, master=ipr.link_lookup(ifname=BRIDGE)[0], state="up")


def _target_said(proc: Any, log: Path) -> str:
    """How the target QEMU ended (or that it still runs) and its last log lines: a failed
    migration is usually the target's doing, and the source only sees a broken pipe."""
    try:
        code = proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        state = "the target QEMU still runs"
    else:
        state = (
            f"the target QEMU was killed by signal {-code}"
            if code < 0
            else f"the target QEMU exited with status {code}"
        )
    return f"{state} ({_vm.tail(log) or 'no output'})"


def _wait_migrated(src_qmp: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = _qmp.command(src_qmp, "query-migrate")
        status = info.get("status")
        if status == "completed":
            return dict(info)
        if status in ("failed", "cancelled"):
            raise MigrationError(
                f"migration step 'migrate': QEMU says {status}: {info.get('error-desc', '')}"
            )
        if time.monotonic() > deadline:
            _qmp.command(src_qmp, "migrate_cancel")
            raise MigrationError(f"migration step 'migrate': not done within {timeout:g} s")
        time.sleep(0.05)


def write_vm_guests(state: _state.State, leaving: frozenset[str] = frozenset()) -> None:
    """Each host's VM-gateway file lists the VMs that run on it now (0600); those about to
    migrate are marked ``leaving`` (the gateway then shows them no neighbours). The lab's other
    VMs are listed as ``moved`` with their host's gateway: a VM that migrated away asks its old
    gateway (or the one it booted with) and is sent on to its new one."""
    from ...agent._vmgate import PORT
    from ._lab import _write_private

    hosts = {h["name"]: h for h in state["hosts"]}
    tokens = {g["name"]: Path(g["agent_token_file"]).read_text() for g in state["guests"]}
    for h in state["hosts"]:
        vms: dict[str, dict[str, Any]] = {}
        moved: dict[str, dict[str, Any]] = {}
        for g in state["guests"]:
            if g["host"] == h["name"]:
                vms[g["name"]] = {
                    "token": tokens[g["name"]],
                    "address": g["addresses"][0],
                    "qmp": g["qmp"],  # per-pair pools are hot-plugged through it
                }
            else:
                gateway = f"{hosts[g['host']]['address']}:{PORT}"
                moved[g["name"]] = {"token": tokens[g["name"]], "gateway": gateway}
        for name in leaving & vms.keys():
            vms[name]["leaving"] = True
        doc = {"guests": vms, "moved": moved}
        _write_private(Path(h["vm_guests"]), json.dumps(doc, indent=2))


def _slots_held(state: _state.State, g: dict[str, Any]) -> int:
    """How many pool slots the guest's connections hold, asked of its host's gateway as the
    guest (the lab wrote its token)."""
    from ...agent._vmgate import PORT
    from ._exec import socket_in

    host = next(h for h in state["hosts"] if h["name"] == g["host"])
    sock = socket_in(_netns.netns_path(host["netns"]))
    sock.settimeout(10)
    with sock:
        sock.connect((host["address"], PORT))
        f = sock.makefile("rwb")
        token = Path(g["agent_token_file"]).read_text().strip()
        for req in ({"op": "hello", "token": token}, {"op": "grants"}):
            f.write(json.dumps(req).encode() + b"\n")
        f.flush()
        replies = [json.loads(f.readline(1 << 16) or b"{}") for _ in range(2)]
        f.close()
    if not all(r.get("ok") for r in replies):
        raise MigrationError(f"the VM gateway of {host['name']} refused: {replies}")
    return int(replies[1]["grants"])


def switch_to_tcp(state: _state.State, g: dict[str, Any], timeout: float) -> None:
    """Step 0: the guest's cosock connections leave the pool (see the module docstring).

    Raises:
        MigrationError: slots still held after ``timeout`` (the leaving mark is undone).
    """
    write_vm_guests(state, leaving=frozenset({g["name"]}))
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                held = _slots_held(state, g)
            except OSError as exc:
                raise MigrationError(
                    f"migration step 'switch cosock connections to TCP': VM gateway: {exc}"
                ) from None
            if held == 0:
                return
            if time.monotonic() > deadline:
                raise MigrationError(
                    "migration step 'switch cosock connections to TCP': the guest's"
                    f" connections still hold {held} slot(s) after {timeout:g} s"
                )
            time.sleep(0.2)
    except BaseException:
        write_vm_guests(state)
        raise


def migrate(state: _state.State, guest: str, to_host: str, qemu: str) -> dict[str, Any]:
    """Live-migrate ``guest`` to ``to_host``, updating ``state`` in place; returns figures
    (QEMU's ``total-time`` and ``downtime`` in ms, and the wall time of every step).

    Raises:
        UnknownGuest, UnknownHost, MigrationError (same host; or a step failed: named).
    """
    from ...agent._vmgate import PORT
    from ._lab import _spec, pool_mode

    g = next((r for r in state["guests"] if r["name"] == guest), None)
    if g is None:
        raise UnknownGuest(f"lab {state['name']!r} has no guest {guest!r}")
    dest = next((h for h in state["hosts"] if h["name"] == to_host), None)
    if dest is None:
        raise UnknownHost(f"lab {state['name']!r} has no host {to_host!r}")
    if g["host"] == to_host:
        raise MigrationError(f"guest {guest} already runs on {to_host}")
    src_qmp = Path(g["qmp"])
    if not _vm.is_qemu(int(g.get("pid") or 0)):
        raise MigrationError(f"guest {guest}: its QEMU is not running")
    steps: dict[str, float] = {}
    t = time.monotonic()
    switch_to_tcp(state, g, SWITCH_TIMEOUT)
    steps["switch_s"] = time.monotonic() - t
    t = time.monotonic()
    shared = pool_mode(state) == "shared"
    try:
        if shared:
            unplug_pool(src_qmp)
        else:  # new pair pools are plugged on the destination by its gateway, on demand
            unplug_pair_pools(src_qmp)
        wait_pool_ram_released(src_qmp)
    except BaseException:
        write_vm_guests(state)  # it stays: no longer leaving
        raise
    steps["unplug_s"] = time.monotonic() - t

    n = int(g.get("migrations", 0)) + 1
    gdir = Path(g["dir"])
    target = dataclasses.replace(
        _spec(state, g),
        pool=None,
        gateway=f"{dest['address']}:{PORT}",  # what the guest reads once it runs there
        qmp=gdir / f"qmp-{n}.sock",
        serial=gdir / f"serial-{n}.log",
    )
    log = gdir / f"qemu-{n}.log"
    uri = f"unix:{gdir / f'migrate-{n}.sock'}"
    t = time.monotonic()
    proc = _vm.start(target, qemu, dest["netns"], log, incoming=uri)
    try:
        _plug_tap(dest["netns"], target.tap, proc, log, time.monotonic() + 30)
        if _qmp.status(target.qmp) != "inmigrate":
            raise MigrationError("migration step 'start the target QEMU': not waiting for us")
        steps["target_s"] = time.monotonic() - t
        t = time.monotonic()
        try:
            _qmp.command(src_qmp, "migrate", uri=uri)
        except _qmp.QmpError as exc:
            raise MigrationError(f"migration step 'migrate': {exc}") from None
        try:
            info = _wait_migrated(src_qmp, MIGRATE_TIMEOUT)
        except MigrationError as exc:
            raise MigrationError(f"{exc}; {_target_said(proc, log)}") from None
        except _qmp.QmpError as exc:  # the source QEMU died mid-migration: say what it said
            raise MigrationError(
                f"migration step 'migrate': the source QEMU stopped answering ({exc});"
                f" its log: {_vm.tail(Path(g['log'])) or 'no output'};"
                f" {_target_said(proc, log)}"
            ) from None
        steps["migrate_s"] = time.monotonic() - t
    except BaseException:
        _vm.stop([proc.pid])
        # Give the source its pool back: it still runs where it was.
        try:
            if _qmp.status(src_qmp) != "running":
                _qmp.command(src_qmp, "cont")
            host = next(h for h in state["hosts"] if h["name"] == g["host"])
            if shared:
                plug_pool(src_qmp, Path(host["pool"]), int(state["pool_mb"]))
        except (MigrationError, BootError, _qmp.QmpError):
            pass
        write_vm_guests(state)  # it stays: no longer leaving
        raise
    t = time.monotonic()
    old_pid = int(g["pid"])
    _qmp.quit_(src_qmp)
    _vm.stop([old_pid])
    if shared:
        plug_pool(target.qmp, Path(dest["pool"]), int(state["pool_mb"]))
    steps["replug_s"] = time.monotonic() - t
    g.update(
        host=to_host,
        netns=dest["netns"],
        pid=proc.pid,
        qmp=str(target.qmp),
        serial=str(target.serial),
        log=str(log),
        migrations=n,
    )
    write_vm_guests(state)
    return {
        "total_time_ms": info.get("total-time"),
        "downtime_ms": info.get("downtime"),
        "ram_transferred": info.get("ram", {}).get("transferred"),
        **{k: round(v, 3) for k, v in steps.items()},
    }
