"""Which accelerator the guests run on: KVM where it really works, TCG everywhere else.

``/dev/kvm`` existing proves little: on nested or software-virtualised hosts it can be a module
that cannot boot a stock kernel (see shared/notes/qemu-guests.md). So KVM is chosen only when the
CPU advertises vmx/svm, ``/dev/kvm`` is writable, and a short probe boot with KVM reaches the
initramfs's /init. ``COSOCK_VM_ACCEL=tcg|kvm`` forces a choice.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ._model import MARK_INIT, VmError

PROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str


def _cpu_has_virt() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    words = set(flags.split())
    return "vmx" in words or "svm" in words


def probe_kvm(qemu: str, kernel: Path, initramfs: Path, timeout: float = PROBE_TIMEOUT) -> bool:
    """Boot the guest kernel with KVM until /init prints its mark (no devices, no script)."""
    with tempfile.TemporaryDirectory(prefix="cosock-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial"
        argv = [
            qemu, "-nodefaults", "-no-user-config", "-accel", "kvm", "-cpu", "host",
            "-m", "128", "-display", "none", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initramfs),
            "-append", "console=ttyS0 panic=-1 quiet", "-serial", f"file:{serial}",
        ]  # fmt: skip
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:
            return MARK_INIT in serial.read_text(errors="replace")
        except OSError:
            return False


def choose(qemu: str, kernel: Path, initramfs: Path) -> Accel:
    forced = os.environ.get("COSOCK_VM_ACCEL", "").strip().lower()
    if forced in ("tcg", "kvm"):
        return Accel(forced, "forced by COSOCK_VM_ACCEL")
    if forced:
        raise VmError(f"COSOCK_VM_ACCEL={forced!r}: must be tcg or kvm")
    if not _cpu_has_virt():
        return Accel("tcg", "no vmx/svm in /proc/cpuinfo")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel("tcg", "/dev/kvm missing or not writable")
    if not probe_kvm(qemu, kernel, initramfs):
        return Accel("tcg", "a probe boot with KVM did not reach /init")
    return Accel("kvm", "vmx/svm present and a KVM probe boot reached /init")
