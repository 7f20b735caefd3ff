"""A program from migrate_peers.py running inside a lab guest, driven by JSON lines.

The guest is a namespace (``Lab.popen``: a local child) or a QEMU VM (``QemuLab.popen``: a child
of the VM's command server, its stdin/stdout relayed); the tests cannot tell them apart."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cosock.lab import Lab

if TYPE_CHECKING:
    from cosock.lab.qemu import QemuLab

PEERS = str(Path(__file__).with_name("migrate_peers.py"))
ROOT = str(Path(__file__).resolve().parents[1] / "src")


class Peer:
    """A program from migrate_peers.py running in a guest, asked questions as JSON lines."""

    def __init__(self, lab: Lab | QemuLab, guest: str, *args: str) -> None:
        env = {"PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
        if "COSOCK_TRACE" in os.environ:  # diagnostics: the peers append to the same file
            env["COSOCK_TRACE"] = os.environ["COSOCK_TRACE"]
        self.proc = lab.popen(
            guest,
            [sys.executable, PEERS, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._buf = b""
        #: The lab's scale for waits (QEMU under TCG: longer); what is checked stays the same.
        self.factor = float(lab.timeout_factor)

    def read(self, timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        timeout *= self.factor
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"no answer from {self.proc.args} within {timeout} s")
            data = os.read(fd, 65536)
            if not data:
                status = self.proc.wait(5)
                lost = getattr(self.proc, "lost", None)  # a VM's command server connection
                why = f" ({lost})" if lost else ""
                raise EOFError(f"{self.proc.args} exited with {status}{why}")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, timeout: float = 20.0, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.read(timeout)

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def in_flight(client: Peer, server: Peer) -> int:
    """At most how many bytes either end had sent and the other not yet received (socket
    buffers, the wire) at any moment up to the call's end, from when it began.

    The two ends are asked one after the other, so one reading of both can undercount (CI
    saw -29 KB: the server had received what the client sent after its answer). Received
    counts are taken first and sent counts after them: an upper bound."""
    c1, s1 = client.ask(op="progress"), server.ask(op="progress")
    c2, s2 = client.ask(op="progress"), server.ask(op="progress")
    flying: int = c2["sent"] + s2["sent"] - c1["received"] - s1["received"]
    return flying


def stream_phase(client: Peer, server: Peer, want: int = 2 << 20) -> int:
    """Let the stream run until ``want`` more bytes arrived at the two ends together."""
    start = client.ask(op="progress")["received"] + server.ask(op="progress")["received"]
    deadline = time.monotonic() + 30 * client.factor
    while True:
        time.sleep(0.2)
        c, s = client.ask(op="progress"), server.ask(op="progress")
        assert c["error"] is None and s["error"] is None, (c, s)
        got: int = c["received"] + s["received"] - start
        if got >= want or time.monotonic() > deadline:
            return got
