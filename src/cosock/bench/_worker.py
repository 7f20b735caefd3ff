"""The program the bench runs inside guests: ``python -m cosock.bench._worker ...``.

    server --tcp HOST:PORT | --unix PATH        serve tests one connection at a time
    client --tcp HOST:PORT | --unix PATH        run commands read from stdin, one JSON
                                                line out per JSON line in
    client ... --test T --size N --duration S   run one test and exit

It never imports cosock (only the workloads): whether it uses cosock depends on the
environment it was started with (``cosock run``'s), exactly like an unmodified program.
The server is single-threaded and serves one connection at a time, so its CPU time
during a test belongs to that test.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

from . import _workloads

TESTS = ("stream", "rr", "crr", "idle")


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _listener(args: argparse.Namespace) -> socket.socket:
    if args.unix:
        if os.path.exists(args.unix):
            os.unlink(args.unix)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(args.unix)
    else:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(args.tcp)
    srv.listen(128)
    return srv


def serve(args: argparse.Namespace) -> int:
    srv = _listener(args)
    where = args.unix or list(srv.getsockname()[:2])
    info = {"listening": where, "pid": os.getpid(), "cosock": type(srv).__name__ != "socket"}
    print(json.dumps(info), flush=True)
    stats = _workloads.ServerStats()
    while True:
        cpu0 = _workloads.cpu_seconds()
        conn, _ = srv.accept()
        try:
            _workloads.serve_connection(conn, stats, cpu0)
        except OSError as exc:  # a client that died mid-test must not end the server
            print(f"bench server: connection failed: {exc!r}", file=sys.stderr, flush=True)
        finally:
            conn.close()


def _connector(args: argparse.Namespace) -> _workloads.Connect:
    if args.unix:

        def connect_unix() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(args.unix)
            except BaseException:
                sock.close()
                raise
            return sock

        return connect_unix
    address = args.tcp

    def connect_tcp() -> socket.socket:
        return socket.create_connection(address)

    return connect_tcp


def run_test(connect: _workloads.Connect, cmd: dict[str, Any]) -> dict[str, Any]:
    """Run one command ``{"test", "size", "duration"}``; the result names the test."""
    test, size, duration = cmd["test"], int(cmd.get("size", 0)), float(cmd["duration"])
    if test == "crr":
        result = _workloads.crr(connect, size, duration)
    else:
        with connect() as sock:
            if test == "stream":
                result = _workloads.stream(sock, size, duration)
            elif test == "rr":
                result = _workloads.rr(sock, size, duration)
            elif test == "idle":
                result = _workloads.idle(sock, duration)
            else:
                raise ValueError(f"unknown test {test!r}; expected one of {', '.join(TESTS)}")
    return {"test": test, "size": size, **result}


def client(args: argparse.Namespace) -> int:
    connect = _connector(args)
    if args.test:
        cmd = {"test": args.test, "size": args.size, "duration": args.duration}
        print(json.dumps(run_test(connect, cmd)), flush=True)
        return 0
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            out = run_test(connect, json.loads(line))
        except Exception as exc:  # reported to the runner, which fails loudly
            out = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cosock.bench._worker")
    sub = parser.add_subparsers(dest="role", required=True)
    for role in ("server", "client"):
        p = sub.add_parser(role)
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--tcp", type=_address, help="HOST:PORT (server: PORT 0 = any)")
        where.add_argument("--unix", help="Unix socket path")
        if role == "client":
            p.add_argument("--test", choices=TESTS)
            p.add_argument("--size", type=int, default=64)
            p.add_argument("--duration", type=float, default=1.0)
    args = parser.parse_args(argv)
    return serve(args) if args.role == "server" else client(args)


if __name__ == "__main__":
    sys.exit(main())
