"""The command server inside a QEMU guest: runs what ``cosock lab exec`` asks for.

One JSON line in, one JSON line out, per TCP connection on the guest's lab address. Every
request carries the per-guest token the host passed in through fw_cfg (never over the network),
so other guests on the lab's bridge cannot run commands here. Stdlib only: this module runs in
the guest before anything else of cosock is imported.

Requests: ``{"token", "op": "ping"}``; ``{"token", "op": "run", "argv", "env", "cwd", "stdin"
(base64), "timeout", "detach"}``. Replies: ``{"ok": true, ...}`` or ``{"ok": false, "error"}``.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import os
import socketserver
import subprocess
import sys
from typing import Any

MAX_REQUEST = 16 << 20


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
        else:
            self._reply({"ok": False, "error": f"unknown op {op!r}"})

    def _reply(self, msg: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(msg).encode() + b"\n")


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, token: str) -> None:
        super().__init__(("0.0.0.0", port), Handler)
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
