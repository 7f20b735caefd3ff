"""Raw ``select.select`` and ``select.poll`` under ``cosock.enable()``: an accelerated
CoSocket is readable exactly when ``recv`` would not block and writable exactly when its
ring has room, in one call together with pipes and plain sockets."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Iterator

import pytest

import cosock
from cosock import CoSocket
from cosock._intercept import get_original
from sockutil import settle

pytestmark = pytest.mark.usefixtures("cosock_agent")


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    """An accelerated pair (small rings), a plain TCP pair and a pipe, under enable()."""
    monkeypatch.setenv("COSOCK_RING_SIZE", "65536")
    cosock.enable()
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname(), timeout=10)
    conn, _ = srv.accept()
    conn.settimeout(10)
    settle(cli, conn)
    assert isinstance(cli, CoSocket) and cli.cosock_path == conn.cosock_path == "shm"
    plain_cls = get_original(socket, "socket")
    psrv = plain_cls()
    psrv.bind(("127.0.0.1", 0))
    psrv.listen()
    pcli = plain_cls()
    pcli.connect(psrv.getsockname())
    pconn, _ = psrv.accept()
    rfd, wfd = os.pipe()
    try:
        yield {"cli": cli, "conn": conn, "pcli": pcli, "pconn": pconn, "r": rfd, "w": wfd}
    finally:
        cosock.disable()
        for s in (cli, conn, srv, pcli, pconn, psrv):
            s.close()
        os.close(rfd)
        os.close(wfd)


def test_select_is_exact_for_rings_mixed_with_pipes_and_plain_sockets(world):
    cli, conn, pcli, pconn, r, w = (world[k] for k in ("cli", "conn", "pcli", "pconn", "r", "w"))
    assert select.select is not get_original(select, "select")
    t0 = time.monotonic()
    assert select.select([cli, pcli, r], [], [], 0.2) == ([], [], [])
    assert time.monotonic() - t0 >= 0.15  # a timeout, not an early empty answer
    conn.sendall(b"0123456789")
    pconn.sendall(b"p")
    os.write(w, b"x")
    time.sleep(0.05)
    assert select.select([r, cli, pcli], [], [], 5) == ([r, cli, pcli], [], [])
    assert cli.recv(4) == b"0123"  # partial read: the rest stays readable
    assert select.select([cli], [], [], 0)[0] == [cli]
    assert cli.recv(100) == b"456789"
    assert select.select([cli, cli.fileno()], [], [], 0.05) == ([], [], [])
    # Writable exactly while the ring has room (the TCP fd itself is always writable).
    assert select.select([], [cli, pcli], [], 0) == ([], [cli, pcli], [])
    cli.setblocking(False)
    with pytest.raises(BlockingIOError):
        for _ in range(100):
            cli.send(b"f" * 8192)
    assert select.select([], [cli], [], 0.1) == ([], [], [])
    assert len(conn.recv(65536)) > 0  # the reader makes room: writable again
    assert select.select([], [cli], [], 5) == ([], [cli], [])
    conn.shutdown(socket.SHUT_WR)
    assert select.select([cli], [], [], 5)[0] == [cli]  # EOF is readable


def test_poll_is_exact_for_rings_mixed_with_pipes_and_plain_sockets(world):
    cli, conn, pcli, pconn, r, w = (world[k] for k in ("cli", "conn", "pcli", "pconn", "r", "w"))
    p = select.poll()
    for obj in (cli, pcli, r):
        p.register(obj, select.POLLIN)
    t0 = time.monotonic()
    assert p.poll(200) == []
    assert time.monotonic() - t0 >= 0.15
    conn.sendall(b"abcdef")
    os.write(w, b"x")
    pconn.sendall(b"y")
    time.sleep(0.05)
    got = dict(p.poll(5000))
    assert got == {cli.fileno(): select.POLLIN, pcli.fileno(): select.POLLIN, r: select.POLLIN}
    assert cli.recv(2) == b"ab"
    assert dict(p.poll(0)).get(cli.fileno()) == select.POLLIN
    assert cli.recv(10) == b"cdef"
    os.read(r, 1)
    pcli.recv(1)
    assert p.poll(50) == []
    p.modify(cli, select.POLLOUT)
    assert p.poll(0) == [(cli.fileno(), select.POLLOUT)]
    cli.setblocking(False)
    with pytest.raises(BlockingIOError):
        for _ in range(100):
            cli.send(b"f" * 8192)
    assert p.poll(100) == []
    conn.recv(65536)
    assert p.poll(5000) == [(cli.fileno(), select.POLLOUT)]
    p.unregister(cli)
    with pytest.raises(KeyError):
        p.unregister(cli)


def fill(sock: socket.socket) -> None:
    """Write until the ring is full (the socket is left non-blocking)."""
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        for _ in range(100):
            sock.send(b"f" * 8192)


def test_epoll_level_triggered_mixed(world):
    cli, conn, pcli, pconn, r, w = (world[k] for k in ("cli", "conn", "pcli", "pconn", "r", "w"))
    with select.epoll() as ep:
        assert isinstance(ep, select.epoll)
        for obj in (cli, pcli, r):
            ep.register(obj, select.EPOLLIN)
        with pytest.raises(FileExistsError):
            ep.register(cli, select.EPOLLIN)
        t0 = time.monotonic()
        assert ep.poll(0.2) == []
        assert time.monotonic() - t0 >= 0.15
        conn.sendall(b"abcdef")
        os.write(w, b"x")
        pconn.sendall(b"y")
        time.sleep(0.05)
        got = dict(ep.poll(5))
        assert got == {
            cli.fileno(): select.EPOLLIN,
            pcli.fileno(): select.EPOLLIN,
            r: select.EPOLLIN,
        }
        assert cli.recv(2) == b"ab"
        assert dict(ep.poll(0)).get(cli.fileno()) == select.EPOLLIN  # level: still there
        assert len(ep.poll(0, maxevents=1)) == 1
        assert cli.recv(10) == b"cdef"
        os.read(r, 1)
        pcli.recv(1)
        assert ep.poll(0.05) == []
        ep.modify(cli, select.EPOLLOUT)
        assert ep.poll(0) == [(cli.fileno(), select.EPOLLOUT)]
        fill(cli)
        assert ep.poll(0.1) == []
        conn.recv(65536)
        assert ep.poll(5) == [(cli.fileno(), select.EPOLLOUT)]
        ep.unregister(cli)
        with pytest.raises(FileNotFoundError):
            ep.modify(cli, select.EPOLLIN)
    assert ep.closed


def test_epoll_edge_triggered_and_oneshot(world):
    cli, conn = world["cli"], world["conn"]
    ep = select.epoll()
    ep.register(cli, select.EPOLLIN | select.EPOLLET)
    conn.sendall(b"12345")
    assert ep.poll(5) == [(cli.fileno(), select.EPOLLIN)]
    assert ep.poll(0.05) == []  # edge-triggered: reported once while it stays readable
    cli.setblocking(False)
    assert cli.recv(100) == b"12345"
    with pytest.raises(BlockingIOError):
        cli.recv(100)  # read until EAGAIN, as edge-triggered callers do
    conn.sendall(b"678")
    assert ep.poll(5) == [(cli.fileno(), select.EPOLLIN)]  # a new edge
    assert cli.recv(100) == b"678"
    ep.modify(cli, select.EPOLLIN | select.EPOLLONESHOT)
    conn.sendall(b"a")
    assert ep.poll(5) == [(cli.fileno(), select.EPOLLIN)]
    conn.sendall(b"b")
    assert ep.poll(0.05) == []  # one shot: disabled until modify()
    ep.modify(cli, select.EPOLLIN | select.EPOLLONESHOT)
    assert ep.poll(5) == [(cli.fileno(), select.EPOLLIN)]
    assert cli.recv(10) == b"ab"
    ep.close()


def test_disable_restores_select_exactly():
    originals = select.select, select.poll, select.epoll
    cosock.enable()
    try:
        assert (select.select, select.poll, select.epoll) != originals
    finally:
        cosock.disable()
    assert (select.select, select.poll, select.epoll) == originals
