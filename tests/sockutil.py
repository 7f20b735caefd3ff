"""Small helpers shared by the socket-layer test modules."""

from __future__ import annotations

import socket

from cosock import CoSocket


def listener(family: int = socket.AF_INET, host: str = "127.0.0.1") -> CoSocket:
    """A listening CoSocket on an ephemeral port (registered with the test's agent)."""
    srv = CoSocket(family, socket.SOCK_STREAM)
    srv.bind((host, 0))
    srv.listen()
    return srv


def recv_all(sock: socket.socket, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only at EOF."""
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def settle(cli: socket.socket, conn: socket.socket) -> None:
    """One tiny exchange so both sides have seen the verdict (and their rings are empty)."""
    cli.sendall(b"?")
    assert conn.recv(1) == b"?"
    conn.sendall(b"!")
    assert cli.recv(1) == b"!"
