"""Socket-semantics conformance: every case runs twice, on plain sockets and with
``cosock.enable()`` on loopback guests (a private agent), through the same stdlib calls
(``socket.create_server``/``create_connection``), and asserts the same observable results:
return values, exceptions and their errno, EOF, flags, timeouts, buffering.

In the cosock run every pair is checked to really take the shared-memory path, so a
silent fallback to TCP cannot make a case pass.  A differential property test (hypothesis)
drives random operation sequences through one plain and one accelerated pair side by side
and compares their traces with a model of a TCP byte stream.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cosock
from cosock import CoSocket
from cosock._intercept import get_original
from sockutil import recv_all

MODES = ["plain", "cosock"]
Pair = Callable[..., tuple[socket.socket, socket.socket]]


def outcome(call: Callable[[], Any]) -> Any:
    """What a call showed the program: its value, or its exception's type, errno and text."""
    try:
        return ("ok", call())
    except OSError as exc:
        return ("raise", type(exc).__name__, exc.errno, str(exc))
    except (ValueError, TypeError) as exc:
        return ("raise", type(exc).__name__, str(exc))


def settle(a: socket.socket, b: socket.socket) -> None:
    a.sendall(b"?")
    assert recv_all(b, 1) == b"?"
    b.sendall(b"!")
    assert recv_all(a, 1) == b"!"


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """``"plain"``: the stdlib untouched; ``"cosock"``: a private agent and enable()."""
    if request.param == "cosock":
        request.getfixturevalue("cosock_agent")
        cosock.enable()
        try:
            yield "cosock"
        finally:
            cosock.disable()
    else:
        assert not cosock.enabled()
        yield "plain"


@pytest.fixture
def make_pair(mode: str) -> Iterator[Pair]:
    """``make_pair(timeout=10) -> (client, server side)``, settled; closed afterwards."""
    made: list[socket.socket] = []

    def make(timeout: float | None = 10.0) -> tuple[socket.socket, socket.socket]:
        srv = socket.create_server(("127.0.0.1", 0))
        made.append(srv)
        cli = socket.create_connection(srv.getsockname(), timeout=10)
        made.append(cli)
        conn, _ = srv.accept()
        made.append(conn)
        conn.settimeout(10)
        settle(cli, conn)
        if mode == "cosock":
            for s in (cli, conn):
                assert isinstance(s, CoSocket) and s.cosock_path == "shm", s
        else:
            assert type(cli) is type(conn) is get_original(socket, "socket")
        cli.settimeout(timeout)
        conn.settimeout(timeout)
        return cli, conn

    yield make
    for s in made:
        s.close()


def still_shm(*socks: socket.socket) -> None:
    """In the cosock run, the case must not have fallen back to TCP on the way."""
    for s in socks:
        if isinstance(s, CoSocket) and s.fileno() != -1:
            assert s.cosock_path == "shm"


def known_gap(request: pytest.FixtureRequest, mode: str, reason: str) -> None:
    """A CoSocket difference not fixed yet: the cosock run is expected to fail (not strict)."""
    if mode == "cosock":
        request.applymarker(pytest.mark.xfail(strict=False, reason=reason))


def later(delay: float, fn: Callable[[], Any]) -> threading.Timer:
    t = threading.Timer(delay, fn)
    t.start()
    return t


# ---------------------------------------------------------------------- plain data


def test_send_recv_values(make_pair: Pair) -> None:
    cli, conn = make_pair()
    assert cli.send(b"hello") == 5
    assert recv_all(conn, 5) == b"hello"
    assert conn.send(b"") == 0
    assert cli.send(b"") == 0
    assert cli.recv(0) == b""
    cli.setblocking(False)
    assert cli.recv(0) == b""  # recv(0) never blocks, never raises EAGAIN
    cli.settimeout(0.2)
    assert cli.recv(0) == b""
    buf = bytearray(8)
    conn.sendall(b"abc")
    assert recv_all(cli, 0) == b""
    cli.settimeout(5)
    assert cli.recv_into(buf, 3) == 3 and buf[:3] == b"abc"
    still_shm(cli, conn)


def test_sendmsg_several_buffers_and_recvmsg(make_pair: Pair) -> None:
    cli, conn = make_pair()
    assert cli.sendmsg([b"ab", memoryview(b"cd"), bytearray(b"ef"), b""]) == 6
    time.sleep(0.05)
    data, anc, flags, addr = conn.recvmsg(64)
    assert (data, anc, flags, addr) == (b"abcdef", [], 0, None)
    assert cli.sendmsg([]) == 0
    conn.sendall(b"xyz")
    time.sleep(0.05)
    assert cli.recvmsg(2) == (b"xy", [], 0, None)
    assert cli.recvmsg(10, 0, socket.MSG_PEEK) == (b"z", [], 0, None)
    assert cli.recv(10) == b"z"
    still_shm(cli, conn)


def test_recvfrom_forms(make_pair: Pair) -> None:
    cli, conn = make_pair()
    conn.sendall(b"0123456789")
    time.sleep(0.05)
    assert cli.recvfrom(4) == (b"0123", None)
    buf = bytearray(10)
    assert cli.recvfrom_into(buf, 3) == (3, None)
    assert buf[:3] == b"456"
    assert cli.recv_into(memoryview(buf)[5:]) == 3
    assert buf[5:8] == b"789"


def _misuse(cli: socket.socket, conn: socket.socket) -> list[Any]:
    """Calls with bad arguments, with and without bytes waiting: what each raises."""
    calls: list[Callable[[], Any]] = [
        lambda: cli.recv(-1),
        lambda: cli.recv_into(bytearray(2), 5),
        lambda: cli.recv_into(bytearray(2), -1),
        lambda: cli.recv_into(b"immutable"),
        lambda: cli.send("text"),  # type: ignore[arg-type]
        lambda: cli.sendall("text"),  # type: ignore[arg-type]
        lambda: cli.sendmsg(["text"]),  # type: ignore[list-item]
        lambda: cli.shutdown(7),
        lambda: cli.settimeout(-1),
        lambda: cli.settimeout("x"),  # type: ignore[arg-type]
    ]
    seen = [outcome(c) for c in calls]
    conn.sendall(b"waiting")  # CoSocket has fast paths for when ring bytes wait
    time.sleep(0.05)
    seen += [outcome(c) for c in calls[:5]]
    seen.append(outcome(lambda: recv_all(cli, 7)))
    return seen


def test_argument_errors_match_plain_sockets(make_pair: Pair) -> None:
    cli, conn = make_pair()
    with _pair_of(get_original(socket, "socket")) as (pcli, pconn):
        pcli.settimeout(10)
        assert _misuse(cli, conn) == _misuse(pcli, pconn)


def test_dup_and_context_manager(make_pair: Pair) -> None:
    cli, conn = make_pair()
    twin = cli.dup()
    assert twin.fileno() != cli.fileno() and twin.gettimeout() == cli.gettimeout()
    cli.close()
    twin.sendall(b"via dup")
    assert recv_all(conn, 7) == b"via dup"
    conn.sendall(b"back")
    assert recv_all(twin, 4) == b"back"
    with twin:
        pass
    assert twin.fileno() == -1
    assert conn.recv(1) == b""


def test_sendfile(make_pair: Pair, tmp_path: Any) -> None:
    cli, conn = make_pair()
    blob = bytes(range(256)) * 4096  # 1 MiB
    path = tmp_path / "blob"
    path.write_bytes(blob)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(recv_all(conn, len(blob) - 1000)))
    reader.start()
    with path.open("rb") as f:
        assert cli.sendfile(f, offset=1000) == len(blob) - 1000
        assert f.tell() == len(blob)
    reader.join(20)
    assert got == [blob[1000:]]
    still_shm(cli, conn)


# ---------------------------------------------------------------------- detach
#
# ``detach()`` hands the fd to code that drives it itself.  An accelerated connection is
# downgraded first (both ends continue on plain TCP, byte-exact), so what the fd shows is
# what a plain socket's would; the peer's application notices nothing.


def _raw(fd: int) -> socket.socket:
    """What a program does with a detached fd: a socket of the stdlib's own class."""
    raw = get_original(socket, "socket")(fileno=fd)
    raw.settimeout(10)
    return raw


def _handed_over(mode: str, *socks: socket.socket) -> None:
    """In the cosock run the peer continues on plain TCP and says why."""
    if mode == "cosock":
        for s in socks:
            assert isinstance(s, CoSocket)
            assert s.cosock_path == "tcp"
            assert s.cosock_fallback_reason is cosock.FallbackReason.HANDED_OVER


def test_detach_hands_over_an_honest_stream(make_pair: Pair, mode: str) -> None:
    """Unread bytes both ways at the moment of detach() are delivered exactly once, and the
    connection goes on both ways; EOF and half-close travel as on TCP."""
    cli, conn = make_pair()
    conn.sendall(b"unread by the client")
    cli.sendall(b"unread by the server")
    fd = cli.detach()
    assert cli.fileno() == -1 and fd >= 0
    raw = _raw(fd)
    try:
        assert raw.getpeername() == conn.getsockname()
        assert recv_all(raw, 20) == b"unread by the client"
        assert recv_all(conn, 20) == b"unread by the server"
        raw.sendall(b"after")
        assert recv_all(conn, 5) == b"after"
        conn.sendall(b"reply")
        assert recv_all(raw, 5) == b"reply"
        _handed_over(mode, conn)
        raw.shutdown(socket.SHUT_WR)
        assert conn.recv(1) == b""
        conn.sendall(b"half")
        conn.shutdown(socket.SHUT_WR)
        assert recv_all(raw, 10) == b"half"
    finally:
        raw.close()


def test_detach_bytes_sent_before_are_readable_at_once(make_pair: Pair, mode: str) -> None:
    """What the peer sent before detach() is in the fd's queue when detach() returns: a
    non-blocking read gets it all, no EAGAIN (cosock: the peer's resend is awaited)."""
    cli, conn = make_pair()
    conn.sendall(b"q" * 50_000)
    if mode == "cosock":
        _wait_until_readable(cli, 50_000)
    raw = _raw(cli.detach())
    try:
        raw.setblocking(False)
        got = b""
        while len(got) < 50_000:
            got += raw.recv(65536)  # BlockingIOError here would fail the case
        assert got == b"q" * 50_000
    finally:
        raw.close()


def _wait_until_readable(sock: socket.socket, n: int) -> None:
    """Until ``n`` bytes wait in the ring (a plain socket has them in its queue)."""
    assert isinstance(sock, CoSocket)
    deadline = time.monotonic() + 10
    while (ch := sock._co) is not None and ch.rx is not None and ch.rx.available() < n:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_detach_while_the_peer_streams(make_pair: Pair, mode: str) -> None:
    """The peer is blocked in sendall (more than a ring's worth) when we detach: the fd
    delivers its whole stream in order, no byte lost or doubled."""
    cli, conn = make_pair()
    blob = os.urandom(3 << 20)
    sender = threading.Thread(target=conn.sendall, args=(blob,))
    sender.start()
    head = recv_all(cli, 100_000)
    raw = _raw(cli.detach())
    try:
        rest = recv_all(raw, len(blob) - len(head))
        sender.join(20)
        assert not sender.is_alive()
        assert head + rest == blob
        raw.sendall(b"done")
        assert recv_all(conn, 4) == b"done"
        _handed_over(mode, conn)
    finally:
        raw.close()


def test_detach_after_half_closes(make_pair: Pair, mode: str) -> None:
    cli, conn = make_pair()
    cli.sendall(b"last words")
    cli.shutdown(socket.SHUT_WR)
    conn.sendall(b"still talking")
    raw = _raw(cli.detach())
    try:
        assert recv_all(conn, 100) == b"last words"  # and EOF
        assert recv_all(raw, 13) == b"still talking"
        conn.close()
        assert raw.recv(1) == b""
    finally:
        raw.close()


def test_detach_leaves_dups_working(make_pair: Pair, mode: str) -> None:
    cli, conn = make_pair()
    twin = cli.dup()
    conn.sendall(b"x")
    raw = _raw(cli.detach())
    try:
        assert recv_all(twin, 1) == b"x"
        twin.sendall(b"from twin")
        raw.sendall(b" and raw")
        assert recv_all(conn, 17) == b"from twin and raw"
        conn.sendall(b"both")
        assert recv_all(raw, 4) == b"both"
        _handed_over(mode, conn, twin)
    finally:
        raw.close()
        twin.close()


def test_detach_of_a_plain_and_a_closed_socket(mode: str) -> None:
    """Nothing to downgrade: a listener, an unconnected socket, and a closed one."""
    srv = socket.create_server(("127.0.0.1", 0))
    fresh = socket.socket()
    fresh.close()
    for s in (srv, socket.socket()):
        fd = s.detach()
        assert fd >= 0 and s.fileno() == -1
        os.close(fd)
    assert fresh.detach() == -1


# ---------------------------------------------------------------------- flags


def test_msg_peek(make_pair: Pair) -> None:
    cli, conn = make_pair()
    conn.sendall(b"abcdef")
    time.sleep(0.05)
    assert cli.recv(3, socket.MSG_PEEK) == b"abc"
    assert cli.recv(100, socket.MSG_PEEK) == b"abcdef"
    buf = bytearray(4)
    assert cli.recv_into(buf, 4, socket.MSG_PEEK) == 4 and buf == b"abcd"
    assert cli.recv(2) == b"ab"
    assert cli.recv(100, socket.MSG_PEEK) == b"cdef"
    assert cli.recv(100) == b"cdef"
    cli.settimeout(0.2)
    assert outcome(lambda: cli.recv(1, socket.MSG_PEEK)) == (
        "raise",
        "TimeoutError",
        None,
        "timed out",
    )


def test_msg_waitall(make_pair: Pair) -> None:
    cli, conn = make_pair(timeout=None)
    conn.sendall(b"abc")
    t = later(0.1, lambda: conn.sendall(b"defghij"))
    assert cli.recv(10, socket.MSG_WAITALL) == b"abcdefghij"
    t.join()
    conn.sendall(b"tail")
    conn.shutdown(socket.SHUT_WR)
    assert cli.recv(100, socket.MSG_WAITALL) == b"tail"  # short only at EOF
    assert cli.recv(100, socket.MSG_WAITALL) == b""


def test_msg_waitall_with_a_timeout_returns_what_is_there(make_pair: Pair) -> None:
    """CPython makes a socket with a timeout non-blocking: MSG_WAITALL cannot wait."""
    cli, conn = make_pair(timeout=5)
    conn.sendall(b"abc")
    time.sleep(0.05)
    assert cli.recv(10, socket.MSG_WAITALL) == b"abc"
    cli.settimeout(0.2)
    assert outcome(lambda: cli.recv(10, socket.MSG_WAITALL)) == (
        "raise",
        "TimeoutError",
        None,
        "timed out",
    )


def test_msg_dontwait(make_pair: Pair) -> None:
    cli, conn = make_pair(timeout=None)
    assert outcome(lambda: cli.recv(10, socket.MSG_DONTWAIT)) == (
        "raise",
        "BlockingIOError",
        errno.EAGAIN,
        "[Errno 11] Resource temporarily unavailable",
    )
    conn.sendall(b"now")
    time.sleep(0.05)
    assert cli.recv(10, socket.MSG_DONTWAIT) == b"now"
    assert cli.send(b"x", socket.MSG_DONTWAIT) == 1
    assert recv_all(conn, 1) == b"x"


def test_msg_dontwait_on_a_socket_with_timeout_waits_the_timeout(make_pair: Pair) -> None:
    """CPython polls for the timeout before the call, so MSG_DONTWAIT cannot cut it short."""
    cli, conn = make_pair(timeout=0.2)
    t0 = time.monotonic()
    assert outcome(lambda: cli.recv(10, socket.MSG_DONTWAIT)) == (
        "raise",
        "TimeoutError",
        None,
        "timed out",
    )
    assert time.monotonic() - t0 >= 0.15
    later(0.05, lambda: conn.sendall(b"late"))
    cli.settimeout(5)
    assert cli.recv(10, socket.MSG_DONTWAIT) == b"late"


# ---------------------------------------------------------------------- blocking modes


def test_settimeout0_and_setblocking_false_are_the_same(make_pair: Pair) -> None:
    cli, conn = make_pair()
    seen = []
    for set_nb in (lambda: cli.settimeout(0), lambda: cli.setblocking(False)):
        cli.settimeout(3)
        set_nb()
        seen.append((cli.gettimeout(), cli.getblocking(), cli.timeout))
        seen.append(outcome(lambda: cli.recv(5)))
    assert seen[0] == seen[2] == (0.0, False, 0.0)
    assert (
        seen[1]
        == seen[3]
        == (
            "raise",
            "BlockingIOError",
            errno.EAGAIN,
            "[Errno 11] Resource temporarily unavailable",
        )
    )
    cli.setblocking(True)
    assert (cli.gettimeout(), cli.getblocking(), cli.timeout) == (None, True, None)
    cli.settimeout(2.5)
    assert (cli.gettimeout(), cli.getblocking(), cli.timeout) == (2.5, True, 2.5)
    cli.setblocking(False)
    conn.sendall(b"data")
    time.sleep(0.05)
    assert cli.recv(10) == b"data"


def test_recv_timeout(make_pair: Pair) -> None:
    cli, conn = make_pair(timeout=0.2)
    t0 = time.monotonic()
    exc = outcome(lambda: cli.recv(1))
    assert exc == ("raise", "TimeoutError", None, "timed out")
    assert 0.15 < time.monotonic() - t0 < 5
    assert outcome(lambda: cli.recv_into(bytearray(1))) == exc
    assert outcome(lambda: cli.recv(1, socket.MSG_WAITALL)) == exc
    conn.sendall(b"ok")  # the connection is still good after a timeout
    assert recv_all(cli, 2) == b"ok"
    still_shm(cli, conn)


def test_partial_sends_with_a_small_timeout(make_pair: Pair) -> None:
    cli, conn = make_pair(timeout=0.2)
    big = b"p" * (64 << 20)  # more than any socket buffer or ring holds
    first = cli.send(big)
    assert 0 < first < len(big)  # partial, not an error
    results = []
    for _ in range(64):  # bounded: buffers are a few MiB
        r = outcome(lambda: cli.send(big[: 1 << 20]))
        results.append(r)
        if r[0] == "raise":
            break
    assert results[-1] == ("raise", "TimeoutError", None, "timed out")
    sent = [r[1] for r in results if r[0] == "ok"]
    assert all(0 < n <= 1 << 20 for n in sent)
    total = first + sum(sent)
    conn.settimeout(10)
    assert recv_all(conn, total) == b"p" * total
    cli.settimeout(10)
    assert cli.send(b"after") == 5  # room again once the peer has read
    assert recv_all(conn, 5) == b"after"
    still_shm(cli, conn)


def test_nonblocking_send_fills_then_eagain(make_pair: Pair) -> None:
    cli, conn = make_pair(timeout=0.0)
    total = 0
    last = None
    for _ in range(64):
        last = outcome(lambda: cli.send(b"n" * (1 << 20)))
        if last[0] == "raise":
            break
        total += last[1]
    assert last == (
        "raise",
        "BlockingIOError",
        errno.EAGAIN,
        "[Errno 11] Resource temporarily unavailable",
    )
    conn.settimeout(10)
    assert recv_all(conn, total) == b"n" * total


def test_sendall_with_timeout_when_peer_never_reads(make_pair: Pair) -> None:
    cli, _conn = make_pair(timeout=0.3)
    t0 = time.monotonic()
    r = outcome(lambda: cli.sendall(b"s" * (32 << 20)))
    assert r == ("raise", "TimeoutError", None, "timed out")
    assert time.monotonic() - t0 < 10
    cli.setblocking(False)
    assert outcome(lambda: cli.sendall(b"s" * (32 << 20)))[:3] == (
        "raise",
        "BlockingIOError",
        errno.EAGAIN,
    )


def test_sendall_with_timeout_completes_when_peer_reads(make_pair: Pair) -> None:
    cli, conn = make_pair(timeout=5)
    data = b"q" * (8 << 20)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(recv_all(conn, len(data))))
    reader.start()
    assert cli.sendall(data) is None
    reader.join(20)
    assert got == [data]
    still_shm(cli, conn)


# ---------------------------------------------------------------------- shutdown and close


def test_eof_after_shutdown_wr(make_pair: Pair) -> None:
    cli, conn = make_pair()
    cli.sendall(b"request")
    cli.shutdown(socket.SHUT_WR)
    assert recv_all(conn, 100) == b"request"
    assert conn.recv(10) == b""
    assert conn.recv(10) == b""  # EOF stays EOF
    assert conn.recv(10, socket.MSG_PEEK) == b""
    conn.setblocking(False)
    assert conn.recv(10) == b""  # EOF, not EAGAIN
    assert outcome(lambda: cli.send(b"x")) == (
        "raise",
        "BrokenPipeError",
        errno.EPIPE,
        "[Errno 32] Broken pipe",
    )
    assert outcome(lambda: cli.sendall(b"x")) == (
        "raise",
        "BrokenPipeError",
        errno.EPIPE,
        "[Errno 32] Broken pipe",
    )
    conn.setblocking(True)
    conn.sendall(b"reply")  # the other direction still works
    assert recv_all(cli, 5) == b"reply"
    cli.shutdown(socket.SHUT_WR)  # twice is fine
    still_shm(cli, conn)


def test_shutdown_rd(make_pair: Pair) -> None:
    """Linux: SHUT_RD still hands over queued bytes, then reports EOF instead of blocking."""
    cli, conn = make_pair()
    conn.sendall(b"queued")
    time.sleep(0.05)
    cli.shutdown(socket.SHUT_RD)
    assert cli.recv(100) == b"queued"
    assert cli.recv(100) == b""
    cli.sendall(b"can still send")
    assert recv_all(conn, 14) == b"can still send"


def test_shutdown_rdwr_then_peer_sees_eof(make_pair: Pair) -> None:
    cli, conn = make_pair()
    cli.shutdown(socket.SHUT_RDWR)
    assert conn.recv(10) == b""
    assert cli.recv(10) == b""
    assert outcome(lambda: cli.send(b"x"))[:3] == ("raise", "BrokenPipeError", errno.EPIPE)


ENOTCONN = ("raise", "OSError", errno.ENOTCONN, "[Errno 107] Transport endpoint is not connected")
EPIPE = ("raise", "BrokenPipeError", errno.EPIPE, "[Errno 32] Broken pipe")
ECONNRESET = (
    "raise",
    "ConnectionResetError",
    errno.ECONNRESET,
    "[Errno 104] Connection reset by peer",
)


def _ready_now(s: socket.socket) -> tuple[bool, bool]:
    """select(): (readable, writable) at once."""
    r, w, _ = select.select([s], [s], [], 0)
    return bool(r), bool(w)


def _both_fins_crossed(make_pair: Pair) -> tuple[socket.socket, socket.socket]:
    """A pair in TCP's CLOSE state: each side shut down writing and read the other's EOF."""
    cli, conn = make_pair()
    cli.shutdown(socket.SHUT_WR)
    assert conn.recv(1) == b""
    conn.shutdown(socket.SHUT_WR)
    assert cli.recv(1) == b""
    time.sleep(0.05)
    return cli, conn


def test_shutdown_once_both_sides_are_done(make_pair: Pair) -> None:
    """Both FINs exchanged: the TCP socket is closed, so shutdown/getpeername say ENOTCONN."""
    cli, conn = _both_fins_crossed(make_pair)
    assert outcome(lambda: cli.shutdown(socket.SHUT_WR)) == ENOTCONN
    assert outcome(lambda: cli.getpeername()) == ENOTCONN
    assert outcome(lambda: conn.getpeername()) == ENOTCONN


def test_closed_state_after_both_fins(make_pair: Pair) -> None:
    """Every call in TCP's CLOSE state (both FINs crossed), on both sides."""
    cli, conn = _both_fins_crossed(make_pair)
    _in_close_state(cli)
    _in_close_state(conn)


def _in_close_state(s: socket.socket) -> None:
    assert _ready_now(s) == (True, True)
    assert outcome(s.getpeername) == ENOTCONN
    assert outcome(s.getsockname)[0] == "ok"
    assert "raddr" not in repr(s) and "laddr" in repr(s)
    for how in (socket.SHUT_WR, socket.SHUT_RD, socket.SHUT_RDWR):
        assert outcome(functools.partial(s.shutdown, how)) == ENOTCONN
    assert outcome(lambda: s.shutdown(7))[:3] == ("raise", "OSError", errno.EINVAL)
    assert outcome(lambda: s.send(b"x")) == EPIPE
    assert outcome(lambda: s.send(b"")) == EPIPE
    assert outcome(lambda: s.sendall(b"x")) == EPIPE
    assert s.recv(1) == b""
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def test_closed_state_does_not_wait_for_the_reader(make_pair: Pair) -> None:
    """TCP's CLOSE comes with the FIN, not when the application reads it: bytes and EOF
    still wait to be read while getpeername already says ENOTCONN."""
    cli, conn = make_pair()
    cli.sendall(b"data")
    cli.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    conn.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    assert outcome(conn.getpeername) == ENOTCONN
    assert outcome(cli.getpeername) == ENOTCONN
    assert _ready_now(conn) == (True, True)
    assert recv_all(conn, 10) == b"data"
    assert conn.recv(10) == b""
    assert cli.recv(10) == b""


def test_one_half_close_keeps_the_connection(make_pair: Pair) -> None:
    """Only one FIN: both ends are still connected (FIN_WAIT2 / CLOSE_WAIT)."""
    cli, conn = make_pair()
    cli.shutdown(socket.SHUT_WR)
    assert conn.recv(1) == b""
    time.sleep(0.05)
    assert outcome(conn.getpeername) == ("ok", cli.getsockname())
    assert outcome(cli.getpeername) == ("ok", conn.getsockname())
    assert "raddr" in repr(cli) and "raddr" in repr(conn)
    assert _ready_now(conn) == (True, True)
    assert _ready_now(cli) == (False, True)
    conn.sendall(b"reply")
    assert recv_all(cli, 5) == b"reply"


def test_both_shut_rdwr(make_pair: Pair) -> None:
    cli, conn = make_pair()
    cli.shutdown(socket.SHUT_RDWR)
    conn.shutdown(socket.SHUT_RDWR)
    time.sleep(0.05)
    for s in (cli, conn):
        assert outcome(s.getpeername) == ENOTCONN
        assert _ready_now(s) == (True, True)
        assert s.recv(1) == b""


def test_recv_after_peer_close(make_pair: Pair) -> None:
    cli, conn = make_pair()
    conn.sendall(b"last words")
    conn.close()
    assert recv_all(cli, 100) == b"last words"
    assert cli.recv(10) == b""
    assert cli.recv(10) == b""
    cli.setblocking(False)
    assert cli.recv(10) == b""


def test_send_after_peer_close_fails(make_pair: Pair) -> None:
    cli, conn = make_pair()
    conn.close()
    assert cli.recv(1) == b""
    results = []
    for _ in range(20):
        r = outcome(lambda: cli.send(b"x" * 1000))
        results.append(r)
        if r[0] == "raise":
            break
        time.sleep(0.02)
    assert results[-1][:3] in (
        ("raise", "BrokenPipeError", errno.EPIPE),
        ("raise", "ConnectionResetError", errno.ECONNRESET),
    ), results


def test_peer_closes_with_our_bytes_unread_resets(make_pair: Pair) -> None:
    """TCP: closing with unread received data sends RST, so the peer's recv fails."""
    cli, conn = make_pair()
    cli.sendall(b"never read")
    time.sleep(0.05)
    conn.close()
    time.sleep(0.05)
    assert outcome(lambda: cli.recv(10))[:3] == ("raise", "ConnectionResetError", errno.ECONNRESET)


def _reset_by_peer(make_pair: Pair, to_us: bytes = b"") -> socket.socket:
    """A pair whose server side closes with the client's bytes unread; the client."""
    cli, conn = make_pair()
    cli.sendall(b"never read")
    if to_us:
        conn.sendall(to_us)
    time.sleep(0.05)
    conn.close()
    time.sleep(0.05)
    return cli


def test_reset_is_reported_once_then_eof_and_broken_pipe(make_pair: Pair) -> None:
    cli = _reset_by_peer(make_pair)
    assert _ready_now(cli) == (True, True)
    assert outcome(cli.getpeername) == ENOTCONN
    assert "raddr" not in repr(cli)
    assert outcome(lambda: cli.recv(10)) == ECONNRESET
    assert _ready_now(cli) == (True, True)
    assert outcome(lambda: cli.recv(10)) == ("ok", b"")
    assert outcome(lambda: cli.send(b"x")) == EPIPE
    assert outcome(lambda: cli.sendall(b"x")) == EPIPE
    assert cli.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    assert outcome(lambda: cli.shutdown(socket.SHUT_WR)) == ENOTCONN


def test_reset_reported_by_so_error_first(make_pair: Pair) -> None:
    cli = _reset_by_peer(make_pair)
    assert cli.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
    assert cli.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    assert outcome(lambda: cli.recv(10)) == ("ok", b"")
    assert outcome(lambda: cli.send(b"x")) == EPIPE


def test_reset_reported_by_send_first(make_pair: Pair) -> None:
    cli = _reset_by_peer(make_pair)
    assert outcome(lambda: cli.send(b"x")) == ECONNRESET
    assert outcome(lambda: cli.send(b"x")) == EPIPE
    assert outcome(lambda: cli.recv(10)) == ("ok", b"")
    assert outcome(lambda: cli.sendall(b"x")) == EPIPE


def test_reset_with_bytes_in_flight_both_ways(make_pair: Pair) -> None:
    """What the peer sent before its reset is still read first, then the reset."""
    cli = _reset_by_peer(make_pair, to_us=b"to you 123")
    assert _ready_now(cli) == (True, True)
    assert cli.recv(3) == b"to "
    assert recv_all(cli, 7) == b"you 123"
    assert outcome(lambda: cli.recv(100)) == ECONNRESET
    assert outcome(lambda: cli.recv(100)) == ("ok", b"")
    assert outcome(lambda: cli.send(b"x")) == EPIPE


def test_reset_seen_by_peek_and_nonblocking_reads(make_pair: Pair) -> None:
    cli = _reset_by_peer(make_pair, to_us=b"last")
    cli.setblocking(False)
    assert cli.recv(100, socket.MSG_PEEK) == b"last"
    assert cli.recv(100) == b"last"
    assert outcome(lambda: cli.recv(100, socket.MSG_PEEK)) == ECONNRESET
    assert cli.recv(100) == b""
    assert cli.recv(100, socket.MSG_DONTWAIT) == b""


def test_reset_wakes_a_blocked_reader(make_pair: Pair) -> None:
    cli, conn = make_pair(timeout=None)
    cli.sendall(b"never read")
    seen: list[Any] = []
    reader = threading.Thread(target=lambda: seen.append(outcome(lambda: cli.recv(10))))
    reader.start()
    time.sleep(0.2)
    conn.close()
    reader.join(10)
    assert seen == [ECONNRESET]
    assert cli.recv(10) == b""


def test_reset_ends_a_waitall_read_short(make_pair: Pair) -> None:
    cli, conn = make_pair(timeout=None)
    cli.sendall(b"never read")
    conn.sendall(b"abc")
    seen: list[Any] = []
    reader = threading.Thread(
        target=lambda: seen.append(outcome(lambda: cli.recv(10, socket.MSG_WAITALL)))
    )
    reader.start()
    time.sleep(0.2)
    conn.close()
    reader.join(10)
    assert seen == [("ok", b"abc")]
    assert outcome(lambda: cli.recv(10)) == ECONNRESET


def test_reset_wakes_a_blocked_sender(make_pair: Pair) -> None:
    """The peer never reads and closes: our sendall, blocked on a full buffer, fails."""
    cli, conn = make_pair(timeout=None)
    seen: list[Any] = []
    sender = threading.Thread(
        target=lambda: seen.append(outcome(lambda: cli.sendall(b"z" * (64 << 20))))
    )
    sender.start()
    time.sleep(0.3)
    conn.close()
    sender.join(10)
    assert seen == [ECONNRESET]
    assert cli.recv(1) == b""
    assert outcome(lambda: cli.send(b"1")) == EPIPE


def test_reset_after_the_peers_fin_reads_as_eof(make_pair: Pair) -> None:
    """The peer's FIN came before its RST (we are in CLOSE_WAIT): recv never reports the
    reset; the pending error is EPIPE."""
    cli, conn = make_pair()
    cli.sendall(b"never read")
    conn.sendall(b"data")
    conn.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    conn.close()
    time.sleep(0.05)
    assert _ready_now(cli) == (True, True)
    assert outcome(cli.getpeername) == ENOTCONN
    assert recv_all(cli, 10) == b"data"
    assert cli.recv(10) == b""
    assert cli.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.EPIPE
    assert outcome(lambda: cli.send(b"x")) == EPIPE


def test_reset_after_our_own_shutdown(make_pair: Pair) -> None:
    cli, conn = make_pair()
    cli.sendall(b"never read")
    cli.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    conn.close()
    time.sleep(0.05)
    assert outcome(cli.getpeername) == ENOTCONN
    assert outcome(lambda: cli.recv(10)) == ECONNRESET
    assert cli.recv(10) == b""
    assert outcome(lambda: cli.send(b"x")) == EPIPE


def test_nothing_unread_closes_gracefully(make_pair: Pair) -> None:
    """Everything read (and our own bytes read by the peer): EOF, never a reset."""
    cli, conn = make_pair()
    cli.sendall(b"read")
    assert recv_all(conn, 4) == b"read"
    conn.sendall(b"bye")
    conn.close()
    time.sleep(0.05)
    assert recv_all(cli, 10) == b"bye"
    assert cli.recv(10) == b""
    assert outcome(cli.getpeername)[0] == "ok"  # CLOSE_WAIT: still connected
    assert cli.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def test_peer_close_is_seen_at_once(make_pair: Pair) -> None:
    """TCP sends FIN when close() returns.  (cosock: the residency watch's poll held the
    closed fd's file, so FIN left only at its next round, up to 1 s later; close() now
    wakes it.  0.5 s is far above a wake-up, far below the watch's idle round.)"""
    for _ in range(3):
        cli, conn = make_pair(timeout=0.5)
        time.sleep(0.1)  # the watch is asleep in its poll, holding both fds
        conn.close()
        assert outcome(functools.partial(cli.recv, 1)) == ("ok", b"")


def test_close_with_unread_bytes_and_a_dup_alive_does_not_reset(make_pair: Pair) -> None:
    """close() ends one descriptor; the connection (and its unread bytes) lives on."""
    cli, conn = make_pair()
    cli.sendall(b"for the twin")
    time.sleep(0.05)
    twin = conn.dup()
    conn.close()
    time.sleep(0.05)
    try:
        assert recv_all(twin, 12) == b"for the twin"
        twin.sendall(b"still here")
        assert recv_all(cli, 10) == b"still here"
    finally:
        twin.close()
    assert cli.recv(1) == b""


def test_reset_before_the_verdict(mode: str) -> None:
    """The server closes a connection it never read from, at once after accept()."""
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname(), timeout=10)
    try:
        cli.sendall(b"early bytes")
        conn, _ = srv.accept()
        conn.close()
        time.sleep(0.05)
        assert outcome(lambda: cli.recv(10)) == ECONNRESET
        assert cli.recv(10) == b""
    finally:
        cli.close()
        srv.close()


def test_reset_after_a_fallback_with_bytes_taken_off_tcp(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client closes with the server's bytes unread after cosock fell back to TCP,
    having taken those bytes off the kernel's queue together with the REJECT: they waited
    in its own buffer, so the kernel saw nothing unread and sent FIN (the peer read EOF).
    TCP sends RST."""
    if mode == "cosock":  # the server rejects the offer (as for a forged one)
        monkeypatch.setattr(CoSocket, "_sender_owns", lambda *args: False)
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname(), timeout=10)
    conn = None
    try:
        conn, _ = srv.accept()  # cosock: REJECT at once
        conn.settimeout(10)
        conn.sendall(b"unread")  # behind the REJECT in the client's queue
        time.sleep(0.05)
        cli.sendall(b"x")  # cosock: takes the REJECT, and b"unread" with it, off TCP
        if isinstance(cli, CoSocket):
            assert cli.cosock_path == "tcp"
            assert cli.cosock_fallback_reason is cosock.FallbackReason.OFFER_INVALID
            assert cli._rxb == b"unread"  # the case under test
        assert recv_all(conn, 1) == b"x"
        cli.close()
        time.sleep(0.05)
        assert outcome(lambda: conn.recv(10)) == ECONNRESET
        assert conn.recv(10) == b""
        assert outcome(lambda: conn.send(b"y")) == EPIPE
    finally:
        cli.close()
        if conn is not None:
            conn.close()
        srv.close()


def test_close_after_a_fallback_with_a_dup_alive_does_not_reset(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but a ``dup()`` of the client holds the connection: closing one fd sends
    nothing, and the peer can still send (cosock never sets SO_LINGER on an fd known to be
    shared: a forked child that read everything would otherwise reset at its own close).
    Not compared: what the twin reads, or sends at its close -- the bytes taken off TCP
    belong to the closed socket object (a limit, docs/transparency.md)."""
    if mode == "cosock":
        monkeypatch.setattr(CoSocket, "_sender_owns", lambda *args: False)
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname(), timeout=10)
    conn = twin = None
    try:
        conn, _ = srv.accept()
        conn.settimeout(10)
        conn.sendall(b"unread")
        time.sleep(0.05)
        cli.sendall(b"x")
        if isinstance(cli, CoSocket):
            assert cli.cosock_path == "tcp" and cli._rxb == b"unread"
        assert recv_all(conn, 1) == b"x"
        twin = cli.dup()
        cli.close()
        time.sleep(0.05)
        assert not select.select([conn], [], [], 0.1)[0]  # neither FIN nor RST
        assert outcome(lambda: conn.send(b"y")) == ("ok", 1)
    finally:
        cli.close()
        if twin is not None:
            twin.close()
        if conn is not None:
            conn.close()
        srv.close()


def test_reset_after_a_path_switch(make_pair: Pair, mode: str) -> None:
    """The same on framed TCP (cosock: both ends switched to TCP first)."""
    cli, conn = make_pair()
    if mode == "cosock":
        assert isinstance(cli, CoSocket) and cli.cosock_switch()
        cli.sendall(b"x")
        assert recv_all(conn, 1) == b"x"
        conn.sendall(b"y")
        assert recv_all(cli, 1) == b"y"
        assert isinstance(conn, CoSocket) and cli.cosock_path == conn.cosock_path == "tcp"
    cli.sendall(b"never read")
    conn.sendall(b"to you")
    time.sleep(0.05)
    conn.close()
    time.sleep(0.05)
    assert recv_all(cli, 6) == b"to you"
    assert outcome(lambda: cli.recv(10)) == ECONNRESET
    assert cli.recv(10) == b""
    assert outcome(lambda: cli.send(b"x")) == EPIPE


def test_double_close_and_use_after_close(make_pair: Pair) -> None:
    cli, conn = make_pair()
    cli.close()
    cli.close()
    assert cli.fileno() == -1
    ebadf = ("raise", "OSError", errno.EBADF, "[Errno 9] Bad file descriptor")
    assert outcome(lambda: cli.recv(1)) == ebadf
    assert outcome(lambda: cli.send(b"x")) == ebadf
    assert outcome(lambda: cli.sendall(b"x")) == ebadf
    assert outcome(lambda: cli.shutdown(socket.SHUT_WR)) == ebadf
    assert outcome(lambda: cli.getpeername()) == ebadf
    assert "[closed]" in repr(cli)
    assert conn.recv(1) == b""


def test_so_error(make_pair: Pair) -> None:
    cli, conn = make_pair()
    assert cli.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    cli.sendall(b"x")
    assert recv_all(conn, 1) == b"x"
    assert cli.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    # A refused non-blocking connect reports its error through SO_ERROR.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    s = socket.socket()
    s.setblocking(False)
    try:
        assert s.connect_ex(("127.0.0.1", port)) in (errno.EINPROGRESS, errno.ECONNREFUSED)
        import select

        select.select([], [s], [], 5)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) in (0, errno.ECONNREFUSED)
    finally:
        s.close()


# ---------------------------------------------------------------------- makefile


def test_makefile_readline_and_write_flush(make_pair: Pair) -> None:
    cli, conn = make_pair()
    wf = cli.makefile("wb")
    rf = conn.makefile("rb")
    wf.write(b"HELO there\r\n")
    wf.write(b"x" * 100_000 + b"\r\npartial")
    wf.flush()
    assert rf.readline() == b"HELO there\r\n"
    assert len(rf.readline()) == 100_002
    assert rf.read(7) == b"partial"
    wf.write(b"buffered only")
    time.sleep(0.05)
    conn.setblocking(False)
    assert outcome(lambda: conn.recv(1))[:2] == ("raise", "BlockingIOError")  # not flushed
    conn.settimeout(10)
    wf.flush()
    assert rf.read(13) == b"buffered only"
    wf.close()
    cli.shutdown(socket.SHUT_WR)
    assert rf.readline() == b""
    assert rf.read() == b""
    rf.close()
    still_shm(cli, conn)


def test_makefile_text_mode_and_rw(make_pair: Pair) -> None:
    cli, conn = make_pair()
    f = cli.makefile("rw", encoding="utf-8", newline="\r\n")
    g = conn.makefile("rwb", buffering=0)
    assert isinstance(g, socket.SocketIO)
    f.write("héllo\n")
    f.flush()
    assert recv_all(conn, 8) == "héllo\r\n".encode()
    assert g.write(b"line one\r\nline two\r\n") == 20
    assert f.readline() == "line one\r\n"  # newline="\r\n" splits there, untranslated
    assert f.readline() == "line two\r\n"
    f.close()
    g.close()
    cli.close()  # the file objects held references: now the fd really closes
    assert conn.recv(1) == b""


def test_makefile_read_timeout(make_pair: Pair) -> None:
    cli, _conn = make_pair(timeout=0.2)
    rf = cli.makefile("rb")
    with pytest.raises(TimeoutError):
        rf.read(1)
    # After a timeout the SocketIO refuses further reads (CPython marks it).
    with pytest.raises(OSError, match="cannot read from timed out object"):
        rf.read(1)
    rf.close()


def test_makefile_nonblocking_readinto_returns_none(make_pair: Pair) -> None:
    cli, conn = make_pair(timeout=0.0)
    raw = cli.makefile("rb", buffering=0)
    assert raw.readinto(bytearray(10)) is None
    conn.sendall(b"abc")
    time.sleep(0.05)
    buf = bytearray(10)
    assert raw.readinto(buf) == 3 and buf[:3] == b"abc"
    raw.close()


def test_makefile_buffered_write_of_large_payload(make_pair: Pair) -> None:
    cli, conn = make_pair()
    data = bytes(range(256)) * 8192  # 2 MiB
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(recv_all(conn, len(data))))
    reader.start()
    wf = cli.makefile("wb", buffering=io.DEFAULT_BUFFER_SIZE)
    for i in range(0, len(data), 10_000):
        wf.write(data[i : i + 10_000])
    wf.flush()
    reader.join(20)
    assert got == [data]
    wf.close()


# ---------------------------------------------------------------------- differential property

# An operation: (side, kind, arg).  side 0 = client, 1 = server side.
_OPS = st.one_of(
    st.tuples(st.integers(0, 1), st.just("send"), st.binary(min_size=0, max_size=3000)),
    st.tuples(
        st.integers(0, 1),
        st.just("sendmsg"),
        st.lists(st.binary(max_size=500), max_size=4),
    ),
    st.tuples(
        st.integers(0, 1),
        st.sampled_from(["recv", "peek", "dontwait", "waitall", "recv_into"]),
        st.integers(0, 4000),
    ),
    st.tuples(st.integers(0, 1), st.just("shut_wr"), st.none()),
)


_PEEK_NOW = socket.MSG_PEEK | socket.MSG_DONTWAIT
_READS = ("recv", "peek", "dontwait", "waitall", "recv_into")


def _apply(sock: socket.socket, kind: str, arg: Any) -> Any:
    if kind == "send":
        return outcome(lambda: sock.sendall(arg) or len(arg))
    if kind == "sendmsg":
        return outcome(lambda: sock.sendmsg(arg))
    if kind == "recv":
        return outcome(lambda: sock.recv(arg))
    if kind == "peek":
        return outcome(lambda: sock.recv(arg, socket.MSG_PEEK))
    if kind == "dontwait":
        return outcome(lambda: sock.recv(arg, socket.MSG_DONTWAIT))
    if kind == "waitall":
        return outcome(lambda: sock.recv(arg, socket.MSG_WAITALL))
    if kind == "recv_into":
        buf = bytearray(arg + 3)
        return outcome(lambda: (sock.recv_into(buf, arg), bytes(buf)))
    assert kind == "shut_wr"
    return outcome(lambda: sock.shutdown(socket.SHUT_WR))


@contextlib.contextmanager
def _pair_of(cls: type[socket.socket]) -> Iterator[tuple[socket.socket, socket.socket]]:
    srv = cls()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = cls()
    cli.settimeout(10)
    cli.connect(srv.getsockname())
    conn, _ = srv.accept()
    conn.settimeout(10)
    try:
        settle(cli, conn)
        if cls is CoSocket:
            assert isinstance(cli, CoSocket) and isinstance(conn, CoSocket)
            assert cli.cosock_path == conn.cosock_path == "shm"
        cli.settimeout(None)
        conn.settimeout(None)
        yield cli, conn
    finally:
        for s in (cli, conn, srv):
            s.close()


@pytest.mark.usefixtures("cosock_agent")
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(_OPS, max_size=25))
def test_random_operation_sequences_match_plain_tcp(ops: list[tuple[int, str, Any]]) -> None:
    """The same sequence on a plain and an accelerated pair: identical traces.

    Only operations whose plain-TCP result is deterministic are issued: a blocking recv
    only when bytes (or EOF) are due, sends within what a peer's buffers hold.
    """
    plain_cls = get_original(socket, "socket")
    traces: list[list[Any]] = [[], []]
    with _pair_of(plain_cls) as plain, _pair_of(CoSocket) as accel:
        # A watchdog instead of socket timeouts (which would change MSG_WAITALL and
        # MSG_DONTWAIT): a sequence that blocks by mistake is cut off and fails.
        fired: list[bool] = []

        def cut_off() -> None:
            fired.append(True)
            for s in (*plain, *accel):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(20, cut_off)
        watchdog.start()
        try:
            _drive(ops, plain, accel, traces)
        finally:
            watchdog.cancel()
        assert not fired, "an operation blocked"
        assert traces[1] == traces[0]
        for s in accel:
            assert isinstance(s, CoSocket) and s.cosock_path == "shm"


def _drive(
    ops: list[tuple[int, str, Any]],
    plain: tuple[socket.socket, socket.socket],
    accel: tuple[socket.socket, socket.socket],
    traces: list[list[Any]],
) -> None:
    """Apply ``ops`` to both pairs, skipping those whose plain-TCP outcome would not be
    deterministic (a blocking read with nothing due, a send that could block)."""
    pending = [0, 0]  # bytes in flight towards side i
    eof = [False, False]  # side i has seen the peer's SHUT_WR
    shut = [False, False]
    for side, kind, arg in ops:
        other = 1 - side
        if kind in ("send", "sendmsg"):
            size = len(arg) if kind == "send" else sum(map(len, arg))
            if pending[other] + size > 60_000:
                continue  # stay far below any buffer: a blocking send must not block
            if not shut[side]:
                pending[other] += size
        elif kind in ("recv", "peek", "recv_into") and not pending[side]:
            if (arg or kind == "recv_into") and not eof[side]:
                continue  # would block forever on both (recv_into(buf, 0) fills buf)
        elif kind == "waitall" and pending[side] < arg and not eof[side]:
            continue  # would wait for bytes nobody sends
        elif kind == "shut_wr":
            eof[other] = True
            shut[side] = True
        for trace, pair in zip(traces, (plain, accel), strict=True):
            if kind in _READS and pending[side]:
                # The bytes are on their way: wait until they all are readable, so
                # the two transports are compared at the same state.
                want = pending[side]
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    with contextlib.suppress(BlockingIOError):  # Nagle may hold some
                        if len(pair[side].recv(want, _PEEK_NOW)) >= want:
                            break
                    time.sleep(0.001)
            trace.append((side, kind, _apply(pair[side], kind, arg)))
        r = traces[1][-1][2]
        if kind in ("recv", "dontwait", "waitall") and r[0] == "ok":
            pending[side] -= len(r[1])
        elif kind == "recv_into" and r[0] == "ok":
            pending[side] -= r[1][0]
