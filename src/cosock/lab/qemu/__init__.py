"""The lab's QEMU backend: guests that are real virtual machines.

Hosts are the namespace lab's (namespace + bridge + agent); each guest is a QEMU process in its
host's namespace with virtio-net on the bridge and the host's ivshmem pool. ``_lab.py`` has the
layout; ``docs/vm-backend.md`` the design of shared memory between VMs.
"""

from __future__ import annotations

from ._accel import Accel
from ._lab import BACKEND, QemuLab, VmGuest
from ._model import (
    BOOT_TIMEOUT,
    MAX_VM_GUESTS,
    BootError,
    GuestCommandError,
    InitramfsError,
    KernelError,
    MissingPackages,
    VmError,
)

__all__ = [
    "BACKEND",
    "BOOT_TIMEOUT",
    "MAX_VM_GUESTS",
    "Accel",
    "BootError",
    "GuestCommandError",
    "InitramfsError",
    "KernelError",
    "MissingPackages",
    "QemuLab",
    "VmError",
    "VmGuest",
]
