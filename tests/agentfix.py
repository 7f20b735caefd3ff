"""A real per-test agent (``python -m cosock.agent --auto``) and the env that points at it.

Imported by test modules (``from agentfix import cosock_agent``) so its fixture is found.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cosock.agent.client import AgentClient


def start_agent(path: Path, host: str = "local", auto: bool = True) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSOCK_")}
    argv = [sys.executable, "-m", "cosock.agent", "--socket", str(path), "--host", host]
    proc = subprocess.Popen([*argv, "--auto"] if auto else argv, env=env)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
            return proc
        except OSError:
            time.sleep(0.02)
        finally:
            probe.close()
    proc.kill()
    raise RuntimeError("agent did not start")


@pytest.fixture
def cosock_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Agent socket path; COSOCK_AGENT points at it for this process and its children."""
    path = tmp_path / "agent" / "agent.sock"
    proc = start_agent(path)
    monkeypatch.setenv("COSOCK_AGENT", str(path))
    AgentClient.reset_shared()
    yield path
    AgentClient.reset_shared()
    proc.kill()
    proc.wait()
