"""Small helpers shared by the socket-layer test modules."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from cosock import CoSocket


def listener(family: int = socket.AF_INET, host: str = "127.0.0.1") -> CoSocket:
    """A listening CoSocket on an ephemeral port (registered with the test's agent)."""
    srv = CoSocket(family, socket.SOCK_STREAM)
    srv.bind((host, 0))
    srv.listen()
    return srv


def wait_for(what: Callable[[], Any], timeout: float = 15.0) -> Any:
    """``what()`` once truthy, retried every 0.1 s (census files are written once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


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


@contextlib.contextmanager
def accelerated_pair(srv: CoSocket, timeout: float = 10) -> Iterator[tuple[CoSocket, CoSocket]]:
    """A client connected to ``srv`` and its accepted socket, both on shared memory
    (asserted); both closed afterwards."""
    cli = CoSocket(srv.family, socket.SOCK_STREAM)
    cli.settimeout(timeout)
    cli.connect(srv.getsockname()[:2])
    conn, _ = srv.accept()
    conn.settimeout(timeout)
    try:
        settle(cli, conn)
        assert cli.cosock_path == conn.cosock_path == "shm"
        yield cli, conn
    finally:
        cli.close()
        conn.close()


def stale_offer_plain_pair(memfd: int | None = None) -> tuple[CoSocket, socket.socket, CoSocket]:
    """A plain client whose 4-tuple matches an offer someone else queued (a stale or
    forged offer): returns (listener, plain client, accepted server socket)."""
    from cosock._offer import Offer
    from cosock._rendezvous import send_offer
    from cosock._ring import create_channel_fd

    srv = listener()
    assert srv._rv is not None
    plain = socket.socket()
    plain.settimeout(10)
    plain.bind(("127.0.0.1", 0))
    offer = Offer(
        client=plain.getsockname(),
        server=srv.getsockname(),
        nonce=os.urandom(16),
        capacity=1 << 16,
        family=4,
    )
    fd = create_channel_fd(1 << 16) if memfd is None else memfd
    send_offer(str(srv._rv[0].path), offer, fd)
    if memfd is None:
        os.close(fd)
    plain.connect(srv.getsockname())
    conn, _ = srv.accept()
    conn.settimeout(10)
    return srv, plain, conn
