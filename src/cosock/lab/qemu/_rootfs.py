"""A read-only ext4 root image for guests that must live-migrate (``--root image``).

QEMU refuses to migrate a guest with a 9p export mounted, and the default guest root is the
host's root over 9p. This image holds just what a guest runs, at the same absolute paths as on
the host: the interpreter (binary, libpython, the stdlib without its tests, lib-dynload and
every shared library they need), the virtualenv's ``pyvenv.cfg`` and ``bin``, the repository's
``src`` and ``tests``, the installed files of :data:`GUEST_DISTRIBUTIONS` and what they require
(the compat suites run those programs in VMs), and busybox with its applets for the shell
tools. It is attached read-only with virtio-blk (the same file on both hosts, so nothing of it
is migrated), built with ``mkfs.ext4 -d`` (no mount, no loop device) and cached by content.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ._initramfs import BUSYBOX, _applets
from ._kernel import cache_lock
from ._model import VmError, cache_dir

#: Parts of the stdlib a guest never imports (a third of its size is ``test``).
_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages"}
#: Extension modules whose libraries (X11, Tcl/Tk, curses...) a guest never needs.
_SKIP_PREFIXES = ("_tkinter", "_curses", "readline", "_dbm", "_gdbm")
_LDD_RE = re.compile(r"(/\S+) \(0x")
#: Third-party programs the compat suites (tests/test_apps.py) run unmodified in guests, if
#: installed: their files and those of every distribution they require (extras left out).
GUEST_DISTRIBUTIONS = ("uvicorn", "httpx", "aiohttp", "requests")
_REQ_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


class RootfsError(VmError):
    """The guest root image could not be built."""


def _package_tree() -> Path:
    return Path(__file__).resolve().parents[4]  # the repository: src/cosock/lab/qemu -> repo


def _sources() -> list[tuple[Path, Path]]:
    """(host path, path in the image) of every tree or file to copy (same absolute path)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    items: list[Path] = [*_link_chain(Path(sys.executable)), stdlib]
    venv = Path(sys.prefix)
    if (venv / "pyvenv.cfg").is_file():
        items += [venv / "pyvenv.cfg", *sorted((venv / "bin").glob("python*"))]
    repo = _package_tree()
    items += [p for p in (repo / "src", repo / "tests") if p.is_dir()]
    return [(p, p) for p in items]


def _distribution_files(names: tuple[str, ...] = GUEST_DISTRIBUTIONS) -> list[Path]:
    """The installed files of the distributions ``names`` and of everything they require
    (without extras; a requirement not installed, e.g. a backport for older Pythons, is left
    out: the host's programs run without it too)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found[key] = dist
        for req in dist.requires or []:
            match = _REQ_NAME_RE.match(req)
            if match and "extra" not in req.partition(";")[2]:
                todo.append(match.group())
    files = []
    for dist in found.values():
        for f in dist.files or []:
            path = Path(os.path.normpath(str(dist.locate_file(f))))
            if path.is_file():
                files.append(path)
    return sorted(set(files))


def _link_chain(path: Path) -> list[Path]:
    """``path``, every symlink it goes through, and the file at the end (a venv's python is
    python -> python3 -> /root/.pyenv/.../python3 -> python3.11)."""
    chain = [path]
    while path.is_symlink() and len(chain) < 40:
        path = Path(os.path.normpath(os.path.join(path.parent, os.readlink(path))))
        chain.append(path)
    return chain


def _walk(path: Path) -> Iterator[Path]:
    if path.is_dir() and not path.is_symlink():
        for entry in sorted(path.iterdir()):
            if entry.name in _SKIP and entry.parent.name.startswith("python"):
                continue
            if entry.name.startswith(_SKIP_PREFIXES) and entry.parent.name == "lib-dynload":
                continue
            yield from _walk(entry)
    else:
        yield path


def _libraries(files: list[Path]) -> set[Path]:
    """Shared libraries (ldd) of every ELF file among ``files``."""
    libs: set[Path] = set()
    for f in files:
        if f.is_symlink() or not f.is_file() or not (os.access(f, os.X_OK) or ".so" in f.name):
            continue
        with open(f, "rb") as fh:
            if fh.read(4) != b"\x7fELF":
                continue
        out = subprocess.run(["ldd", str(f)], capture_output=True, text=True, check=False).stdout
        libs.update(Path(m) for m in _LDD_RE.findall(out))
        libs.update(
            Path(line.split()[0]) for line in out.splitlines() if line.strip().startswith("/")
        )
    return libs


def _dlopened(libs: set[Path]) -> set[Path]:
    """Libraries glibc loads at run time, which ldd does not list: libgcc_s, which
    ``pthread_exit`` needs when a daemon thread is ended at interpreter exit (without it the
    process aborts: "libgcc_s.so.1 must be installed for pthread_exit to work")."""
    dirs = {lib.parent for lib in libs if lib.name.startswith("libc.so")}
    return {d / "libgcc_s.so.1" for d in dirs if (d / "libgcc_s.so.1").exists()}


def _key(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        try:
            st = f.lstat()
        except OSError:
            continue
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def build() -> Path:
    """The cached image for the current interpreter and repository, built now if absent.

    Raises:
        RootfsError: mkfs.ext4 missing or failed.
    """
    if shutil.which("mkfs.ext4") is None:
        raise RootfsError("building the guest root image: mkfs.ext4 missing (e2fsprogs)")
    files = [f for src, _ in _sources() for f in _walk(src)] + _distribution_files()
    libs = _libraries(files) | _libraries([Path("/usr/bin/env")])
    files += sorted(libs | _dlopened(libs))
    files.append(Path("/usr/bin/env"))
    # Every symlink's target too (libfoo.so.6 -> libfoo.so.6.4.0, /lib64/ld-linux -> /lib/...).
    files = list(dict.fromkeys(p for f in files for p in _link_chain(f)))
    # One folder per repository (worktrees differ), so pruning never touches another's image.
    repo = hashlib.sha256(str(_package_tree()).encode()).hexdigest()[:12]
    root = cache_dir() / "rootfs" / repo
    # Locked: two pytest workers starting labs at once would both prune and both build.
    with cache_lock(root):
        image = root / f"root-{_key(files)}.ext4"
        if image.is_file():
            os.utime(image)  # in use: keep it out of the pruning below
            return image
        for old in root.glob("root-*.ext4"):
            # ~160 MB each, one per change of the code; an hour-old one serves no running lab
            # that could still start a migration target from it.
            if time.time() - old.stat().st_mtime > 3600:
                old.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(prefix="rootfs-", dir=root) as tmp:
            stage = Path(tmp) / "stage"
            for sub in ("bin", "proc", "sys", "dev", "tmp", "run", "root", "etc", "mnt"):
                (stage / sub).mkdir(parents=True, exist_ok=True)
            for f in files:
                dest = stage / f.relative_to("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.exists() or dest.is_symlink():
                    continue
                if f.is_symlink():
                    os.symlink(os.readlink(f), dest)
                else:
                    shutil.copy2(f, dest, follow_symlinks=True)
            shutil.copy2(BUSYBOX, stage / "bin" / "busybox")
            for applet in _applets():
                link = stage / "bin" / applet
                if not link.exists() and not link.is_symlink():
                    os.symlink("busybox", link)
            (stage / "etc" / "hostname").write_text("guest\n")
            size_mb = sum(f.lstat().st_size for f in stage.rglob("*")) // (1 << 20)
            partial = Path(tmp) / "image.ext4"
            done = subprocess.run(
                ["mkfs.ext4", "-q", "-F", "-L", "cosockroot", "-O", "^has_journal,^metadata_csum",
                 "-d", str(stage), str(partial), f"{size_mb * 5 // 4 + 64}M"],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise RootfsError(f"building the guest root image: mkfs.ext4 failed: {done.stderr}")
            os.replace(partial, image)
    return image
