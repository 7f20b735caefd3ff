"""Programs the lab tests run inside guests.  Plain stdlib socket code: run under
``cosock run`` (or its environment) they are accelerated, without it they are not.

    python lab_peers.py hash-server PORT            # per connection: len, data -> sha256
    python lab_peers.py many HOST PORT N [SEED]     # N concurrent clients, hashes checked
    python lab_peers.py half-close HOST PORT        # shutdown(SHUT_WR) then read the reply
    python lab_peers.py forge-offer RENDEZVOUS CLIENT_IP CLIENT_PORT SERVER_IP PORT
    python lab_peers.py sink-server PORT            # per connection: read to the end, report
    python lab_peers.py stream HOST PORT            # send until killed
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 1 << 20))
        if not chunk:
            raise ConnectionError(f"EOF after {len(out)} of {n}")
        out += chunk
    return bytes(out)


def hash_server(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(512)
    print(json.dumps({"listening": port}), flush=True)

    def handle(conn: socket.socket) -> None:
        with conn:
            size = int.from_bytes(recv_exact(conn, 8), "big")
            if size == 0:  # half-close probe: read to EOF, then answer
                data = bytearray()
                while chunk := conn.recv(65536):
                    data += chunk
                conn.sendall(b"got " + str(len(data)).encode())
                return
            conn.sendall(hashlib.sha256(recv_exact(conn, size)).digest())
            conn.sendall(getattr(conn, "cosock_path", "tcp").encode().ljust(9))

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def many(host: str, port: int, n: int, seed: int | None = None) -> None:
    """``n`` connections open at once; sizes 1000 + 37 i, or random (1 B..256 KiB) by seed."""
    import random

    rng = random.Random(seed)
    socks = []
    for i in range(n):
        s = socket.create_connection((host, port), timeout=60)
        size = 1000 + 37 * i if seed is None else rng.randrange(1, 256 << 10)
        socks.append((s, rng.randbytes(size) if seed is not None else os.urandom(size)))
    for s, data in socks:
        s.sendall(len(data).to_bytes(8, "big") + data)
    ok = 0
    paths: dict[str, int] = {}
    server_paths: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for s, data in socks:
        if recv_exact(s, 32) == hashlib.sha256(data).digest():
            ok += 1
        sp = recv_exact(s, 9).decode().strip()
        server_paths[sp] = server_paths.get(sp, 0) + 1
        p = getattr(s, "cosock_path", "tcp")
        paths[p] = paths.get(p, 0) + 1
        reason = getattr(s, "cosock_fallback_reason", None)
        if reason is not None:
            reasons[reason.value] = reasons.get(reason.value, 0) + 1
        s.close()
    out = {"ok": ok, "paths": paths, "server_paths": server_paths, "reasons": reasons}
    print(json.dumps(out), flush=True)


def half_close(host: str, port: int) -> None:
    s = socket.create_connection((host, port), timeout=30)
    s.sendall((0).to_bytes(8, "big") + b"x" * 100_000)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := s.recv(100):
        reply += chunk
    print(json.dumps({"reply": reply.decode(), "path": getattr(s, "cosock_path", "tcp")}))


def forge_offer(rendezvous: str, cip: str, cport: int, sip: str, sport: int) -> None:
    from cosock._offer import Offer
    from cosock._rendezvous import send_offer
    from cosock._ring import create_channel_fd

    fd = create_channel_fd(1 << 16)
    offer = Offer((cip, cport), (sip, sport), os.urandom(16), 1 << 16, 4)
    send_offer(rendezvous, offer, fd)
    print(json.dumps({"sent": True}), flush=True)


def sink_server(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)
    print(json.dumps({"listening": port}), flush=True)

    def handle(conn: socket.socket) -> None:
        conn.settimeout(60)
        conn.sendall(b"!")  # the client waits for it: both sides then know the path
        path, total, end = "none", 0, "eof"
        try:
            while chunk := conn.recv(1 << 20):
                total += len(chunk)
                path = getattr(conn, "cosock_path", "tcp") if path == "none" else path
        except OSError as exc:
            end = type(exc).__name__
        conn.close()
        print(json.dumps({"path": path, "bytes": total, "end": end}), flush=True)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def stream(host: str, port: int) -> None:
    s = socket.create_connection((host, port), timeout=60)
    block = os.urandom(1 << 16)
    assert s.recv(1) == b"!"
    print(json.dumps({"path": getattr(s, "cosock_path", "tcp")}), flush=True)
    while True:
        s.sendall(block)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "hash-server":
        hash_server(int(args[0]))
    elif cmd == "many":
        many(args[0], int(args[1]), int(args[2]), int(args[3]) if len(args) > 3 else None)
    elif cmd == "half-close":
        half_close(args[0], int(args[1]))
    elif cmd == "forge-offer":
        forge_offer(args[0], args[1], int(args[2]), args[3], int(args[4]))
    elif cmd == "sink-server":
        sink_server(int(args[0]))
    elif cmd == "stream":
        stream(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown command {cmd}")
