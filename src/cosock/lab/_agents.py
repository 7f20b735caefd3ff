"""Host agents of a lab: start one per host namespace, wait for it, stop it.

The agent (``python -m cosock.agent``) is another layer; the lab only knows its command line,
that readiness means "its Unix socket accepts", and the client functions to register guests.
Path Unix sockets are reached through the file system, so the lab (root namespace) and guests
(their own namespaces) can all talk to an agent that lives in a host namespace.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .._config import ENV_ENABLE
from . import _netns
from ._model import AgentStartError

READY_TIMEOUT = 5.0

#: Agents started by this process, by pid, so ``down`` can reap them (no zombies in tests).
_children: dict[int, subprocess.Popen[bytes]] = {}


def _package_root() -> str:
    """The directory holding the ``cosock`` package, so the agent runs the same code as we do."""
    return str(Path(__file__).resolve().parents[2])


def agent_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ENV_ENABLE}
    root = _package_root()
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    return env


def start(
    host: str, host_ns: str, sock: Path, log: Path, extra: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """Start ``python -m cosock.agent`` inside ``host_ns``, output to ``log``; no waiting.
    ``extra``: more agent options (the QEMU lab's VM gateway)."""
    sock.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    argv = [sys.executable, "-m", "cosock.agent", "--socket", str(sock), "--host", host]
    argv += list(extra)
    with _netns.open_netns(host_ns) as fd, open(log, "ab") as out, _netns.forking():
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=agent_env(),
            cwd="/",
            preexec_fn=_netns.setns_preexec(fd),
            start_new_session=True,
        )
        _children[proc.pid] = proc  # before a deferred Ctrl-C: ``down`` reaps it
    return proc


def _log_tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _accepts(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def wait_ready(
    agents: Sequence[tuple[str, subprocess.Popen[bytes], Path, Path]],
    timeout: float = READY_TIMEOUT,
) -> None:
    """Wait until every agent's socket accepts; fail with the agent's last log line."""
    deadline = time.monotonic() + timeout
    pending = list(agents)
    while pending:
        host, proc, sock, log = pending[0]
        if proc.poll() is not None:
            tail = _log_tail(log)
            raise AgentStartError(
                f"agent of host {host} exited with status {proc.returncode}"
                + (f": {tail}" if tail else "")
            )
        if _accepts(sock):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            tail = _log_tail(log)
            raise AgentStartError(
                f"agent of host {host} not ready on {sock} after {timeout:g} s"
                + (f": {tail}" if tail else "")
            )
        time.sleep(0.02)


def is_agent(pid: int) -> bool:
    """Guards against pid reuse: only signal a recorded pid that still runs our agent."""
    return "cosock.agent" in _netns.cmdline(pid)


def stop(pids: Sequence[int], grace: float = 2.0) -> None:
    """SIGTERM then SIGKILL the agents among ``pids``, and reap the ones we started."""
    mine = [pid for pid in pids if pid > 0 and is_agent(pid)]
    _netns.terminate(mine, grace=grace)
    for pid in pids:
        proc = _children.pop(pid, None)
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def reap() -> None:
    """Collect our agents that died otherwise (e.g. killed by ``down`` without a state file)."""
    for pid, proc in list(_children.items()):
        if proc.poll() is not None:
            del _children[pid]
