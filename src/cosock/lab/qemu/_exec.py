"""Talk to a guest's command server (:mod:`._guestd`) from its host's network namespace.

The guest's address exists only on the lab's bridge, which lives in the host namespace, so the
client socket must be created there. A short-lived thread ``setns()``-es into the namespace
(setns with CLONE_NEWNET changes only the calling thread), makes the socket and ends: the socket
stays in the namespace it was made in, and no other thread of ours ever moves.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._netns import libc
from ._model import GUESTD_PORT, GuestCommandError

CLONE_NEWNET = 0x40000000
MAX_REPLY = 256 << 20


def socket_in(netns_path: Path) -> socket.socket:
    """A fresh TCP socket that belongs to the network namespace at ``netns_path``."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []
    lib = libc()

    def work() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if lib.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns_path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    worker = threading.Thread(target=work, name="cosock-netns-socket")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return made[0]


def request(
    netns_path: Path,
    address: str,
    req: Mapping[str, Any],
    timeout: float | None,
    port: int = GUESTD_PORT,
) -> dict[str, Any]:
    """Send one request, wait for its one-line reply (``timeout``: connect + answer)."""
    sock = socket_in(netns_path)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
            sock.sendall(json.dumps(dict(req)).encode() + b"\n")
            with sock.makefile("rb") as f:
                line = f.readline(MAX_REPLY)
        except OSError as exc:
            raise GuestCommandError(
                f"command server of guest at {address}:{port}: {exc or type(exc).__name__}"
            ) from None
    try:
        reply = json.loads(line)
    except ValueError:
        raise GuestCommandError(f"command server at {address}: no or garbled reply") from None
    if not isinstance(reply, dict):
        raise GuestCommandError(f"command server at {address}: reply is not an object")
    return reply


def wait_ping(netns_path: Path, address: str, token: str, deadline: float) -> dict[str, Any]:
    """Ping until the server answers or ``deadline`` (monotonic) passes."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            reply = request(netns_path, address, {"token": token, "op": "ping"}, timeout=2.0)
            if reply.get("ok"):
                return reply
            raise GuestCommandError(f"command server at {address}: {reply.get('error')}")
        except GuestCommandError as exc:
            last = exc
            time.sleep(0.2)
    raise GuestCommandError(f"no answer from the command server at {address}: {last}")


def run(
    netns_path: Path,
    address: str,
    token: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: bytes | None = None,
    timeout: float | None = None,
    detach: bool = False,
    log: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` in the guest. Detached: returns at once, ``returncode`` 0 and the child's
    pid as ``stdout`` (its output goes to ``log`` inside the guest).

    Raises:
        GuestCommandError: unreachable server, or the server's own error (e.g. timeout).
    """
    req: dict[str, Any] = {
        "token": token,
        "op": "run",
        "argv": list(argv),
        "env": dict(env or {}),
        "cwd": cwd,
        "stdin": base64.b64encode(stdin or b"").decode(),
        "timeout": timeout,
        "detach": detach,
        "log": log,
    }
    wait = None if timeout is None else timeout + 10.0
    reply = request(netns_path, address, req, timeout=wait)
    if not reply.get("ok"):
        raise GuestCommandError(f"guest at {address}: {reply.get('error')}")
    if detach:
        return subprocess.CompletedProcess(list(argv), 0, str(reply["pid"]).encode(), b"")
    return subprocess.CompletedProcess(
        list(argv),
        int(reply["rc"]),
        base64.b64decode(reply.get("stdout") or ""),
        base64.b64decode(reply.get("stderr") or ""),
    )
