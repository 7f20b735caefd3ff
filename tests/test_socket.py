"""CoSocket on loopback guests (no root needed): the real shared-memory data path between
real sockets, a real agent, real processes.  Each behaviour is checked on the shm path
and, where it matters, against plain TCP for parity."""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cosock import CoSocket, FallbackReason
from cosock.agent.client import AgentClient
from sockutil import listener, recv_all, settle, stale_offer_plain_pair

pytestmark = pytest.mark.usefixtures("cosock_agent")


@contextlib.contextmanager
def pair(
    family: int = socket.AF_INET, host: str = "127.0.0.1", client_cls: type = CoSocket
) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected (client, server-side) pair through a CoSocket listener."""
    srv = listener(family, host)
    cli = client_cls(family, socket.SOCK_STREAM)
    cli.settimeout(10)
    cli.connect(srv.getsockname()[:2])
    conn, _ = srv.accept()
    conn.settimeout(10)
    try:
        yield cli, conn
    finally:
        cli.close()
        conn.close()
        srv.close()


def test_loopback_connection_takes_shared_memory():
    with pair() as (cli, conn):
        settle(cli, conn)
        assert cli.cosock_path == "shm"
        assert conn.cosock_path == "shm"
        assert cli.getpeername() == conn.getsockname()
        assert cli.getsockname() == conn.getpeername()


def test_ipv6_loopback_takes_shared_memory():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with pair(socket.AF_INET6, "::1") as (cli, conn):
        settle(cli, conn)
        assert (cli.cosock_path, conn.cosock_path) == ("shm", "shm")


def test_bytes_exact_both_ways_across_many_wraps():
    data = os.urandom(5 * 1024 * 1024 + 17)  # ring default 1 MiB: wraps several times
    with pair() as (cli, conn):
        t = threading.Thread(target=lambda: conn.sendall(recv_all(conn, len(data))[::-1]))
        t.start()
        cli.sendall(data)
        back = recv_all(cli, len(data))
        t.join()
        assert back == data[::-1]
        assert cli.cosock_path == "shm"


def test_half_close_eof_then_reply():
    with pair() as (cli, conn):
        cli.sendall(b"request")
        cli.shutdown(socket.SHUT_WR)
        assert recv_all(conn, 100) == b"request"  # EOF ends it
        assert conn.recv(10) == b""
        conn.sendall(b"reply")
        conn.close()
        assert recv_all(cli, 100) == b"reply"
        assert cli.recv(10) == b""
        with pytest.raises(BrokenPipeError):
            cli.send(b"more")


def test_eof_after_peer_close_with_data_pending():
    with pair() as (cli, conn):
        conn.sendall(b"last words")
        conn.close()
        assert recv_all(cli, 100) == b"last words"
        assert cli.recv(1) == b""


@pytest.mark.parametrize("use_cosock", [False, True], ids=["tcp", "cosock"])
def test_flags_peek_waitall_dontwait(use_cosock):
    cls = CoSocket if use_cosock else socket.socket
    with pair(client_cls=cls) as (cli, conn):
        if use_cosock:
            settle(cli, conn)
        cli.settimeout(None)  # CPython polls for the timeout first, even with MSG_DONTWAIT
        with pytest.raises(BlockingIOError):
            cli.recv(10, socket.MSG_DONTWAIT)
        conn.sendall(b"abcdef")
        time.sleep(0.05)
        assert cli.recv(3, socket.MSG_PEEK) == b"abc"
        assert cli.recv(3, socket.MSG_PEEK) == b"abc"
        threading.Timer(0.1, lambda: conn.sendall(b"ghij")).start()
        assert cli.recv(10, socket.MSG_WAITALL) == b"abcdefghij"


@pytest.mark.parametrize("use_cosock", [False, True], ids=["tcp", "cosock"])
def test_nonblocking_and_timeout(use_cosock):
    cls = CoSocket if use_cosock else socket.socket
    with pair(client_cls=cls) as (cli, conn):
        if use_cosock:
            settle(cli, conn)
        cli.setblocking(False)
        assert cli.getblocking() is False and cli.gettimeout() == 0.0
        with pytest.raises(BlockingIOError):
            cli.recv(1)
        cli.settimeout(0.2)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            cli.recv(1)
        assert 0.15 < time.monotonic() - t0 < 2.0
        cli.settimeout(None)
        assert cli.gettimeout() is None and cli.getblocking()


def test_nonblocking_send_fills_ring_then_blocks_cleanly(monkeypatch):
    monkeypatch.setenv("COSOCK_RING_SIZE", "65536")
    with pair() as (cli, conn):
        settle(cli, conn)
        cli.setblocking(False)
        total = 0
        with pytest.raises(BlockingIOError):
            for _ in range(100):
                total += cli.send(b"x" * 10000)
        assert 0 < total <= 65536 + 1
        assert recv_all(conn, total) == b"x" * total
        assert cli.send(b"y") == 1


def test_send_timeout_when_peer_never_reads(monkeypatch):
    monkeypatch.setenv("COSOCK_RING_SIZE", "65536")
    with pair() as (cli, conn):
        settle(cli, conn)
        cli.settimeout(0.3)
        with pytest.raises(TimeoutError):
            cli.sendall(b"z" * 200_000)


def test_select_poll_epoll_readability():
    with pair() as (cli, conn):
        settle(cli, conn)
        assert select.select([cli], [], [], 0)[0] == []
        conn.sendall(b"ping")
        assert select.select([cli], [], [], 5)[0] == [cli]
        poller = select.poll()
        poller.register(cli, select.POLLIN)
        assert poller.poll(5000)
        ep = select.epoll()
        ep.register(cli.fileno(), select.EPOLLIN)
        assert ep.poll(5)
        assert cli.recv(4) == b"ping"
        # Drained: no longer readable (the doorbells for what we read were consumed).
        assert select.select([cli], [], [], 0.05)[0] == []
        ep.close()
        assert select.select([], [cli], [], 0)[1] == [cli]


def test_selectors_nonblocking_echo():
    import selectors

    with pair() as (cli, conn):
        settle(cli, conn)
        sel = selectors.DefaultSelector()
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ)
        payload = os.urandom(300_000)
        echoed = bytearray()
        sender = threading.Thread(target=cli.sendall, args=(payload,))
        sender.start()
        deadline = time.monotonic() + 20
        while len(echoed) < len(payload) and time.monotonic() < deadline:
            for _key, _ in sel.select(timeout=1):
                try:
                    chunk = conn.recv(65536)
                except BlockingIOError:
                    continue
                echoed += chunk
        sender.join()
        sel.close()
        assert bytes(echoed) == payload


def test_makefile_lines_and_binary():
    with pair() as (cli, conn):
        wf = cli.makefile("wb")
        rf = conn.makefile("rb")
        wf.write(b"HELO there\r\n" + b"x" * 100_000 + b"\r\n")
        wf.flush()
        assert rf.readline() == b"HELO there\r\n"
        assert len(rf.readline()) == 100_002
        wf.close()
        rf.close()
        assert cli.cosock_path == "shm"


def test_sendmsg_recvmsg_recv_into():
    with pair() as (cli, conn):
        assert cli.sendmsg([b"ab", memoryview(b"cd"), bytearray(b"ef")]) == 6
        data, anc, _flags, _addr = conn.recvmsg(6)
        assert data[:6] == b"abcdef"[: len(data)]
        rest = recv_all(conn, 6 - len(data))
        assert data + rest == b"abcdef"
        assert anc == []
        buf = bytearray(10)
        cli.sendall(b"12345")
        n = conn.recv_into(buf, 5)
        assert bytes(buf[:n]) == b"12345"[:n]


def test_setsockopt_passthrough():
    with pair() as (cli, conn):
        settle(cli, conn)
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        assert cli.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert cli.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def test_dup_shares_the_channel_and_detach_returns_fd():
    with pair() as (cli, conn):
        settle(cli, conn)
        twin = cli.dup()
        assert twin.fileno() != cli.fileno()
        conn.sendall(b"via dup")
        assert recv_all(twin, 7) == b"via dup"
        cli.close()
        twin.sendall(b"still open")
        assert recv_all(conn, 10) == b"still open"
        twin.close()
        assert conn.recv(1) == b""
    with pair() as (cli, conn):
        fd = cli.detach()
        assert fd >= 0 and cli.fileno() == -1
        os.close(fd)


def test_context_manager_closes():
    srv = listener()
    with CoSocket() as cli:
        cli.connect(srv.getsockname())
        conn, _ = srv.accept()
    assert cli.fileno() == -1
    assert conn.recv(1) == b""
    conn.close()
    srv.close()


def test_plain_client_to_cosock_server_is_plain_tcp():
    with pair(client_cls=socket.socket) as (cli, conn):
        cli.sendall(b"plain hello")
        assert recv_all(conn, 11) == b"plain hello"
        conn.sendall(b"plain reply")
        assert recv_all(cli, 11) == b"plain reply"
        assert conn.cosock_path == "tcp"
        assert conn.cosock_fallback_reason is FallbackReason.NO_OFFER


@pytest.mark.parametrize("first", [b"C", b"CS", b"CSK"])
def test_plain_client_whose_first_bytes_look_like_the_start_of_a_hello(first: bytes) -> None:
    """An interactive plain client's first segment ("C", as in CONNECT) is all that has
    arrived when accept() returns: the server must not take it for a cosock HELLO."""
    srv = listener()
    cli = socket.create_connection(srv.getsockname())
    try:
        cli.sendall(first)
        time.sleep(0.05)  # the first segment is queued before accept() looks
        conn, _ = srv.accept()
        try:
            cli.sendall(b"ONNECT example:443\r\n")
            want = first + b"ONNECT example:443\r\n"
            conn.settimeout(5)
            assert recv_all(conn, len(want)) == want
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            assert recv_all(cli, 17) == b"HTTP/1.1 200 OK\r\n"
            assert conn.cosock_path == "tcp"
            assert conn.cosock_fallback_reason is FallbackReason.NO_OFFER
        finally:
            conn.close()
    finally:
        cli.close()
        srv.close()


def test_cosock_client_to_plain_server_is_plain_tcp():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = CoSocket()
    cli.connect(srv.getsockname())
    conn, _ = srv.accept()
    cli.sendall(b"hi")
    assert recv_all(conn, 2) == b"hi"  # no handshake bytes leak to a plain server
    conn.sendall(b"yo")
    assert recv_all(cli, 2) == b"yo"
    assert cli.cosock_path == "tcp"
    assert cli.cosock_fallback_reason is FallbackReason.NOT_CORESIDENT
    for s in (cli, conn, srv):
        s.close()


def test_loopback_acceleration_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("COSOCK_LOOPBACK", "0")
    with pair() as (cli, conn):
        cli.sendall(b"x")
        assert conn.recv(1) == b"x"
        assert cli.cosock_path == "tcp"
        assert cli.cosock_fallback_reason is FallbackReason.LOOPBACK_DISABLED


def test_unreachable_agent_means_plain_tcp(monkeypatch, tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    monkeypatch.setenv("COSOCK_AGENT", str(tmp_path / "nobody-home.sock"))
    AgentClient.reset_shared()
    cli = CoSocket()
    cli.connect(srv.getsockname())
    conn, _ = srv.accept()
    cli.sendall(b"ok")
    assert recv_all(conn, 2) == b"ok"
    assert cli.cosock_fallback_reason is FallbackReason.AGENT_UNREACHABLE
    for s in (cli, conn, srv):
        s.close()


def test_garbage_on_rendezvous_is_dropped_and_listener_keeps_working():
    srv = listener()
    assert srv._rv is not None
    rv = srv._rv[0]
    junk = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    junk.sendto(b"not an offer at all", str(rv.path))
    r, w = os.pipe()
    junk.sendmsg(
        [b"CSKO" + b"\0" * 80],
        [
            (
                socket.SOL_SOCKET,
                socket.SCM_RIGHTS,
                bytes(memoryview(bytearray(r.to_bytes(4, "little")))),
            )
        ],
        0,
        str(rv.path),
    )
    junk.close()
    os.close(r)
    os.close(w)
    cli = CoSocket()
    cli.connect(srv.getsockname())
    conn, _ = srv.accept()
    settle(cli, conn)
    assert cli.cosock_path == "shm"
    assert rv.dropped.get("fd-count", 0) + rv.dropped.get("malformed", 0) >= 2
    for s in (cli, conn, srv):
        s.close()


def test_hostile_ring_header_fails_cleanly():
    from cosock._ring import _HEAD

    with pair() as (cli, conn):
        settle(cli, conn)
        ch = conn._co
        assert ch is not None and ch.rx is not None
        ch.rx._hdr[_HEAD] = 2**62  # what a hostile client could write into the mapping
        with pytest.raises(ConnectionResetError, match="corrupted"):
            conn.recv(10)


def _child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_peer_killed_mid_stream_gives_eof_not_hang():
    srv = listener()
    port = srv.getsockname()[1]
    child = _child(
        f"""
        import socket, time
        from cosock import CoSocket
        s = CoSocket(); s.connect(("127.0.0.1", {port}))
        s.sendall(b"x" * 100000)
        print(s.cosock_path, flush=True)
        time.sleep(60)
        """
    )
    conn, _ = srv.accept()
    conn.settimeout(20)
    got = recv_all(conn, 100000)
    assert got == b"x" * 100000
    assert child.stdout is not None and child.stdout.readline().strip() in ("shm", "handshake")
    assert conn.cosock_path == "shm"
    child.send_signal(signal.SIGKILL)
    child.wait()
    t0 = time.monotonic()
    assert conn.recv(10) == b""  # the kernel closed its TCP end: EOF, promptly
    assert time.monotonic() - t0 < 5
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(200):
            conn.sendall(b"y" * 65536)
    conn.close()
    srv.close()


def test_reader_killed_while_writer_blocked_on_full_ring(monkeypatch):
    monkeypatch.setenv("COSOCK_RING_SIZE", "65536")
    srv = listener()
    port = srv.getsockname()[1]
    child = _child(
        f"""
        import os, time
        os.environ["COSOCK_RING_SIZE"] = "65536"
        from cosock import CoSocket
        s = CoSocket(); s.connect(("127.0.0.1", {port}))
        s.sendall(b"?"); print(s.recv(1), flush=True)
        time.sleep(60)
        """
    )
    conn, _ = srv.accept()
    conn.settimeout(20)
    assert conn.recv(1) == b"?"
    conn.sendall(b"!")
    assert child.stdout is not None
    child.stdout.readline()
    threading.Timer(0.5, lambda: child.send_signal(signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        conn.sendall(b"z" * 10_000_000)  # blocks on the full ring until the reader dies
    assert time.monotonic() - t0 < 10
    child.wait()
    conn.close()
    srv.close()


def test_many_concurrent_connections_with_hashes():
    srv = listener()
    addr = srv.getsockname()
    n = 200
    errors: list[BaseException] = []

    def serve() -> None:
        conns = []
        for _ in range(n):
            conn, _ = srv.accept()
            conns.append(conn)
            threading.Thread(target=echo_hash, args=(conn,), daemon=True).start()

    def echo_hash(conn: socket.socket) -> None:
        try:
            size = int.from_bytes(recv_all(conn, 4), "big")
            conn.sendall(hashlib.sha256(recv_all(conn, size)).digest())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    clients = []
    for i in range(n):
        c = CoSocket()
        c.settimeout(30)
        c.connect(addr)
        clients.append((c, os.urandom(1000 + i * 97)))
    for c, data in clients:
        c.sendall(len(data).to_bytes(4, "big") + data)
    paths = set()
    for c, data in clients:
        assert recv_all(c, 32) == hashlib.sha256(data).digest()
        paths.add(c.cosock_path)
        c.close()
    srv.close()
    assert not errors
    assert paths == {"shm"}


def _run_py(code: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_enable_disable_restore_exactly():
    out = _run_py(
        """
        import socket, asyncio, cosock
        import selectors
        orig = socket.socket, socket.create_connection, socket.fromfd, selectors.DefaultSelector
        cosock.enable(); cosock.enable()
        assert socket.socket is cosock.CoSocket and cosock.enabled()
        s = socket.socket(); assert isinstance(s, cosock.CoSocket); s.close()
        u = socket.socket(socket.AF_UNIX); u.close()
        cosock.disable()
        now = socket.socket, socket.create_connection, socket.fromfd, selectors.DefaultSelector
        assert now == orig
        assert not cosock.enabled()
        print("restored")
        """
    )
    assert out.strip() == "restored"


def test_cosock_run_accelerates_unmodified_programs(cosock_agent, tmp_path):
    server_code = tmp_path / "srv.py"
    server_code.write_text(
        textwrap.dedent(
            """
            import socketserver, sys
            class H(socketserver.StreamRequestHandler):
                def handle(self):
                    line = self.rfile.readline()
                    self.wfile.write(line.upper())
                    self.wfile.write((type(self.request).__name__ + "\\n").encode())
            with socketserver.TCPServer(("127.0.0.1", 0), H) as s:
                print(s.server_address[1], flush=True)
                s.handle_request()
            """
        )
    )
    client_code = tmp_path / "cli.py"
    client_code.write_text(
        textwrap.dedent(
            """
            import socket, sys
            with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as s:
                f = s.makefile("rwb")
                f.write(b"hello over shared memory\\n"); f.flush()
                print(f.readline().decode().strip(), f.readline().decode().strip(),
                      getattr(s, "cosock_path", "plain"))
            """
        )
    )
    cosock = [sys.executable, "-m", "cosock", "run", "--"]
    srv = subprocess.Popen(
        [*cosock, sys.executable, str(server_code)], stdout=subprocess.PIPE, text=True
    )
    assert srv.stdout is not None
    port = srv.stdout.readline().strip()
    out = subprocess.run(
        [*cosock, sys.executable, str(client_code), port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    srv.wait(timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["HELLO", "OVER", "SHARED", "MEMORY", "CoSocket", "shm"]


def test_cosock_run_without_command_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "cosock", "run"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode != 0
    assert "no command" in out.stderr


def test_plain_client_reusing_a_stale_offers_4tuple_is_served_plainly():
    """An offer whose client never connected must not swallow a later plain client's bytes."""
    srv, plain, conn = stale_offer_plain_pair()
    plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert recv_all(conn, 18) == b"GET / HTTP/1.0\r\n\r\n"
    conn.sendall(b"HTTP/1.0 200 OK\r\n")
    assert recv_all(plain, 17) == b"HTTP/1.0 200 OK\r\n"
    assert conn.cosock_path == "tcp"
    for s in (plain, conn, srv):
        s.close()


@pytest.mark.parametrize(
    "chunk,read",
    [(1 << 20, 1 << 20), (1 << 20, 65536), (65536, 1 << 20), (100_003, 7_919)],
    ids=["1M-1M", "1M-64K", "64K-1M", "odd"],
)
def test_streaming_between_processes_never_loses_a_wakeup(chunk, read):
    """Both sides block and wake many times; a lost doorbell would stall until the
    safety timeout, which the counters would show."""
    code = f"""
        import json, socket, sys
        from cosock import CoSocket
        s = CoSocket(); s.bind(("127.0.0.1", 0)); s.listen()
        print(s.getsockname()[1], flush=True)
        c, _ = s.accept(); buf = bytearray({read}); total = 0; h = 0
        while True:
            n = c.recv_into(buf)
            if not n:
                break
            total += n
        c.sendall(json.dumps({{"total": total, **c.cosock_info()}}).encode())
        c.close()
        """
    child = _child(code)
    assert child.stdout is not None
    port = int(child.stdout.readline())
    cli = CoSocket()
    cli.connect(("127.0.0.1", port))
    block = os.urandom(chunk)
    count = max(4, (48 << 20) // chunk)
    for _ in range(count):
        cli.sendall(block)
    cli.shutdown(socket.SHUT_WR)
    import json

    report = json.loads(recv_all(cli, 1 << 16).decode())
    info = cli.cosock_info()
    cli.close()
    child.wait(timeout=30)
    assert report["total"] == chunk * count
    assert report["path"] == info["path"] == "shm"
    assert report["safety_timeouts"] == 0
    assert info["safety_timeouts"] == 0


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_connection_uses_no_cpu():
    """A reader blocked on an idle connection sleeps in the kernel after its spin budget."""
    srv = listener()
    port = srv.getsockname()[1]
    child = _child(
        f"""
        from cosock import CoSocket
        s = CoSocket(); s.connect(("127.0.0.1", {port}))
        s.sendall(b"?"); assert s.recv(1) == b"!"
        print("idle", flush=True)
        print(s.recv(1), s.cosock_path, flush=True)
        """
    )
    conn, _ = srv.accept()
    assert conn.recv(1) == b"?"
    conn.sendall(b"!")
    assert child.stdout is not None and child.stdout.readline().strip() == "idle"
    time.sleep(0.2)  # past any spin budget
    before = _cpu_seconds(child.pid)
    time.sleep(3)
    used = _cpu_seconds(child.pid) - before
    conn.sendall(b"x")
    assert child.stdout.readline().split() == ["b'x'", "shm"]
    child.wait(timeout=10)
    conn.close()
    srv.close()
    assert used < 0.05, f"idle reader used {used:.3f} s of CPU in 3 s"


def test_shut_rd_makes_recv_return_eof():
    with pair() as (cli, conn):
        settle(cli, conn)
        cli.shutdown(socket.SHUT_RD)
        assert cli.recv(10) == b""  # nothing queued: EOF, not a block
        conn.sendall(b"late")
        assert cli.recv(10) == b"late"  # Linux still delivers bytes that arrive later
        assert cli.recv(10) == b""
        cli.sendall(b"still writable")
        assert recv_all(conn, 14) == b"still writable"


def test_cosock_run_reaches_grandchildren(cosock_agent, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys\n"
        "print(subprocess.run([sys.executable, '-c', "
        "'import socket; print(socket.socket.__name__)'], capture_output=True, text=True)"
        ".stdout.strip())\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "cosock", "run", "--", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "CoSocket"


def test_deep_agent_directory_still_accelerates(tmp_path, monkeypatch):
    """sun_path holds 108 bytes: a rendezvous path that would not fit moves to a short
    private directory instead of silently turning acceleration off."""
    from conftest import start_agent

    deep = Path("/tmp") / ("d" * 80)
    deep.mkdir(exist_ok=True)
    proc = start_agent(deep / "agent.sock")
    try:
        monkeypatch.setenv("COSOCK_AGENT", str(deep / "agent.sock"))
        AgentClient.reset_shared()
        with pair() as (cli, conn):
            settle(cli, conn)
            assert cli.cosock_path == "shm"
    finally:
        proc.kill()
        proc.wait()
        AgentClient.reset_shared()
        import shutil

        shutil.rmtree(deep, ignore_errors=True)


def _big_ring_client(port: int) -> subprocess.Popen[str]:
    """A client offering a ring larger than COSOCK_RING_MAX: it sends, then prints what it
    reads back and its path."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                from cosock import CoSocket
                s = CoSocket(); s.connect(("127.0.0.1", {port}))
                s.sendall(b"big ring please"); print(s.recv(2), s.cosock_path, flush=True)
                """
            ),
        ],
        env={**os.environ, "COSOCK_RING_SIZE": str(128 << 20)},
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_thread_left_on_a_refused_channel_neither_resends_the_verdict_nor_eats_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The residency thread may settle a verdict while the accepting thread waits for the
    channel's lock: the loser must not send the REJECT a second time (the client would
    read it as data) nor read the client's plain bytes into the dead channel."""
    attached = []
    real_attach = CoSocket._attach

    def recording_attach(self: CoSocket, ch: object) -> None:
        attached.append(ch)
        real_attach(self, ch)

    monkeypatch.setattr(CoSocket, "_attach", recording_attach)
    srv = listener()
    port = srv.getsockname()[1]
    child = _big_ring_client(port)
    try:
        conn, _ = srv.accept()
        conn.settimeout(10)
        (refused,) = attached
        deadline = time.monotonic() + 10
        while conn._co is not None and time.monotonic() < deadline:
            conn._pump(refused)  # the verdict, as either thread would settle it
        assert conn._co is None
        for _ in range(3):  # a late thread still holding the channel
            assert not conn._pump(refused)
        assert recv_all(conn, 15) == b"big ring please"
        conn.sendall(b"ok")
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["b'ok'", "tcp"]
        child.wait(timeout=10)
        conn.close()
    finally:
        child.kill()
        child.wait()
        srv.close()


def test_oversized_ring_offer_is_refused_and_served_plainly():
    """A peer may not make the server map more than COSOCK_RING_MAX per direction."""
    srv = listener()
    port = srv.getsockname()[1]
    child = _big_ring_client(port)
    conn, _ = srv.accept()
    conn.settimeout(10)
    assert recv_all(conn, 15) == b"big ring please"
    conn.sendall(b"ok")
    assert child.stdout is not None
    assert child.stdout.readline().split() == ["b'ok'", "tcp"]
    assert conn.cosock_fallback_reason is FallbackReason.RESOURCE
    child.wait(timeout=10)
    conn.close()
    srv.close()
