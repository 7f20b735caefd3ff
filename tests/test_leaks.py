"""What the library must free by itself, found by making ``leak_check`` cover every test:
a socket dropped without ``close()`` while the residency watch runs, and a private agent
(bench and demo worlds without root) once its ``with`` block ends.  Real sockets, a real
agent, real processes."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable

import pytest

from cosock import CoSocket, _residency
from cosock._leaks import compare, snapshot
from cosock.agent.server import private_agent
from sockutil import listener, settle


def _until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        gc.collect()
        time.sleep(0.02)
    return True


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _watching() -> bool:
    return any(t.name == "cosock-residency" for t in threading.enumerate())


@pytest.mark.usefixtures("cosock_agent")
def test_a_dropped_accelerated_socket_is_freed_while_the_watch_runs() -> None:
    """Python closes a socket that is dropped without close(); so must cosock, with its
    memfd and mapping, although the residency watch keeps looking at live connections
    (it used to hold them in its frame while it slept: freed never, watched for ever)."""
    srv = listener()
    cli = CoSocket()
    cli.settimeout(10)
    try:
        cli.connect(srv.getsockname())
        conn, _ = srv.accept()
        conn.settimeout(10)
        settle(cli, conn)
        assert conn.cosock_path == "shm" and conn._co is not None
        assert _until(_watching), "the residency watch did not start"
        fd = conn.fileno()
        before = snapshot()
        time.sleep(3 * _residency._RECHECK_MS / 1000)  # the watch has judged it meanwhile
        del conn
        assert _until(lambda: not _is_open(fd)), "the dropped socket's fd stays open"
        gone = compare(snapshot(), before)
        assert gone["memfds"] and gone["mappings"], gone  # its channel went with it
        assert _watching()  # the client is still live: the watch carries on
    finally:
        cli.close()
        srv.close()


def test_a_private_agent_is_stopped_and_reaped_when_its_block_ends() -> None:
    """The loopback bench and demo worlds: their agent exits and is waited for, so no
    zombie (nor a running agent) outlives the world."""
    with private_agent("cosock-test-") as path:
        assert path.exists()
        kids = snapshot().processes
        assert kids
    assert not (kids & snapshot().processes)
