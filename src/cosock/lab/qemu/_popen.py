"""An interactive process in a QEMU guest that looks like ``subprocess.Popen`` to the host.

Tests drive programs in lab guests through their stdin and stdout (``select`` + ``os.read``
on ``stdout.fileno()``), whatever the backend. The guest's command server relays one
connection to the child (``op: popen`` in :mod:`._guestd`); here a pump thread reads its
frames, puts the child's output into a real pipe (so ``stdout`` has a file descriptor) and
records its exit status. The child dies with the connection, so nothing outlives the host side.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from ._exec import socket_in
from ._guestd import MAX_FRAME, frame, frames, keepalive
from ._model import GUESTD_PORT, GuestCommandError

#: Exit status when the connection to the command server is lost before the child's status
#: arrived (ssh's convention): the child was killed by the guest, or the guest is gone.
LOST = 255
#: Child output held in memory beyond the pipe while nobody reads it; then the guest waits.
MAX_BUFFERED = 16 << 20
CONNECT_TIMEOUT = 30.0


class _Stdin:
    """The child's stdin: every write is sent as one frame (``flush`` has nothing to do)."""

    def __init__(self, proc: GuestPopen) -> None:
        self._proc = proc
        self.closed = False

    def write(self, data: bytes) -> int:
        if self.closed:
            raise ValueError("write to closed stdin")
        view = memoryview(data)
        for i in range(0, len(view), MAX_FRAME):
            self._proc._send(frame(b"i", bytes(view[i : i + MAX_FRAME])))
        return len(data)

    def flush(self) -> None:
        if self.closed:
            raise ValueError("flush of closed stdin")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self._proc._send(frame(b"e"))


class GuestPopen:
    """A child of a guest's command server, as far as ``subprocess.Popen`` goes: ``args``,
    ``pid`` (in the guest), ``stdin``, ``stdout``, ``poll``, ``wait``, ``send_signal``,
    ``terminate``, ``kill``, ``returncode``."""

    stderr: IO[bytes] | None = None

    def __init__(
        self,
        sock: socket.socket | None,
        args: list[str],
        pid: int,
        early: bytes,
        stdin: bool,
        out: bool,
        returncode: int | None = None,
    ) -> None:
        """``sock`` None: a child that never started (``returncode`` given), no pump."""
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self.lost: str | None = None  # why the status is LOST
        self._sock = sock
        self._send_lock = threading.Lock()
        self._exited = threading.Event()
        self.stdin: _Stdin | None = _Stdin(self) if stdin else None
        self._out_w = -1
        self.stdout: IO[bytes] | None = None
        if out:
            r, self._out_w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(self._out_w, False)
            self.stdout = open(r, "rb", buffering=0)  # noqa: SIM115 - the caller closes it
        self._pump: threading.Thread | None = None
        if sock is None:
            self._exit(LOST if returncode is None else returncode)
            if self.stdin is not None:
                self.stdin.closed = True
            if self._out_w >= 0:
                os.close(self._out_w)
                self._out_w = -1
            return
        self._pump = threading.Thread(
            target=self._run, args=(sock, bytearray(early)), name=f"cosock-guest-popen-{pid}"
        )
        self._pump.start()

    def __repr__(self) -> str:
        return f"<GuestPopen pid={self.pid} returncode={self.returncode} args={self.args!r}>"

    #### Popen's interface

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        if self._pump is not None and not self._pending_output():
            self._pump.join()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the child (nothing if it has exited, as with Popen)."""
        if self.returncode is not None:
            return
        try:
            self._send(frame(b"k", str(int(sig)).encode()))
        except OSError:  # the connection is gone: the guest kills the child for it
            self._drop()

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __enter__(self) -> GuestPopen:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stdin is not None:
            self.stdin.close()
        if self.returncode is None:
            self.kill()
        self.wait()
        if self.stdout is not None:
            self.stdout.close()

    #### Inside

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise BrokenPipeError("the child never started")
        with self._send_lock:
            self._sock.sendall(data)

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def _pending_output(self) -> bool:
        alive = self._pump is not None and self._pump.is_alive()
        return alive and self.stdout is not None and not self.stdout.closed

    def _run(self, sock: socket.socket, buf: bytearray) -> None:
        """Frames in, output into the pipe, status recorded; ends with the connection (and
        with the output delivered, or its reader gone)."""
        out = bytearray()
        # frames that came with the reply line
        sock_open = self._take(buf, out) and self.returncode is None
        try:
            while sock_open or out:
                rlist = [sock] if sock_open and len(out) < MAX_BUFFERED else []
                wlist = [self._out_w] if out and self._out_w >= 0 else []
                if not rlist and not wlist:
                    break
                readable, writable, _ = select.select(rlist, wlist, [], 5.0)
                if writable:
                    try:
                        del out[: os.write(self._out_w, out)]
                    except BlockingIOError:
                        pass
                    except BrokenPipeError:  # the reader closed stdout: nobody wants the rest
                        out.clear()
                        os.close(self._out_w)
                        self._out_w = -1
                if not readable:
                    if not wlist and not sock_open:
                        break
                    continue
                try:
                    data = sock.recv(1 << 16)
                except OSError as exc:
                    data, self.lost = b"", f"connection to the command server: {exc}"
                if not data:
                    sock_open = False
                    if self.returncode is None:
                        self.lost = self.lost or "the command server closed the connection"
                        self._exit(LOST)
                    continue
                buf += data
                # After the exit status nothing more comes: end with the output delivered, not
                # when the guest gets round to closing (under TCG the pump, its socket and pipe
                # outlived a test module so).
                sock_open = self._take(buf, out) and self.returncode is None
        finally:
            if self.returncode is None:
                self.lost = self.lost or "pump ended"
                self._exit(LOST)
            if self._out_w >= 0:
                os.close(self._out_w)
                self._out_w = -1
            sock.close()

    def _take(self, buf: bytearray, out: bytearray) -> bool:
        """The complete frames in ``buf``: output onto ``out``, the exit status recorded.
        False when the stream is garbled (then the connection is dropped)."""
        try:
            for kind, payload in frames(buf):
                if kind == b"o" and self._out_w >= 0:
                    out += payload
                elif kind == b"x":
                    self._exit(int(payload))
        except ValueError as exc:
            self.lost = f"garbled stream from the command server: {exc}"
            self._drop()
            self._exit(LOST)
            return False
        return True

    def _exit(self, rc: int) -> None:
        if self.returncode is None:
            self.returncode = rc
            self._exited.set()


def popen(
    netns_path: Path,
    address: str,
    token: str,
    argv: Sequence[str],
    *,
    stdin: bool,
    stdout: bool,
    stderr_to_stdout: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    port: int = GUESTD_PORT,
) -> GuestPopen:
    """Start ``argv`` in the guest, its stdin/stdout piped to us as asked (stderr goes to the
    guest's console, or into stdout). A program that cannot be started is a finished process
    with status 127 (missing) or 126, like a shell's, its stdout empty.

    Raises:
        GuestCommandError: unreachable server, wrong token, no command, garbled reply.
    """
    sock = socket_in(netns_path)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        req = {
            "token": token,
            "op": "popen",
            "argv": list(argv),
            "env": dict(env or {}),
            "cwd": cwd,
            "stdin": stdin,
            "stdout": stdout,
            "stderr": "stdout" if stderr_to_stdout else "console",
        }
        try:
            sock.connect((address, port))
            sock.sendall(json.dumps(req).encode() + b"\n")
            line, early = _reply_line(sock, time.monotonic() + CONNECT_TIMEOUT)
        except OSError as exc:
            raise GuestCommandError(
                f"command server of guest at {address}:{port}: {exc or type(exc).__name__}"
            ) from None
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise GuestCommandError(f"command server at {address}: no or garbled reply")
        if not reply.get("ok"):
            raise GuestCommandError(f"guest at {address}: {reply.get('error')}")
        sock.settimeout(None)
        keepalive(sock)
    except BaseException:
        sock.close()
        raise
    if reply.get("pid") is None:  # not started: a finished process with the shell's status
        sock.close()
        proc = GuestPopen(None, list(argv), 0, b"", stdin, stdout, int(reply.get("rc", 127)))
        proc.lost = str(reply.get("error") or "")
        return proc
    return GuestPopen(sock, list(argv), int(reply["pid"]), early, stdin, stdout)


def _reply_line(sock: socket.socket, deadline: float) -> tuple[bytes, bytes]:
    """The reply line, and whatever frames came right behind it."""
    buf = b""
    while b"\n" not in buf:
        if len(buf) > 1 << 16 or time.monotonic() > deadline:
            raise OSError("no reply line")
        data = sock.recv(4096)
        if not data:
            break
        buf += data
    line, _, rest = buf.partition(b"\n")
    return line, rest
