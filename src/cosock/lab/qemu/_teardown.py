"""What ``cosock lab down`` removes for QEMU guests: their QEMUs and the hosts' pool files.

Kept apart from the builder and free of ``qemu.qmp`` so the namespace lab's ``down`` can call it
for every lab (a crash may have left a QEMU lab without a state file).
"""

from __future__ import annotations

import contextlib
from typing import Any

from ._model import SHM_DIR, pool_glob
from ._vm import reap, stop


def stop_vms(state: dict[str, Any]) -> None:
    """SIGTERM then SIGKILL the QEMUs the state file records (pid checked to be a QEMU)."""
    pids = [int(g.get("pid") or 0) for g in state.get("guests", []) if isinstance(g, dict)]
    stop([pid for pid in pids if pid > 0])


def remove_pools(lab: str) -> None:
    """Unlink every ivshmem pool file of ``lab`` (found by name, state file or not)."""
    for path in SHM_DIR.glob(pool_glob(lab)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    reap()
