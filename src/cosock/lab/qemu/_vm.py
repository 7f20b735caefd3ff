"""One guest VM: its QEMU command line, its process inside the host namespace, its boot wait.

QEMU itself creates the guest's tap (``ifname=t<guest>``) inside the host namespace it runs in;
the host side then plugs that tap into ``br0``. The tap dies with QEMU, so nothing outlives a
killed guest but its files. Serial output goes to a file, and the boot is followed by marker
lines the guest prints on it (see :mod:`._script`).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import _netns
from ._model import (
    FW_CFG_GATEWAY,
    FW_CFG_GATEWAY_SIZE,
    FW_CFG_NAME,
    FW_CFG_TOKEN,
    GUEST_MEM_MB,
    HOSTROOT_TAG,
    MARK_FAIL,
    MARK_INIT,
    MARK_READY,
    POOL_MB,
    BootError,
)

#: The guest RAM's memory backend (on the command line before the pool's: see argv()).
RAM_OBJECT = "ram"
#: QOM ids of the ivshmem pool's memory backend and device (for QMP hot-(un)plug).
POOL_OBJECT = "pool"
POOL_DEVICE = "pool0"

#: QEMU processes started by this process, so ``down`` can reap them (no zombies in tests).
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class VmSpec:
    """Everything that makes one guest's command line (and nothing that varies per boot)."""

    name: str
    accel: str
    kernel: Path
    initramfs: Path
    script: Path
    agent_token: Path
    tap: str
    mac: str
    pool: Path | None  # None: no ivshmem device (a migration target; it is hot-plugged later)
    qmp: Path
    serial: Path
    root_image: Path | None = None  # None: the host root over 9p (not migratable)
    gateway: str | None = None  # ADDR:PORT of this QEMU's host's VM gateway (fw_cfg)
    mem_mb: int = GUEST_MEM_MB
    pool_mb: int = POOL_MB

    def argv(self, qemu: str, incoming: str | None = None) -> list[str]:
        """The full command line; ``incoming`` (e.g. ``unix:/path``) makes a migration target
        with the very same devices, as QEMU requires."""
        argv = [
            qemu,
            "-name",
            self.name,
            "-nodefaults",
            "-no-user-config",
            # Guest RAM is a backend of its own, made before the pool's: QEMU 10 creates
            # -object memory backends before the machine's RAM, so the pool would get RAM
            # offset 0, and a migration after it is unplugged aborts the source QEMU ("Bad ram
            # offset 0"; docs/vm-backend.md, section 5).
            "-object",
            f"memory-backend-ram,id={RAM_OBJECT},size={self.mem_mb}M",
            "-machine",
            f"pc,memory-backend={RAM_OBJECT}",
            "-accel",
            self.accel,
            "-m",
            str(self.mem_mb),
            "-smp",
            "1",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(self.kernel),
            "-initrd",
            str(self.initramfs),
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=3",
            "-serial",
            f"file:{self.serial}",
            "-qmp",
            f"unix:{self.qmp},server=on,wait=off",
            "-fw_cfg",
            f"name={FW_CFG_NAME},file={self.script}",
            # The guest's proof of identity towards its host agent (docs/vm-backend.md, 3).
            "-fw_cfg",
            f"name={FW_CFG_TOKEN},file={self.agent_token}",
            "-netdev",
            f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=n0,mac={self.mac}",
        ]
        if self.gateway is not None:
            if len(self.gateway) > FW_CFG_GATEWAY_SIZE or "," in self.gateway:
                raise ValueError(f"VM gateway {self.gateway!r}: not ADDR:PORT of a lab host")
            argv += [
                "-fw_cfg",
                f"name={FW_CFG_GATEWAY},string={self.gateway.ljust(FW_CFG_GATEWAY_SIZE)}",
            ]
        if self.root_image is None:
            argv += [
                "-virtfs",
                f"local,path=/,mount_tag={HOSTROOT_TAG},security_model=none,readonly=on,"
                "multidevs=remap",
            ]
        else:
            argv += [
                "-drive",
                f"file={self.root_image},if=none,id=root,format=raw,readonly=on",
                "-device",
                "virtio-blk-pci,drive=root",
            ]
        if self.pool is not None:
            argv += [
                "-object",
                f"memory-backend-file,id={POOL_OBJECT},share=on,mem-path={self.pool},"
                f"size={self.pool_mb}M",
                # master=on: this QEMU owns the region's migration state (peer mode blocks
                # migration); the lab unplugs the device before migrating anyway.
                "-device",
                f"ivshmem-plain,id={POOL_DEVICE},memdev={POOL_OBJECT},master=on",
            ]
        if incoming:
            argv += ["-incoming", incoming]
        return argv


def start(
    spec: VmSpec, qemu: str, netns: str, log: Path, incoming: str | None = None
) -> subprocess.Popen[bytes]:
    """Start QEMU inside ``netns``; stdout/stderr to ``log``; no waiting. ``incoming``: a
    migration target listening there (``unix:/path``)."""
    for stale in (spec.qmp, spec.serial):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    with _netns.open_netns(netns) as fd, open(log, "ab") as out:
        proc = subprocess.Popen(
            spec.argv(qemu, incoming),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
            preexec_fn=_netns.setns_preexec(fd),
            start_new_session=True,
        )
    _children[proc.pid] = proc
    return proc


def tail(path: Path, lines: int = 3) -> str:
    """The last ``lines`` of a log; for a guest kernel that crashed, its oops instead (from
    the first BUG/Oops/RIP line, which the last lines of a panic never show)."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    if any("Kernel panic" in line for line in text[-lines:]):
        first = next((i for i, ln in enumerate(text) if _OOPS.search(ln)), None)
        if first is not None:
            return " | ".join(line.strip() for line in text[first : first + 40])
    return " | ".join(line.strip() for line in text[-lines:])


_OOPS = re.compile(r"BUG:|Oops|general protection|RIP:|Call Trace")


def serial_marks(serial: Path) -> tuple[bool, bool, str | None]:
    """(init reached, ready, first failure line) from the guest's serial output."""
    try:
        text = serial.read_text(errors="replace")
    except OSError:
        return False, False, None
    fail = next((ln.strip() for ln in text.splitlines() if ln.startswith(MARK_FAIL)), None)
    return MARK_INIT in text, MARK_READY in text, fail


def wait_booted(
    procs: Sequence[tuple[VmSpec, subprocess.Popen[bytes], Path]],
    deadline: float,
    since: float | None = None,
) -> dict[str, float]:
    """Wait until every guest printed its ready mark; seconds from ``since`` (monotonic,
    default now) to each one's mark.

    Raises:
        BootError: naming the guest and the step: QEMU exited (with its last log line), the
            guest reported a failure (its mark line), or the deadline passed (how far it got).
    """
    start = time.monotonic() if since is None else since
    pending = list(procs)
    seconds: dict[str, float] = {}
    while pending:
        for item in list(pending):
            spec, proc, log = item
            init, ready, fail = serial_marks(spec.serial)
            if fail:
                raise BootError(f"guest {spec.name} failed to boot: {fail}")
            if ready:
                seconds[spec.name] = time.monotonic() - start
                pending.remove(item)
                continue
            if proc.poll() is not None:
                raise BootError(
                    f"guest {spec.name}: QEMU exited with status {proc.returncode} while booting"
                    f" ({tail(log) or tail(spec.serial) or 'no output'})"
                )
        if pending and time.monotonic() > deadline:
            spec = pending[0][0]
            init, _, _ = serial_marks(spec.serial)
            where = "its command server never came up" if init else "it never reached /init"
            raise BootError(
                f"guest {spec.name} did not boot within the timeout: {where}"
                f" (serial: {tail(spec.serial) or 'empty'})"
            )
        if pending:
            time.sleep(0.1)
    return seconds


def is_qemu(pid: int) -> bool:
    return "qemu-system" in _netns.cmdline(pid)


def stop(pids: Sequence[int], grace: float = 3.0) -> None:
    """SIGTERM (QEMU exits at once, removing its tap) then SIGKILL; reap our own children."""
    _netns.terminate([pid for pid in pids if pid > 0 and is_qemu(pid)], grace=grace)
    reap(pids)


def reap(pids: Sequence[int] | None = None) -> None:
    for pid in list(_children) if pids is None else pids:
        proc = _children.get(pid)
        if proc is None:
            continue
        if pids is None and proc.poll() is None:
            continue
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        del _children[pid]
