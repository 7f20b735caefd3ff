"""Fault matrix (issue 6, part 3): peers killed or exiting mid-stream, the agent killed and
restarted, descriptor and ring-memory limits, a guest namespace deleted.

Outcome checked each time: the victim fails like TCP would (EOF after every byte, or a
reset), within a bounded time; other connections carry on; fallbacks carry their reason;
nothing leaks (``leak_check``).  Already covered elsewhere: peer killed while the reader
waits in ``MSG_WAITALL`` (test_socket_adversarial), agent killed without restart in a lab
(test_lab_paths).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import start_agent
from cosock import CoSocket
from cosock._errors import FallbackReason
from sockutil import listener, recv_all, settle

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20


@contextlib.contextmanager
def child(code: str, **kw: Any) -> Iterator[subprocess.Popen[str]]:
    """A Python child running ``code``; killed and reaped on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def said(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, f"child said nothing (exit {proc.poll()})"
    return line


_PEER = """
    import os, socket, sys, time
    from cosock import CoSocket
    role, port, action = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if role == "client":
        s = CoSocket(); s.settimeout(30); s.connect(("127.0.0.1", port))
    else:
        srv = CoSocket(); srv.bind(("127.0.0.1", 0)); srv.listen()
        print(srv.getsockname()[1], flush=True)
        s, _ = srv.accept(); s.settimeout(30)
    s.sendall(b"?"); assert s.recv(1) == b"!"
    print(s.cosock_path, flush=True)
    if action == "send-then-exit":
        s.sendall(bytes(range(256)) * 2000)  # 512000 bytes, then exit with ours unread
        print("sent", flush=True)
        sys.exit(0)
    time.sleep(60)  # hold the connection (reading nothing) until killed
"""


@contextlib.contextmanager
def child_argv(args: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_PEER), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@contextlib.contextmanager
def peer_pair(peer: str, action: str = "hold") -> Iterator[tuple[CoSocket, subprocess.Popen[str]]]:
    """Our end of an accelerated connection to a process playing ``peer`` (client/server)."""
    if peer == "client":
        srv = listener()
        with child_argv(["client", str(srv.getsockname()[1]), action]) as proc:
            try:
                ours, _ = srv.accept()
            finally:
                srv.close()
            with ours:
                ours.settimeout(30)
                assert ours.recv(1) == b"?"
                ours.sendall(b"!")
                assert said(proc) == "shm"
                assert ours.cosock_path == "shm"
                yield ours, proc
    else:
        with child_argv(["server", "0", action]) as proc:
            port = int(said(proc))
            with CoSocket() as ours:
                ours.settimeout(30)
                ours.connect(("127.0.0.1", port))
                assert ours.recv(1) == b"?"
                ours.sendall(b"!")
                assert said(proc) == "shm"
                yield ours, proc


def kill_later(proc: subprocess.Popen[str], delay: float = 0.5) -> threading.Timer:
    timer = threading.Timer(delay, lambda: proc.send_signal(signal.SIGKILL))
    timer.start()
    return timer


# --------------------------------------------------------------------------- peers


@pytest.mark.usefixtures("leak_check", "cosock_agent")
@pytest.mark.parametrize("peer", ["client", "server"])
def test_peer_killed_while_we_are_blocked_in_recv(peer: str) -> None:
    with peer_pair(peer) as (ours, proc):
        timer = kill_later(proc)
        t0 = time.monotonic()
        try:
            got = ours.recv(100)  # blocked: the peer holds the connection, sends nothing
        except ConnectionResetError:
            got = b""
        timer.join()
        assert got == b""
        assert time.monotonic() - t0 < 20, "recv did not notice the dead peer promptly"


@pytest.mark.usefixtures("leak_check", "cosock_agent")
@pytest.mark.parametrize("peer", ["client", "server"])
def test_peer_killed_while_we_are_blocked_in_send_on_a_full_ring(peer: str) -> None:
    with peer_pair(peer) as (ours, proc):
        timer = kill_later(proc)
        t0 = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(64):  # 64 MiB: far more than the ring; the peer reads nothing
                ours.sendall(b"x" * MIB)
        timer.join()
        assert time.monotonic() - t0 < 20, "send did not notice the dead peer promptly"


@pytest.mark.usefixtures("leak_check", "cosock_agent")
@pytest.mark.parametrize("peer", ["client", "server"])
def test_peer_exits_with_our_data_unread_we_still_get_all_of_its_data(peer: str) -> None:
    with peer_pair(peer, "send-then-exit") as (ours, proc):
        ours.sendall(b"never read" * 10000)
        assert said(proc) == "sent"
        assert proc.wait(10) == 0
        expect = bytes(range(256)) * 2000
        got = recv_all(ours, len(expect) + 1)  # + 1: then EOF, not more
        assert hashlib.sha256(got).digest() == hashlib.sha256(expect).digest()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(200):  # the peer is gone: writing must fail, not block
                ours.sendall(b"y" * 65536)
                time.sleep(0.01)


# --------------------------------------------------------------------------- agent


@pytest.fixture
def own_agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """An agent this test may kill -9 and restart on the same path."""
    import shutil
    import tempfile

    from cosock.agent.client import AgentClient

    short = Path(tempfile.mkdtemp(prefix="csa-", dir="/tmp"))
    box: dict[str, Any] = {"path": short / "agent.sock"}
    box["proc"] = start_agent(box["path"])
    monkeypatch.setenv("COSOCK_AGENT", str(box["path"]))
    AgentClient.reset_shared()
    yield box
    AgentClient.reset_shared()
    box["proc"].kill()
    box["proc"].wait()
    shutil.rmtree(short, ignore_errors=True)


def _transfer(cli: socket.socket, conn: socket.socket, size: int = 3 * MIB) -> None:
    data = os.urandom(size)
    box: list[bytes] = []
    t = threading.Thread(target=lambda: box.append(recv_all(conn, size)))
    t.start()
    cli.sendall(data)
    t.join(30)
    assert box and hashlib.sha256(box[0]).digest() == hashlib.sha256(data).digest()


def _connect(srv: CoSocket) -> tuple[CoSocket, CoSocket]:
    cli = CoSocket()
    cli.settimeout(10)
    cli.connect(srv.getsockname())
    conn, _ = srv.accept()
    conn.settimeout(10)
    settle(cli, conn)
    return cli, conn


@pytest.mark.usefixtures("leak_check")
def test_agent_killed_and_restarted(own_agent: dict[str, Any]) -> None:
    """Live accelerated connections never notice; new ones fall back with a reason while the
    agent is down, and are accelerated again once it is back (listeners re-register)."""
    srv = listener()
    socks: list[socket.socket] = [srv]
    try:
        live = _connect(srv)
        socks += live
        assert live[0].cosock_path == "shm"

        own_agent["proc"].kill()
        own_agent["proc"].wait()
        _transfer(*live)
        time.sleep(1.1)  # the client's reconnect interval: it tries (and fails) once
        down = _connect(srv)
        socks += down
        assert down[0].cosock_path == "tcp"
        assert down[0].cosock_fallback_reason is FallbackReason.AGENT_UNREACHABLE
        _transfer(*down)

        own_agent["proc"] = start_agent(own_agent["path"])
        deadline = time.monotonic() + 15
        while True:
            again = _connect(srv)
            socks += again
            if again[0].cosock_path == "shm" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert again[0].cosock_path == again[1].cosock_path == "shm"
        _transfer(*again)
        _transfer(*live)
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------- limits


@pytest.mark.usefixtures("leak_check", "cosock_agent")
def test_no_descriptors_left_for_a_memfd_falls_back_with_reason_resource() -> None:
    srv = listener()
    code = f"""
        import hashlib, os, resource
        from cosock import CoSocket
        from cosock.agent.client import AgentClient
        AgentClient.shared().lookup("127.0.0.1", {srv.getsockname()[1]})  # agent link first
        s = CoSocket(); s.settimeout(30); s.bind(("127.0.0.1", 0))
        top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))  # no descriptor left: memfd_create must fail
        s.connect(("127.0.0.1", {srv.getsockname()[1]}))
        data = os.urandom(200000); s.sendall(data)
        print(s.cosock_path, s.cosock_fallback_reason.value,
              s.recv(64, 0x100) == hashlib.sha256(data).hexdigest().encode(), flush=True)
    """
    try:
        with child(code) as proc:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(30)
                got = recv_all(conn, 200000)
                conn.sendall(hashlib.sha256(got).hexdigest().encode())
                assert said(proc) == "tcp resource True"
                assert conn.cosock_path == "tcp"
    finally:
        srv.close()


@pytest.mark.usefixtures("leak_check", "cosock_agent")
def test_ring_larger_than_the_servers_cap_falls_back_with_reason_resource(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    srv = listener()
    try:
        monkeypatch.setenv("COSOCK_RING_SIZE", str(4 * MIB))  # the client's ring...
        cli = CoSocket()
        cli.settimeout(10)
        cli.connect(srv.getsockname())
        monkeypatch.setenv("COSOCK_RING_SIZE", str(MIB))  # ...and the server's settings
        monkeypatch.setenv("COSOCK_RING_MAX", str(2 * MIB))
        conn, _ = srv.accept()
        with cli, conn:
            conn.settimeout(10)
            assert conn.cosock_fallback_reason is FallbackReason.RESOURCE
            _transfer(cli, conn)
            assert cli.cosock_fallback_reason is FallbackReason.RESOURCE
            assert cli.cosock_path == conn.cosock_path == "tcp"
    finally:
        srv.close()


# --------------------------------------------------------------------------- guests


@pytest.mark.usefixtures("leak_check")
@pytest.mark.timeout(180)
def test_guest_namespace_deleted_mid_stream(lab_factory: Any) -> None:
    """Guest h1g2 streams to h1g1 over shared memory, then the guest is destroyed (every
    process in it killed, its namespace deleted): the server's connection ends (EOF or
    reset) instead of hanging, and h1g3 still gets an accelerated connection."""
    import json
    import select

    from cosock._run import run_env
    from cosock.lab import _netns

    peers = str(Path(__file__).with_name("lab_peers.py"))
    lab = lab_factory(hosts=1, guests=3)
    env = {g: run_env(lab.env(g), start_agent=False) for g in ("h1g1", "h1g2", "h1g3")}
    ip = lab.guest("h1g1").addresses[0]

    def popen(guest: str, *argv: str) -> subprocess.Popen[str]:
        return lab.popen(
            guest,
            [sys.executable, peers, *argv],
            env=env[guest],
            stdout=subprocess.PIPE,
            text=True,
        )

    def line(proc: subprocess.Popen[str], timeout: float = 20) -> dict[str, Any]:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready, "no report within the time limit (a hang)"
        result: dict[str, Any] = json.loads(proc.stdout.readline())
        return result

    server = popen("h1g1", "sink-server", "7200")
    procs = [server]
    try:
        assert line(server) == {"listening": 7200}
        victim = popen("h1g2", "stream", ip, "7200")
        procs.append(victim)
        assert line(victim) == {"path": "shm"}
        time.sleep(0.5)  # mid-stream
        ns = lab.guest("h1g2").netns
        key = _netns.netns_key(ns)
        assert key is not None
        _netns.kill_all_in({key})
        _netns.remove_netns(ns)
        victim.wait(10)
        report = line(server)
        assert report["path"] == "shm" and report["bytes"] > 0
        assert report["end"] in ("eof", "ConnectionResetError")
        other = popen("h1g3", "stream", ip, "7200")
        procs.append(other)
        assert line(other) == {"path": "shm"}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.mark.usefixtures("leak_check")
def test_agent_restart_server_in_another_process_is_accelerated_again(
    own_agent: dict[str, Any],
) -> None:
    """The listener lives in a process that only accept()s (it never looks anything up):
    after the agent comes back it must still re-register, or no client is accelerated
    again."""
    import json

    from cosock._rendezvous import _sender  # noqa: F401 - created by our offers below

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen(
        [sys.executable, "-m", "cosock.torture", "server", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )

    def attempt() -> str:
        with CoSocket() as cli:
            cli.settimeout(10)
            cli.connect(("127.0.0.1", port))
            up = b"hello"
            cli.sendall(b"".join(x.to_bytes(8, "big") for x in (len(up), 0, 1)) + b"\0" + up)
            assert recv_all(cli, 32) == hashlib.sha256(up).digest()
            return cli.cosock_path

    try:
        assert server.stdout is not None
        assert json.loads(server.stdout.readline()) == {"listening": port}
        assert attempt() == "shm"
        own_agent["proc"].kill()
        own_agent["proc"].wait()
        time.sleep(1.1)
        assert attempt() == "tcp"
        own_agent["proc"] = start_agent(own_agent["path"])
        deadline = time.monotonic() + 15
        paths = []
        while time.monotonic() < deadline:
            paths.append(attempt())
            if paths[-1] == "shm":
                break
            time.sleep(0.3)
        assert paths[-1] == "shm", f"never accelerated again: {paths}"
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()
