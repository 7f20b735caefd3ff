"""A child process that speaks JSON lines: one command in on stdin, one answer out.

A reader thread turns stdout into a queue, so every wait has a timeout: a hung guest
program fails the bench with its stderr instead of hanging it.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from pathlib import Path
from typing import IO, Any


class WorkerError(RuntimeError):
    """A guest program failed, hung, or answered something that is not JSON."""


class JsonProc:
    """Wraps a started ``Popen`` (stdin/stdout pipes, text mode) whose stderr goes to ``log``."""

    def __init__(self, name: str, proc: subprocess.Popen[str], log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        self._reader = threading.Thread(
            target=self._pump, args=(proc.stdout,), name=f"bench-{name}", daemon=True
        )
        self._reader.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line; raises WorkerError on EOF, timeout, garbage or ``{"error"}``."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise WorkerError(
                f"{self.name}: no answer within {timeout:.0f} s{self._tail()}"
            ) from None
        if line is None:
            self.proc.wait(timeout=5)
            raise WorkerError(
                f"{self.name}: exited with status {self.proc.returncode}{self._tail()}"
            )
        try:
            record: dict[str, Any] = json.loads(line)
        except ValueError:
            raise WorkerError(f"{self.name}: not JSON: {line.strip()!r}{self._tail()}") from None
        if "error" in record:
            raise WorkerError(f"{self.name}: {record['error']}{self._tail()}")
        return record

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise WorkerError(f"{self.name}: cannot send a command ({exc}){self._tail()}") from None

    def request(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.send(command)
        return self.read(timeout)

    def _tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return ("; stderr: " + " | ".join(text)) if text else ""

    def stop(self) -> None:
        """Kill and reap (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
            pass
        self._reader.join(timeout=2)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
