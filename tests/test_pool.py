"""The channel pool (channels made ahead, never reused) and the cheaper set-up around it:
real memfds, real mappings, real forks, real connections through a real agent."""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from cosock import CoSocket, _pool
from cosock._ring import channel_size, map_channel_fd
from cosock._socket import _source_cache
from cosock.agent.client import AgentClient
from sockutil import listener, settle

CAP = 1 << 16


def _wait(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def _inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def _open_fds() -> int:
    """Descriptors a connection could leak: sockets, memfds, eventfds, epolls.  Not regular
    files: the census thread writes its file now and then (an fd open for a moment)."""
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own fd, or one closed meanwhile
        if not target.startswith("/") or target.startswith("/memfd:"):
            n += 1
    return n


def _memfd_maps() -> list[int]:
    """Inodes of this process's mappings of cosock memfds (one entry per mapping)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if "/memfd:cosock" in line:
                out.append(int(line.split()[4]))
    return out


def _inode_of_mapping(mm: mmap.mmap) -> int:
    """The memfd inode behind a mapping, from /proc/self/maps."""
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return int(line.split()[4])
    raise AssertionError("mapping not found")


@pytest.fixture
def pool() -> Iterator[_pool.ChannelPool]:
    p = _pool.ChannelPool(2)
    yield p
    p.close()


def test_every_channel_is_a_fresh_sealed_memfd(pool: _pool.ChannelPool) -> None:
    taken = [pool.take(CAP)]  # the first take starts the thread for this size
    deadline = time.monotonic() + 10
    while pool.ready() == 0:  # wait for it, however loaded the machine: then a hit is due
        assert time.monotonic() < deadline, "the pool thread made no channel in 10 s"
        time.sleep(0.01)
    taken += [pool.take(CAP) for _ in range(199)]
    try:
        assert len({_inode(fd) for fd, _ in taken}) == 200  # never one memfd twice
        for fd, mm in taken[:5]:
            assert len(mm) == channel_size(CAP)
            peer = map_channel_fd(fd, CAP)  # what the receiving listener checks
            peer.close()
        assert pool.hits > 0  # the thread did make channels ahead
    finally:
        for fd, mm in taken:
            mm.close()
            os.close(fd)


def test_stock_is_filled_ahead_and_released_on_close() -> None:
    before = _open_fds()
    p = _pool.ChannelPool(3)
    fd, mm = p.take(CAP)
    mm.close()
    os.close(fd)
    p.top_up()
    _wait(lambda: p.ready() == 3)
    assert _open_fds() >= before + 3  # a memfd each (and, before Python 3.13, mmap's dup)
    thread = p._thread
    assert thread is not None and thread.daemon
    p.close()
    assert p.ready() == 0
    assert not thread.is_alive()
    assert _open_fds() == before


def test_idle_thread_exits_and_comes_back_when_needed() -> None:
    p = _pool.ChannelPool(2, linger=0.1)
    try:
        fd, mm = p.take(CAP)
        mm.close()
        os.close(fd)
        p.top_up()
        first = p._thread
        assert first is not None
        _wait(lambda: p.ready() == 2 and not first.is_alive())  # idle: no extra thread
        assert p._thread is None
        for _ in range(3):  # more than the stock: the next top-up needs a new thread
            fd, mm = p.take(CAP)
            mm.close()
            os.close(fd)
        p.top_up()
        assert p._thread is not None and p._thread is not first
        _wait(lambda: p.ready() == 2)
    finally:
        p.close()


def test_pool_of_zero_makes_channels_on_demand_without_a_thread() -> None:
    p = _pool.ChannelPool(0)
    fd, mm = p.take(CAP)
    p.top_up()
    assert p._thread is None and p.ready() == 0
    mm.close()
    os.close(fd)
    p.close()


def test_ring_size_change_discards_the_old_stock(pool: _pool.ChannelPool) -> None:
    fd, mm = pool.take(CAP)
    mm.close()
    os.close(fd)
    pool.top_up()
    _wait(lambda: pool.ready() == 2)
    fd, mm = pool.take(CAP * 2)
    try:
        assert len(mm) == channel_size(CAP * 2)
        map_channel_fd(fd, CAP * 2).close()
    finally:
        mm.close()
        os.close(fd)
    pool.top_up()
    _wait(lambda: pool.ready() == 2)
    fd, mm = pool.take(CAP * 2)
    assert len(mm) == channel_size(CAP * 2)
    mm.close()
    os.close(fd)


def test_forked_child_never_uses_or_keeps_the_parents_stock() -> None:
    p = _pool.pool()
    fd, mm = p.take(CAP)
    mm.close()
    os.close(fd)
    p.top_up()
    _wait(lambda: p.ready() == p.target)
    stocked = {_inode(item[1]) for item in list(p._ready)}
    assert stocked
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report, then leave without running any test teardown
        try:
            os.close(r)
            child = _pool.pool()
            kept = stocked & set(_memfd_maps())
            assert child.ready() == 0
            cfd, _ = child.take(CAP)
            fresh = _inode(cfd) not in stocked
            ok = child is p and not kept and fresh
            os.write(w, b"ok" if ok else f"bad: kept {kept}, fresh {fresh}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = f.read()
    os.waitpid(pid, 0)
    assert answer == b"ok"
    # The parent's stock is intact and still only its own.
    assert {_inode(item[1]) for item in list(p._ready)} == stocked


@pytest.mark.usefixtures("cosock_agent")
def test_two_hundred_connects_share_no_memfd_and_leak_nothing() -> None:
    srv = listener()
    inodes: list[int] = []

    def one() -> None:
        cli = CoSocket(socket.AF_INET, socket.SOCK_STREAM)
        cli.settimeout(10)
        cli.connect(srv.getsockname())
        conn, _ = srv.accept()
        conn.settimeout(10)
        try:
            settle(cli, conn)
            assert cli.cosock_path == conn.cosock_path == "shm"
            assert cli._co is not None and conn._co is not None
            inode = _inode_of_mapping(cli._co.mm)
            assert _inode_of_mapping(conn._co.mm) == inode  # one channel, both ends
            inodes.append(inode)
        finally:
            cli.close()
            conn.close()

    try:
        one()  # starts the pool
        p = _pool.pool()
        _wait(lambda: p.ready() == p.target)
        # The agent client's wake-up fd (an epoll, one per client) is made by the residency
        # watch on its first round with a live connection: after the first connection or
        # during the loop, as the scheduler has it.  Made now, it is part of the baseline.
        client = AgentClient.current()
        assert client is not None
        client.wait_fileno()
        fds, maps = _open_fds(), len(_memfd_maps())
        for _ in range(200):
            one()
        _wait(lambda: p.ready() == p.target)
        assert _open_fds() == fds
        assert len(_memfd_maps()) == maps
        assert len(set(inodes)) == len(inodes) == 201
    finally:
        srv.close()


@pytest.mark.usefixtures("cosock_agent")
def test_stale_cached_source_address_is_probed_again() -> None:
    srv = listener()
    try:
        dest = srv.getsockname()
        # A source address we no longer own (TEST-NET-1): binding it fails.
        _source_cache[(socket.AF_INET, dest[0], 0)] = ("192.0.2.1", time.monotonic() + 60)
        cli = CoSocket(socket.AF_INET, socket.SOCK_STREAM)
        cli.settimeout(10)
        cli.connect(dest)
        conn, _ = srv.accept()
        conn.settimeout(10)
        settle(cli, conn)
        assert cli.cosock_path == "shm"
        assert cli.getsockname()[0] == "127.0.0.1"
        assert _source_cache[(socket.AF_INET, dest[0], 0)][0] == "127.0.0.1"
        cli.close()
        conn.close()
    finally:
        srv.close()


@pytest.mark.usefixtures("cosock_agent")
def test_concurrent_connects_from_threads_each_get_their_own_channel() -> None:
    srv = listener()
    errors: list[BaseException] = []
    inodes: list[int] = []
    lock = threading.Lock()

    def serve() -> None:
        for _ in range(40):
            conn, _ = srv.accept()
            conn.settimeout(10)
            data = conn.recv(1)
            conn.sendall(data)
            conn.close()

    def client() -> None:
        try:
            for _ in range(10):
                cli = CoSocket(socket.AF_INET, socket.SOCK_STREAM)
                cli.settimeout(10)
                cli.connect(srv.getsockname())
                cli.sendall(b"x")
                assert cli.recv(1) == b"x"
                assert cli._co is not None
                with lock:
                    inodes.append(_inode_of_mapping(cli._co.mm))
                cli.close()
        except BaseException as exc:
            errors.append(exc)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    clients = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(timeout=60)
    server.join(timeout=60)
    srv.close()
    assert not errors
    assert len(inodes) == 40 and len(set(inodes)) == 40
