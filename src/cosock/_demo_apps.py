"""The demo's programs: an ordinary stdlib server and client, with no cosock import.

Run them under ``cosock run`` to accelerate them, or without it for plain TCP.  The
transfer protocol: the client sends an 8-byte length N and N bytes; the server answers an
8-byte ack once it has them all (so the upload time excludes hashing), then the sha256 of
what it received, then N bytes of its own; the client checks both digests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import socketserver
import struct
import sys
import time
from collections.abc import Iterator

_BLOCK = 1 << 20


def pattern(seed: int) -> bytes:
    """A deterministic 1 MiB block (cheap to generate, not compressible by accident)."""
    out = bytearray()
    counter = 0
    while len(out) < _BLOCK:
        out += hashlib.sha256(struct.pack("<QQ", seed, counter)).digest() * 64
        counter += 1
    return bytes(out[:_BLOCK])


def payload(block: bytes, size: int) -> Iterator[memoryview]:
    """``size`` bytes of ``block`` repeated, as views (no copy)."""
    view = memoryview(block)
    left = size
    while left:
        n = min(left, len(block))
        yield view[:n]
        left -= n


def payload_digest(block: bytes, size: int) -> bytes:
    h = hashlib.sha256()
    for chunk in payload(block, size):
        h.update(chunk)
    return h.digest()


def send_payload(sock: socket.socket, block: bytes, size: int) -> None:
    for chunk in payload(block, size):
        sock.sendall(chunk)


def touched(size: int) -> bytearray:
    """A buffer whose pages already exist: page faults on first touch would otherwise be
    timed as transfer (the same cost for every transport, hiding their difference)."""
    return bytearray(b"\0") * size


def recv_exact(sock: socket.socket, size: int, buf: bytearray | None = None) -> bytearray:
    buf = bytearray(size) if buf is None else buf
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], min(size - got, 4 << 20))
        if n == 0:
            raise ConnectionError(f"EOF after {got} of {size} bytes")
        got += n
    return buf


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        (size,) = struct.unpack("<Q", recv_exact(sock, 8))
        data = touched(size)
        sock.sendall(b"READY!!!")
        recv_exact(sock, size, data)
        sock.sendall(b"ACK-ALL!")
        sock.sendall(hashlib.sha256(data).digest())
        del data
        send_payload(sock, pattern(2), size)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # wait for the client's close


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve(host: str, port: int) -> None:
    with _Server((host, port), _Handler) as server:
        print(json.dumps({"listening": server.server_address[:2]}), flush=True)
        server.serve_forever()


def client(host: str, port: int, size: int) -> dict[str, object]:
    up_block, down_block = pattern(1), pattern(2)
    sock = socket.create_connection((host, port), timeout=120)
    try:
        back = touched(size)
        sock.sendall(struct.pack("<Q", size))
        ready = recv_exact(sock, 8)
        t0 = time.perf_counter()
        send_payload(sock, up_block, size)
        ack = recv_exact(sock, 8)
        t1 = time.perf_counter()
        digest = bytes(recv_exact(sock, 32))
        t2 = time.perf_counter()
        recv_exact(sock, size, back)
        t3 = time.perf_counter()
        eof = sock.recv(1)
        path = getattr(sock, "cosock_path", "tcp")
    finally:
        sock.close()
    verified = (
        ready == b"READY!!!"
        and ack == b"ACK-ALL!"
        and digest == payload_digest(up_block, size)
        and hashlib.sha256(back).digest() == payload_digest(down_block, size)
        and eof == b""
    )
    seconds = (t1 - t0) + (t3 - t2)
    return {
        "path": path,
        "bytes": 2 * size,
        "verified": verified,
        "seconds": seconds,
        "MBps": 2 * size / seconds / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cosock._demo_apps")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=7000)
    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, default=7000)
    c.add_argument("--bytes", type=int, default=64 << 20)
    args = parser.parse_args(argv)
    if args.cmd == "server":
        serve(args.host, args.port)
        return 0
    print(json.dumps(client(args.host, args.port, args.bytes)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
