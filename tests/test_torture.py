"""``cosock torture``, short variants for CI (issue 6, parts 4 and 5): every figure comes from
a real check in the run (sha256 of every transfer, EOF after the last byte, leak snapshots),
and the invariants are the issue's: nothing lost, nothing duplicated, no hang, no leak."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import requires_root


def _run(tmp_path: Path, mode: str, seconds: int) -> dict[str, Any]:
    out = tmp_path / "torture.json"
    argv = [sys.executable, "-m", "cosock", "torture", "--seconds", str(seconds)]
    argv += ["--connections", "6", "--seed", "7", "--mode", mode, "--json", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    figures: dict[str, Any] = json.loads(out.read_text())
    assert proc.returncode == 0, (proc.stderr[-2000:], figures)
    return figures


def _check(figures: dict[str, Any]) -> None:
    assert set(figures) == {
        "connections",
        "bytes_verified",
        "faults",
        "fallbacks",
        "lost_bytes",
        "duplicated_bytes",
        "hangs",
        "leaks",
    }
    assert figures["connections"] > 20
    assert figures["bytes_verified"] > 1 << 20
    assert figures["faults"]["peer_kill"] >= 1 and figures["faults"]["agent_restart"] >= 1
    assert figures["lost_bytes"] == figures["duplicated_bytes"] == figures["hangs"] == 0
    assert figures["leaks"] == {
        "fds": 0,
        "memfds": 0,
        "threads": 0,
        "processes": 0,
        "namespaces": 0,
    }
    # While the agent was down, new connections fell back with that reason.
    assert figures["fallbacks"].get("agent-unreachable", 0) >= 1


@pytest.mark.timeout(150)
def test_torture_loopback_short(tmp_path: Path) -> None:
    _check(_run(tmp_path, "loopback", 8))


@requires_root
@pytest.mark.timeout(180)
def test_torture_lab_short(tmp_path: Path) -> None:
    _check(_run(tmp_path, "lab", 8))
