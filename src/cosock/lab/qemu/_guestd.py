"""The command server inside a QEMU guest: runs what ``cosock lab exec`` asks for.

One JSON line in, one JSON line out, per TCP connection on the guest's lab address. Every
request carries the per-guest token the host passed in through fw_cfg (never over the network),
so other guests on the lab's bridge cannot run commands here. Stdlib only: this module runs in
the guest before anything else of cosock is imported.

Requests: ``{"token", "op": "ping"}``; ``{"token", "op": "run", "argv", "env", "cwd", "stdin"
(base64), "timeout", "detach"}``; ``{"token", "op": "popen", "argv", "env", "cwd", "stdin",
"stdout", "stderr"}``. Replies: ``{"ok": true, ...}`` or ``{"ok": false, "error"}``.

``popen`` is interactive: after its reply ``{"ok": true, "pid"}`` the connection carries frames
(one type byte, a 4-byte big-endian length, the payload) both ways: to the child ``i`` (stdin
bytes), ``e`` (stdin closed), ``k`` (a signal number); from it ``o`` (stdout bytes) and, last,
``x`` (its exit status). The host sends nothing before it has the reply. The child runs in a
session of its own; when the connection drops before it exits, the whole session is killed, so
a vanished host leaves nothing behind.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hmac
import json
import os
import selectors
import signal
import socket
import socketserver
import struct
import subprocess
import sys
from typing import Any

MAX_REQUEST = 16 << 20
#: Frame header of the popen stream: type byte, payload length.
FRAME = struct.Struct(">cI")
MAX_FRAME = 1 << 20
#: Bytes of a popen child's stdin kept while it does not read; beyond, the host waits.
MAX_PENDING_INPUT = 4 << 20


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


def frames(buf: bytearray) -> list[tuple[bytes, bytes]]:
    """Complete frames at the start of ``buf`` (removed from it).

    Raises:
        ValueError: a frame longer than MAX_FRAME (not this protocol).
    """
    out = []
    while len(buf) >= FRAME.size:
        kind, n = FRAME.unpack_from(buf)
        if n > MAX_FRAME:
            raise ValueError(f"frame of {n} bytes")
        if len(buf) < FRAME.size + n:
            break
        out.append((kind, bytes(buf[FRAME.size : FRAME.size + n])))
        del buf[: FRAME.size + n]
    return out


def keepalive(sock: socket.socket) -> None:
    """A peer that vanishes without a FIN (its namespace gone, its VM hung) is noticed in
    ~20 s when idle, and in 30 s when data we sent stays unacknowledged (not ~15 min)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 30_000)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def _b64(data: bytes | None) -> str:
    return base64.b64encode(data or b"").decode()


def run(req: dict[str, Any]) -> dict[str, Any]:
    """Run one command; a missing program is exit status 127, like a shell's."""
    argv = [str(a) for a in req.get("argv") or []]
    if not argv:
        return {"ok": False, "error": "no command given"}
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (req.get("env") or {}).items()})
    cwd = req.get("cwd") or "/"
    stdin = base64.b64decode(req.get("stdin") or "")
    timeout = req.get("timeout")
    try:
        if req.get("detach"):
            log = open(req.get("log") or os.devnull, "ab")  # noqa: SIM115 - handed to the child
            with log:
                proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            return {"ok": True, "pid": proc.pid}
        done = subprocess.run(
            argv,
            env=env,
            cwd=cwd,
            input=stdin,
            capture_output=True,
            timeout=float(timeout) if timeout else None,
            check=False,
        )
    except FileNotFoundError as exc:
        return {"ok": True, "rc": 127, "stdout": "", "stderr": _b64(f"{exc}\n".encode())}
    except subprocess.TimeoutExpired as exc:
        return {"ok": False, "error": f"timed out after {exc.timeout:g} s: {argv[0]}"}
    except OSError as exc:
        return {"ok": True, "rc": 126, "stdout": "", "stderr": _b64(f"{exc}\n".encode())}
    return {
        "ok": True,
        "rc": done.returncode,
        "stdout": _b64(done.stdout),
        "stderr": _b64(done.stderr),
    }


def start(req: dict[str, Any]) -> subprocess.Popen[bytes] | dict[str, Any]:
    """The popen child (stdin/stdout piped as asked, stderr to the console or merged into
    stdout), or the reply that says why not: a missing program is status 127."""
    argv = [str(a) for a in req.get("argv") or []]
    if not argv:
        return {"ok": False, "error": "no command given"}
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (req.get("env") or {}).items()})
    try:
        return subprocess.Popen(
            argv,
            env=env,
            cwd=req.get("cwd") or "/",
            stdin=subprocess.PIPE if req.get("stdin") else subprocess.DEVNULL,
            stdout=subprocess.PIPE if req.get("stdout") else None,
            stderr=subprocess.STDOUT if req.get("stderr") == "stdout" else None,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        return {"ok": True, "pid": None, "rc": 127, "error": str(exc)}
    except OSError as exc:
        return {"ok": True, "pid": None, "rc": 126, "error": str(exc)}


def relay(sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
    """Frames between the connection and the child until it exits (then ``x`` + its status)
    or the connection drops (then its whole session is killed). The socket stays blocking:
    a host that does not read holds the child's output back, as a full pipe would."""
    keepalive(sock)
    sel = selectors.DefaultSelector()
    pidfd = os.pidfd_open(proc.pid)
    stdin = proc.stdin.fileno() if proc.stdin else -1
    stdout = proc.stdout.fileno() if proc.stdout else -1
    for fd in (stdin, stdout):
        if fd >= 0:
            os.set_blocking(fd, False)
    inbuf, pending = bytearray(), bytearray()
    stdin_eof = False
    try:
        sel.register(pidfd, selectors.EVENT_READ, "exit")
        sel.register(sock, selectors.EVENT_READ, "sock")
        if stdout >= 0:
            sel.register(stdout, selectors.EVENT_READ, "stdout")
        while True:
            for key, _ in sel.select(timeout=60):
                if key.data == "exit":
                    while stdout >= 0 and _forward(sock, stdout):
                        pass  # what it wrote before exiting is all in the pipe now
                    sock.sendall(frame(b"x", str(proc.wait()).encode()))
                    return
                if key.data == "stdout":
                    if _forward(sock, stdout) is False:
                        sel.unregister(stdout)
                        stdout = -1
                    continue
                if key.data == "stdin":
                    try:
                        del pending[: os.write(stdin, pending)]
                    except BlockingIOError:
                        pass
                    except BrokenPipeError:  # it closed its stdin: what it did not read is lost
                        pending.clear()
                else:
                    data = sock.recv(1 << 16)
                    if not data:
                        raise ConnectionError("the host closed the connection")
                    inbuf += data
                    for kind, payload in frames(inbuf):
                        if kind == b"k":
                            proc.send_signal(int(payload or signal.SIGKILL))
                        elif kind in (b"i", b"e") and stdin >= 0 and not stdin_eof:
                            pending += payload
                            stdin_eof = kind == b"e"
                # Feed the child's stdin only while there is something to feed; read the host
                # only while it is not too far ahead of the child.
                want = selectors.EVENT_WRITE if pending else 0
                if stdin >= 0 and want != _events(sel, stdin):
                    if want:
                        sel.register(stdin, want, "stdin")
                    else:
                        sel.unregister(stdin)
                if stdin >= 0 and stdin_eof and not pending:
                    proc.stdin.close()  # type: ignore[union-attr]
                    stdin = -1
                paused = len(pending) > MAX_PENDING_INPUT
                if paused != (_events(sel, sock.fileno()) == 0):
                    if paused:
                        sel.unregister(sock)
                    else:
                        sel.register(sock, selectors.EVENT_READ, "sock")
    except (OSError, ValueError):  # the connection dropped, or it spoke something else
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        sel.close()
        os.close(pidfd)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def _events(sel: selectors.BaseSelector, fd: int) -> int:
    try:
        return sel.get_key(fd).events
    except KeyError:
        return 0


def _forward(sock: socket.socket, fd: int) -> bool | None:
    """One read of the child's stdout sent on as a frame: True; at its end False; None when
    there is nothing to read now."""
    try:
        data = os.read(fd, MAX_FRAME)
    except BlockingIOError:
        return None
    if data:
        sock.sendall(frame(b"o", data))
    return bool(data)


class Handler(socketserver.StreamRequestHandler):
    server: Server

    def handle(self) -> None:
        line = self.rfile.readline(MAX_REQUEST)
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            self._reply({"ok": False, "error": f"bad request: {exc}"})
            return
        if not hmac.compare_digest(str(req.get("token", "")), self.server.token):
            self._reply({"ok": False, "error": "bad token"})
            return
        op = req.get("op")
        if op == "ping":
            self._reply(
                {"ok": True, "guest": os.environ.get("COSOCK_GUEST", ""), "pid": os.getpid()}
            )
        elif op == "run":
            self._reply(run(req))
        elif op == "popen":
            proc = start(req)
            if isinstance(proc, dict):
                self._reply(proc)
                return
            self._reply({"ok": True, "pid": proc.pid})
            self.wfile.flush()
            relay(self.connection, proc)
        else:
            self._reply({"ok": False, "error": f"unknown op {op!r}"})

    def _reply(self, msg: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(msg).encode() + b"\n")


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, token: str, host: str = "0.0.0.0") -> None:
        super().__init__((host, port), Handler)
        self.token = token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--ready", default="")
    args = parser.parse_args(argv)
    with Server(args.port, args.token) as server:
        if args.ready:
            print(args.ready, flush=True)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
