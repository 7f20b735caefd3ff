"""QMP, QEMU's control protocol, through the ``qemu.qmp`` library (as QEMU's own
``python/qemu/machine`` does).

Each guest's QEMU listens on its own Unix socket (``-qmp unix:...,server=on,wait=off``) rather
than on a socketpair kept by the process that started it: ``cosock lab`` is a CLI, and whichever
process runs ``down`` or ``migrate`` later must be able to reach every guest. QMP accepts one
client at a time, so each call opens, negotiates, talks and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._model import VmError

CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0


class QmpError(VmError):
    """QEMU's monitor was unreachable or refused a command."""


@contextmanager
def session(path: Path, timeout: float = CONNECT_TIMEOUT) -> Iterator[Any]:
    """A negotiated ``QEMUMonitorProtocol`` on ``path`` (retried until ``timeout``: the
    socket appears a moment after QEMU starts)."""
    from qemu.qmp import QMPError
    from qemu.qmp.legacy import QEMUMonitorProtocol

    owned = not _loop_is_set()  # the sync shim sets a loop of its own when none is
    try:
        deadline = time.monotonic() + timeout
        while True:
            qmp = QEMUMonitorProtocol(str(path))
            try:
                qmp.connect(negotiate=True)
                break
            except (OSError, QMPError) as exc:
                qmp.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP socket {path}: cannot connect ({exc})") from None
                time.sleep(0.05)
        qmp.settimeout(COMMAND_TIMEOUT)
        try:
            yield qmp
        finally:
            # A QEMU that died under us makes close() re-raise the reader's EOFError; the
            # command's own error (``Disconnected``) already says so.
            with contextlib.suppress(EOFError, OSError, QMPError):
                qmp.close()
    finally:
        if owned:  # its epoll and self-pipe would outlive us (one set per thread)
            loop = getattr(asyncio.get_event_loop_policy(), "_local", None)
            loop = getattr(loop, "_loop", None)
            asyncio.set_event_loop(None)
            if loop is not None:
                loop.close()


def _loop_is_set() -> bool:
    """Has this thread an event loop set (one that is not ours to close)?"""
    local = getattr(asyncio.get_event_loop_policy(), "_local", None)
    return local is None or getattr(local, "_loop", None) is not None


def command(path: Path, name: str, /, **args: Any) -> Any:
    """Run one QMP command and return its ``return`` value.

    Raises:
        QmpError: unreachable monitor, or QEMU's error ``desc`` for a refused command.
    """
    from qemu.qmp import QMPError

    with session(path) as qmp:
        try:
            return qmp.cmd(name, **args)
        except QMPError as exc:
            raise QmpError(f"QMP {name} on {path.name}: {exc}") from None


def ramblocks(path: Path) -> list[str]:
    """The names of the VM's RAM blocks (HMP ``info ramblock``: QMP has no query for them),
    which is what a migration stream carries and the target must have too."""
    text = str(command(path, "human-monitor-command", **{"command-line": "info ramblock"}))
    lines = [ln.split() for ln in text.splitlines()[1:]]
    return [ln[0] for ln in lines if ln]


def ram_released(path: Path, owned: Callable[[str], bool], timeout: float) -> list[str]:
    """Wait until no RAM block of a memory backend whose id ``owned`` accepts is left; the
    ones still held after ``timeout`` (empty: released).

    ``device_del`` and ``object-del`` return before QEMU frees a block (after an RCU grace
    period). Until then a migration sends it (the target, which has not got it, exits with
    "Unknown ramblock") and a device plugged at the same PCI address with the same backend id
    aborts QEMU ("RAMBlock ... already registered, abort!").
    """
    deadline = time.monotonic() + timeout
    while True:
        held = [b for b in ramblocks(path) if owned(b.rsplit("/", 1)[-1])]
        if not held or time.monotonic() > deadline:
            return held
        time.sleep(0.05)


def status(path: Path) -> str:
    """The VM's run state (``running``, ``paused``, ``inmigrate``, ...)."""
    return str(command(path, "query-status").get("status", "unknown"))


def quit_(path: Path) -> None:
    """Ask QEMU to exit; a monitor that is already gone is fine."""
    from qemu.qmp import QMPError

    try:
        with session(path, timeout=1.0) as qmp:
            qmp.cmd("quit")
    except (QmpError, QMPError, OSError, EOFError):
        pass
