"""The system packages the QEMU backend runs on, checked once with one clear message."""

from __future__ import annotations

import shutil
from pathlib import Path

from ._model import MissingPackages

#: Debian package -> the file that proves it is installed.
REQUIRED: dict[str, str] = {
    "qemu-system-x86": "qemu-system-x86_64",
    "busybox-static": "/bin/busybox",
    "cpio": "cpio",
    "kmod": "modinfo",
    "e2fsprogs": "mkfs.ext4",  # --root image (migratable guests)
}
#: Tools used to fetch the kernel: part of every Debian system, still checked.
APT_TOOLS: dict[str, str] = {"apt": "apt-get", "dpkg": "dpkg-deb"}


def _present(tool: str) -> bool:
    if tool.startswith("/"):
        return Path(tool).is_file()
    return shutil.which(tool) is not None


def missing() -> list[str]:
    """Debian package names whose tool is absent, in a stable order."""
    wanted = {**REQUIRED, **APT_TOOLS}
    return [pkg for pkg, tool in wanted.items() if not _present(tool)]


def check() -> None:
    """Raise :class:`MissingPackages` naming every absent package and the command to fix it."""
    absent = missing()
    if absent:
        raise MissingPackages(
            f"the QEMU backend needs the packages {', '.join(absent)}: run"
            f" `apt-get install -y --no-install-recommends {' '.join(absent)}`"
        )


def qemu_binary() -> str:
    found = shutil.which("qemu-system-x86_64")
    if found is None:
        check()
        raise MissingPackages("qemu-system-x86_64 not found")  # pragma: no cover
    return found
