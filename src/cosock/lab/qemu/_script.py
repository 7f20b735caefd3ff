"""The per-guest boot script (delivered by fw_cfg): network, host root, command server.

It runs under busybox ``sh`` from the initramfs. It gives eth0 the guest's lab address, mounts the
host's root read-only over 9p (``cache=loose``: Python starts in ~0.2 s instead of ~2 s), mounts
fresh proc/sys/dev/tmp/run inside it, and chroots into it to run :mod:`._guestd` with the same
interpreter and package as the host, so a guest runs exactly the code under test.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

from ._model import GUESTD_PORT, HOSTROOT_TAG, MARK_FAIL, MARK_READY

ROOT = "/mnt/host"


def render(
    *,
    guest: str,
    address: str,
    prefixlen: int,
    python: str,
    package_root: str,
    token: str,
    env: Mapping[str, str] | None = None,
    port: int = GUESTD_PORT,
    root_image: bool = False,
) -> str:
    """The script for one guest; every value is shell-quoted.

    The command server runs as a script with ``-I`` (not ``-m cosock...``): importing the
    ``cosock`` package would pull pyroute2 and the whole library over 9p under TCG, tens of
    seconds of boot for nothing.
    """
    q = shlex.quote
    guestd = str(Path(__file__).with_name("_guestd.py"))
    if root_image:  # migratable: a read-only ext4 image on virtio-blk (see _rootfs.py)
        mount_root = f'mount -t ext4 -o ro /dev/vda {ROOT} || fail "mounting the root image"'
    else:
        mount_root = (
            "mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144"
            f' {HOSTROOT_TAG} {ROOT} || fail "mounting the host root over 9p"'
        )
    extra = " ".join(f"{q(k)}={q(v)}" for k, v in sorted((env or {}).items()))
    return f"""
fail() {{ echo "{MARK_FAIL} $*"; poweroff -f; }}
ip link set lo up || fail "lo up"
ip link set eth0 up || fail "eth0 up (no virtio-net NIC?)"
ip addr add {q(address)}/{prefixlen} dev eth0 || fail "address {address}"
mkdir -p {ROOT}
{mount_root}
mount -t proc proc {ROOT}/proc || fail "proc"
mount -t sysfs sysfs {ROOT}/sys || fail "sysfs"
mount -t devtmpfs devtmpfs {ROOT}/dev || fail "devtmpfs"
mkdir -p {ROOT}/dev/shm {ROOT}/dev/pts
mount -t tmpfs -o mode=1777 tmpfs {ROOT}/dev/shm || fail "dev/shm"
mount -t tmpfs -o mode=1777 tmpfs {ROOT}/tmp || fail "tmp"
mount -t tmpfs tmpfs {ROOT}/run || fail "run"
hostname {q(guest)}
chroot {ROOT} /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
  HOME=/root PYTHONDONTWRITEBYTECODE=1 PYTHONPATH={q(package_root)} \\
  COSOCK_GUEST={q(guest)} COSOCK_VM=1 {extra} \\
  {q(python)} -I {q(guestd)} --port {port} --token {q(token)} \\
  --ready {MARK_READY} < /dev/null > /dev/console 2>&1
fail "command server exited with status $?"
"""
