"""The guest's initramfs: busybox, the kernel's virtio/9p/fw_cfg modules and a fixed ``/init``.

Built once per kernel (and per content of ``/init``) and cached: everything that differs between
guests (address, name, what to run) comes from a per-guest script passed through fw_cfg, so no
guest ever needs its own image.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ._kernel import Kernel
from ._model import FW_CFG_NAME, MARK_FAIL, MARK_INIT, InitramfsError

BUSYBOX = Path("/bin/busybox")

#: The initramfs's /init. It only loads drivers and hands over to the fw_cfg script; the guest
#: always powers off at the end (``-no-reboot`` turns that into a QEMU exit the host sees).
INIT = f"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do
  insmod /lib/modules/$m || echo "{MARK_FAIL} insmod $m"
done
echo {MARK_INIT}
f=/sys/firmware/qemu_fw_cfg/by_name/{FW_CFG_NAME}/raw
if [ -r $f ]; then
  cat $f > /run.sh
  sh /run.sh
else
  echo "{MARK_FAIL} no fw_cfg script at $f"
fi
echo "{MARK_FAIL} guest script ended"
poweroff -f
"""


def _applets() -> list[str]:
    try:
        out = subprocess.run(
            [str(BUSYBOX), "--list"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise InitramfsError(f"building the initramfs: `busybox --list` failed: {exc}") from None
    # Never an applet named "busybox": its symlink would overwrite the binary (init: -40).
    return [a for a in out.split() if a and a != "busybox" and "/" not in a]


def _key(kernel: Kernel) -> str:
    h = hashlib.sha256()
    h.update(INIT.encode())
    h.update(kernel.package.encode())
    h.update(str(BUSYBOX.stat().st_size).encode())
    for mod in kernel.modules:
        h.update(mod.name.encode())
    return h.hexdigest()[:16]


def build(kernel: Kernel) -> Path:
    """The cached ``initramfs-<key>.cpio`` next to the kernel, built now if absent.

    Raises:
        InitramfsError: busybox or cpio missing, or cpio failed.
    """
    if not BUSYBOX.is_file():
        raise InitramfsError("building the initramfs: /bin/busybox missing (busybox-static)")
    target = kernel.directory / f"initramfs-{_key(kernel)}.cpio"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="initramfs-", dir=kernel.directory) as tmp:
        root = Path(tmp) / "root"
        for sub in ("bin", "proc", "sys", "dev", "mnt", "tmp", "lib/modules"):
            (root / sub).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        for applet in _applets():
            os.symlink("busybox", root / "bin" / applet)
        for mod in kernel.modules:
            shutil.copy2(mod, root / "lib" / "modules" / mod.name)
        (root / "modules.order").write_text("\n".join(m.name for m in kernel.modules) + "\n")
        init = root / "init"
        init.write_text(INIT)
        init.chmod(0o755)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        partial = Path(tmp) / "out.cpio"
        with open(partial, "wb") as out:
            try:
                done = subprocess.run(
                    ["cpio", "--quiet", "-o", "-H", "newc"],
                    cwd=root,
                    input="\n".join(names).encode(),
                    stdout=out,
                    stderr=subprocess.PIPE,
                    timeout=60,
                    check=False,
                )
            except FileNotFoundError:
                raise InitramfsError("building the initramfs: cpio missing (cpio)") from None
        if done.returncode != 0:
            raise InitramfsError(
                f"building the initramfs: cpio failed: {done.stderr.decode(errors='replace')}"
            )
        os.replace(partial, target)
    return target
