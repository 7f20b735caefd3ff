"""The guest root image cache under concurrent builders (no VM: just the image file).

CI's two pytest workers start QEMU labs at the same moment; both used to prune the same
hour-old image and the slower one failed its whole module with FileNotFoundError.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cosock.lab.qemu._initramfs import BUSYBOX

pytestmark = pytest.mark.skipif(
    shutil.which("mkfs.ext4") is None or not BUSYBOX.is_file(),
    reason="building a root image needs mkfs.ext4 (e2fsprogs) and busybox-static",
)

BUILD = "from cosock.lab.qemu import _rootfs; print(_rootfs.build())"


def test_builders_started_together_share_one_image_and_prune_the_stale_one_once(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "COSOCK_VM_CACHE": str(tmp_path)}
    first = subprocess.run(
        [sys.executable, "-c", BUILD], env=env, capture_output=True, text=True, check=True
    )
    image = Path(first.stdout.strip())
    # Stale images of older code versions, past the hour that keeps them (many, so that the
    # builders' pruning overlaps: with one, the race needs luck).
    hours_ago = time.time() - 7200
    stale = [image.with_name(f"root-{n:016x}.ext4") for n in range(300)]
    for old in stale:
        old.write_bytes(b"old")
        os.utime(old, (hours_ago, hours_ago))
    image.unlink()  # a change of the code: every builder needs a new image

    builders = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [b.communicate(timeout=120) for b in builders]
    for b, (out, err) in zip(builders, results, strict=True):
        assert b.returncode == 0, err
        assert Path(out.strip()) == image
    assert image.is_file() and image.stat().st_size > 1 << 20
    assert not any(old.exists() for old in stale)
    # No half-built image or staging folder left beside it.
    assert sorted(p.name for p in image.parent.iterdir() if p.name != ".lock") == [image.name]
