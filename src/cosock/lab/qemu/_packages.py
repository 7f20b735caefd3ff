"""The system packages the QEMU backend runs on, checked once with one clear message."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
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


#: The oldest QEMU seen to live-migrate a TCG guest that moves traffic without corrupting its
#: memory. Debian 12's 7.2 crashed the moved guest's kernel (list_del corruption, bad page
#: state) in 3 of 4 runs of six moves under a TCP stream, with or without cosock; 10.0 (Debian
#: 12 backports, Debian 13) in none of 4 (docs/vm-backend.md, section 6).
MIGRATION_UNDER_LOAD = (10, 0)
#: What to install where the packaged QEMU is older (the command for Debian 12).
NEWER_QEMU_HINT = (
    "install QEMU >= 10 (Debian 12: add `deb http://deb.debian.org/debian bookworm-backports"
    " main` to the apt sources, then `apt-get install -t bookworm-backports qemu-system-x86`)"
)


@functools.cache
def qemu_version(binary: str) -> tuple[int, int, int]:
    """``qemu-system-x86_64 --version`` as numbers; (0, 0, 0) when it says something else."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0, 0)
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    return (int(m[1]), int(m[2]), int(m[3] or 0)) if m else (0, 0, 0)


def migration_warning(version: tuple[int, ...], accel: str) -> str | None:
    """Why a live migration of a busy guest may crash it here, or None."""
    if accel != "tcg" or version >= MIGRATION_UNDER_LOAD:
        return None
    shown = ".".join(map(str, version))
    return (
        f"QEMU {shown} under TCG can corrupt the memory of a guest live-migrated while it moves"
        f" traffic (its kernel crashes after the move): {NEWER_QEMU_HINT}"
    )


def qemu_binary() -> str:
    found = shutil.which("qemu-system-x86_64")
    if found is None:
        check()
        raise MissingPackages("qemu-system-x86_64 not found")  # pragma: no cover
    return found
