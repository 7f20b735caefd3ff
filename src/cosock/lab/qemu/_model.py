"""Names, paths, limits and errors of the QEMU backend: pure data, no IO.

The QEMU lab reuses the namespace lab's hosts (a namespace with bridge ``br0`` and an agent) and
its addresses; only the guests differ: a guest is a QEMU process inside its host's namespace whose
virtio-net NIC is a tap on that bridge.
"""

from __future__ import annotations

import os
from pathlib import Path

from .._model import LabError, bridge_address

#### Errors


class VmError(LabError):
    """Base of the QEMU backend's errors; the message names the step that failed."""


class MissingPackages(VmError):
    """A system package the backend needs (QEMU, busybox-static, cpio, kmod) is absent."""


class KernelError(VmError):
    """The guest kernel package could not be resolved, downloaded or unpacked."""


class InitramfsError(VmError):
    """The busybox initramfs could not be built (a module or busybox itself missing)."""


class BootError(VmError):
    """A guest did not boot: QEMU died, the guest reported a failure, or a timeout expired."""


class GuestCommandError(VmError):
    """The guest's command server could not be reached or answered garbage."""


#### Limits and names

#: Guests per host in a QEMU lab: each one is a whole VM (TCG: ~1 core while busy).
MAX_VM_GUESTS = 4
#: Guest RAM in MiB: the kernel, busybox and a Python over 9p fit well in this.
GUEST_MEM_MB = 256
#: Size of each host's ivshmem pool (the /dev/shm file every VM of that host maps): a power
#: of two (a PCI BAR), 31 channels of 1 MiB rings.
POOL_MB = 64
#: How a host's VMs share memory: "pair" (default): one pool per pair of VMs that talk,
#: hot-plugged into those two only; "shared": one pool per host that every VM of it maps
#: (fit for one tenant only: any VM can read every channel; docs/security.md).
POOL_MODES = ("pair", "shared")
DEFAULT_POOL_MODE = "pair"
#: TCP port of the guest's command server (``_guestd``), on the guest's lab address.
GUESTD_PORT = 7070
#: Boot budget for all guests of a lab: TCG takes ~10 s per guest to its command server on an
#: idle 2-core machine, 40 s and more when the machine is loaded.
BOOT_TIMEOUT = 180.0
#: Serial-console lines the guest prints to tell the host how far it got.
MARK_INIT = "COSOCK-INIT"
MARK_READY = "COSOCK-READY"
MARK_FAIL = "COSOCK-FAIL"
#: The 9p tag of the host's root file system, shared read-only into every guest.
HOSTROOT_TAG = "hostroot"
#: fw_cfg item that carries the per-guest script (read by the initramfs's /init).
FW_CFG_NAME = "opt/cosock/run"
#: fw_cfg item with the guest's token for the host agent's VM gateway (see _vmagent.py).
FW_CFG_TOKEN = "opt/cosock/token"
#: fw_cfg item naming the VM gateway of the host whose QEMU runs the guest. A migration's
#: target QEMU is started with its own host's, and the guest's reads go to the running QEMU's
#: fw_cfg, so after a move the guest reads its new host's gateway (checked: docs/vm-backend.md
#: section 3). Padded to a fixed size: the guest's sysfs keeps the size it saw at boot.
FW_CFG_GATEWAY = "opt/cosock/gateway"
FW_CFG_GATEWAY_SIZE = 64
SHM_DIR = Path("/dev/shm")


def cache_dir() -> Path:
    """Where kernels and initramfs images are kept between runs (``COSOCK_VM_CACHE``)."""
    return Path(os.environ.get("COSOCK_VM_CACHE") or "/var/cache/cosock/vm")


def pool_path(lab: str, host: str) -> Path:
    """The host's ivshmem pool file: one per host, named so ``down`` finds it by prefix."""
    return SHM_DIR / f"cosock-{lab}-{host}.ivshmem"


def pair_pool_prefix(lab: str, host: str) -> str:
    """Per-pair pools of a host are ``<prefix><A>-<B>.ivshmem`` (``down`` finds them too)."""
    return f"{SHM_DIR}/cosock-{lab}-{host}-"


def pool_glob(lab: str) -> str:
    return f"cosock-{lab}-*.ivshmem"


def tap_ifname(guest: str) -> str:
    """The tap of a guest's virtio-net NIC, in its host's namespace (named after the guest)."""
    return f"t{guest}"


def guest_mac(h: int, g: int) -> str:
    """Locally administered, QEMU's OUI-like prefix, unique per guest in a lab."""
    return f"52:54:00:c5:{h:02x}:{g:02x}"


def gateway(h: int) -> str:
    return bridge_address(h)
