"""The guest kernel: a stock Debian ``linux-image-<abi>-amd64``, fetched and unpacked once.

Why a distribution kernel rather than a custom one: it is signed, maintained and already has
every driver the guest needs as modules (virtio, 9p, fw_cfg). It is fetched with ``apt-get
download`` (no install: nothing lands in the host's /boot or module tree) and unpacked with
``dpkg-deb -x`` into a temporary folder, from which only ``vmlinuz`` and the modules the
initramfs needs are kept in the cache (a few MB instead of ~400).
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._model import KernelError, cache_dir

#: The metapackage whose dependency names the current ABI (a glob would pull every version).
META_PACKAGE = "linux-image-amd64"
#: Modules the guest loads, in dependency order (see shared/notes/qemu-guests.md).
MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "qemu_fw_cfg",
    # The read-only ext4 root image of migratable guests (see _rootfs.py).
    "virtio_blk",
    "crc16",
    "mbcache",
    "jbd2",
    "crc32c_generic",
    "ext4",
)
_PKG_RE = re.compile(r"linux-image-[0-9][0-9A-Za-z.+~-]*-amd64")
_APT_TIMEOUT = 300.0


@dataclass(frozen=True)
class Kernel:
    """A kernel in the cache: the image and the needed modules, in load order."""

    package: str
    vmlinuz: Path
    modules: tuple[Path, ...]

    @property
    def directory(self) -> Path:
        return self.vmlinuz.parent


def _run(argv: Sequence[str], step: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_APT_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise KernelError(f"{step}: {argv[0]} not found (apt/dpkg missing?)") from None
    except subprocess.TimeoutExpired:
        raise KernelError(f"{step}: `{' '.join(argv)}` timed out") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise KernelError(f"{step}: `{' '.join(argv)}` failed: {last}")
    return done.stdout


def resolve_package() -> str:
    """``linux-image-<abi>-amd64`` named by the metapackage's dependency (``apt-get update``
    once if the package lists are empty, as on a fresh machine)."""
    for attempt in range(2):
        try:
            out = _run(["apt-cache", "depends", META_PACKAGE], "resolving the kernel package")
        except KernelError:
            out = ""
        found = _PKG_RE.findall(out)
        if found:
            return str(found[0])
        if attempt == 0:
            _run(["apt-get", "update", "-q"], "updating the package lists")
    raise KernelError(
        f"resolving the kernel package: `apt-cache depends {META_PACKAGE}` names no"
        " linux-image-<abi>-amd64 package"
    )


def validate_package(package: str) -> str:
    if not _PKG_RE.fullmatch(package) or "cloud" in package:
        raise KernelError(
            f"kernel package {package!r}: expected an exact standard-flavour name such as"
            " linux-image-6.1.0-50-amd64 (the cloud flavour has no 9p)"
        )
    return package


@contextlib.contextmanager
def cache_lock(folder: Path | None = None) -> Iterator[Path]:
    """One builder at a time per cache folder (default: the whole cache): pytest workers and
    CLIs share it, and one's pruning must not pull a file from under another."""
    root = folder or cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield root


def _find_module(tree: Path, name: str, builtin: str) -> Path | None:
    """The ``.ko`` of ``name`` (``-`` and ``_`` are one to the kernel), or None if built in."""
    variants = {name, name.replace("_", "-")}
    for variant in variants:
        for found in tree.rglob(f"{variant}.ko"):
            return found
    if any(f"/{v}.ko" in builtin for v in variants):
        return None
    raise KernelError(f"unpacking the kernel: module {name} is neither a .ko nor built in")


def _cached(package: str) -> Kernel | None:
    folder = cache_dir() / package
    order = folder / "modules.order"
    vmlinuz = folder / "vmlinuz"
    wanted = folder / "modules.wanted"
    if not (order.is_file() and vmlinuz.is_file() and wanted.is_file()):
        return None
    if wanted.read_text().split() != list(MODULES):
        return None  # cached by an older list of modules: fetch again
    mods = tuple(folder / "modules" / line for line in order.read_text().split() if line)
    if not all(m.is_file() for m in mods):
        return None
    return Kernel(package, vmlinuz, mods)


def fetch(package: str | None = None) -> Kernel:
    """The kernel ``package`` (default: the current ABI), from the cache or fetched now.

    Raises:
        KernelError: naming the step (resolve, download, unpack) and the command that failed.
    """
    name = validate_package(package) if package else resolve_package()
    hit = _cached(name)
    if hit is not None:
        return hit
    with cache_lock() as root:
        hit = _cached(name)  # another process may have fetched it while we waited
        if hit is not None:
            return hit
        with tempfile.TemporaryDirectory(prefix="kernel-", dir=root) as tmp:
            work = Path(tmp)
            _run(["apt-get", "download", name], f"downloading {name}", cwd=work)
            debs = sorted(work.glob(f"{name}_*.deb"))
            if not debs:
                raise KernelError(f"downloading {name}: apt-get produced no .deb")
            tree = work / "tree"
            _run(["dpkg-deb", "-x", str(debs[0]), str(tree)], f"unpacking {name}")
            images = sorted((tree / "boot").glob("vmlinuz-*"))
            if not images:
                raise KernelError(f"unpacking {name}: no /boot/vmlinuz-* in the package")
            mod_roots = sorted((tree / "lib" / "modules").glob("*"))
            if not mod_roots:
                raise KernelError(f"unpacking {name}: no /lib/modules in the package")
            builtin_file = mod_roots[0] / "modules.builtin"
            builtin = builtin_file.read_text() if builtin_file.is_file() else ""
            staged = work / "staged"
            (staged / "modules").mkdir(parents=True)
            order: list[str] = []
            for mod in MODULES:
                ko = _find_module(mod_roots[0], mod, builtin)
                if ko is None:
                    continue
                shutil.copy2(ko, staged / "modules" / ko.name)
                order.append(ko.name)
            shutil.copy2(images[0], staged / "vmlinuz")
            (staged / "modules.order").write_text("\n".join(order) + "\n")
            (staged / "modules.wanted").write_text("\n".join(MODULES) + "\n")
            final = root / name
            shutil.rmtree(final, ignore_errors=True)
            staged.rename(final)
    hit = _cached(name)
    if hit is None:  # pragma: no cover - we just wrote it
        raise KernelError(f"caching {name}: the cache folder is incomplete")
    return hit
