"""Downgrade: a live accelerated connection leaves cosock for good and continues as plain,
unframed TCP at exact byte offsets, with the peer's cooperation (``cosock._downgrade``).

What ``detach()``, the uvloop hand-over and ``SCM_RIGHTS`` need (the fd must carry the
application's stream).  Checked on real sockets: byte-exact both ways while application
threads read and write (and the residency watch runs), initiated by either side, by both
at once, crossing a path switch, from the framed path after a switch; a peer *process*
that does not call into its socket (its residency watch answers, woken by one urgent
byte); a peer that is stopped (clear timeout; the downgrade finishes once it answers)
or killed mid-downgrade (clear error, nothing hung).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import cosock
from cosock import CoSocket, FallbackReason
from cosock._intercept import get_original
from sockutil import accelerated_pair, listener, recv_all
from test_switch import _in_thread, _pump_both_ways, _wait_path

pytestmark = [pytest.mark.usefixtures("cosock_agent"), pytest.mark.timeout(120)]

_HANDED_OVER = FallbackReason.HANDED_OVER


@contextlib.contextmanager
def pair() -> Iterator[tuple[CoSocket, CoSocket]]:
    srv = listener()
    try:
        with accelerated_pair(srv, timeout=20) as (cli, conn):
            yield cli, conn
    finally:
        srv.close()


def _plain(*socks: CoSocket) -> None:
    for s in socks:
        assert s.cosock_path == "tcp" and s.cosock_fallback_reason is _HANDED_OVER, s


#### In one process: application threads and the residency watch race the downgrade


@pytest.mark.parametrize(
    "how", ["client", "server", "both", "crossing-switch", "from-framed", "twice"]
)
def test_downgrade_mid_stream_both_ways_is_byte_exact(how: str) -> None:
    with pair() as (cli, conn):

        def during() -> None:
            time.sleep(0.05)
            if how == "from-framed":
                cli.cosock_switch()
                # (pumping both: the streams may be over, and a one-sided switch waits
                # for an application call -- the residency watch answers only downgrades)
                _wait_path(cli, conn)
                assert cli.cosock_fallback_reason is None  # switched, still cosock
                time.sleep(0.03)
            if how in ("both", "crossing-switch"):
                other = conn.cosock_switch if how == "crossing-switch" else conn.cosock_downgrade
                racer = threading.Thread(target=other)
                racer.start()
                cli.cosock_downgrade()
                racer.join(30)
            elif how == "server":
                conn.cosock_downgrade()
            else:
                cli.cosock_downgrade()
                if how == "twice":
                    cli.cosock_downgrade()  # nothing left to do
                    conn.cosock_downgrade()

        sent, got = _pump_both_ways(cli, conn, 8_000_000, during)
        assert sent == got
        _wait_until(lambda: cli.cosock_path == conn.cosock_path == "tcp")
        _plain(cli, conn)
        assert cli.cosock_info()["path"] == "tcp"


def _pause_on_call(code: Any, paused: threading.Event, go: threading.Event) -> Any:
    """A trace function for one thread: stop it as it enters ``code``, once, until ``go``."""

    def tracer(frame: Any, event: str, arg: object) -> Any:
        if event == "call" and frame.f_code is code and not paused.is_set():
            paused.set()
            go.wait(10)
        return None

    return tracer


@pytest.mark.parametrize("op", ["recv", "recv_into", "sendall"])
def test_a_copy_made_just_before_a_downgrade_released_the_ring_is_kept(op: str) -> None:
    """A thread has copied ring bytes (under the busy flag) and is about to do the ring's
    bookkeeping (the producer's reading mark, the doorbell) when another thread's downgrade
    completes and releases the ring.  Its call used to fail with "operation forbidden on
    released memoryview object" although the bytes were moved (CI, 1 in ~100 mid-stream
    downgrades under load); now it returns them, and the connection goes on as plain TCP,
    byte-exact."""
    from cosock._ring import RingWriter
    from cosock._socket import CoSocket as Impl

    with pair() as (cli, conn):
        ch = conn._co
        assert ch is not None
        if op == "sendall":
            after = RingWriter.needs_bell.__code__  # the doorbell check after a ring write
            action: Any = lambda: conn.sendall(b"s" * 1000)  # noqa: E731
        else:
            cli.sendall(b"a" * 1000)
            _wait_until(lambda: ch.rx is not None and ch.rx.available() == 1000)
            after = Impl._consumed.__code__  # the reader's bookkeeping after its copy
            buf = bytearray(1000)
            action = (
                (lambda: got.append(conn.recv(1000)))
                if op == "recv"
                else (lambda: got.append(bytes(buf[: conn.recv_into(buf)])))
            )
        got: list[bytes] = []
        errors: list[BaseException] = []
        paused, go = threading.Event(), threading.Event()
        worker = _in_thread(errors, action, _pause_on_call(after, paused, go))
        try:
            assert paused.wait(10), "the copy never happened"
            conn.cosock_downgrade(timeout=20)
            assert ch.released and conn._co is None
        finally:
            go.set()
            worker.join(10)
        assert not worker.is_alive() and errors == [], errors
        if op == "sendall":
            assert recv_all(cli, 1000) == b"s" * 1000
        else:
            assert got == [b"a" * 1000]
        cli.sendall(b"after")
        assert recv_all(conn, 5) == b"after"
        conn.sendall(b"back")
        assert recv_all(cli, 4) == b"back"
        _wait_path(cli, conn)
        assert conn.cosock_path == cli.cosock_path == "tcp"


def _wait_until(cond: Any, why: Any = lambda: None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, why()
        time.sleep(0.002)


def test_downgrade_waits_for_the_handshake() -> None:
    """detach() before the server has even accepted: the verdict is awaited first, then
    the connection is downgraded; bytes written before the verdict arrive once, in order."""
    srv = listener()
    cli = CoSocket()
    cli.settimeout(20)
    box: list[Any] = []

    def client() -> None:
        cli.sendall(b"early")  # into the ring before the verdict
        box.append(socket_from(cli.detach()))

    try:
        cli.connect(srv.getsockname())
        path = cli.cosock_path  # no verdict before the server accepts
        t = threading.Thread(target=client)
        t.start()
        time.sleep(0.2)  # (usually detach() waits for the verdict; either way is correct)
        conn, _ = srv.accept()
        conn.settimeout(20)
        try:
            conn.sendall(b"EARLY")
            assert recv_all(conn, 5) == b"early"
            t.join(20)
            (raw,) = box
            assert path == "handshake"
            try:
                assert recv_all(raw, 5) == b"EARLY"
                raw.sendall(b"late")
                assert recv_all(conn, 4) == b"late"
                _plain(conn)
            finally:
                raw.close()
        finally:
            conn.close()
    finally:
        cli.close()
        srv.close()


def socket_from(fd: int) -> Any:
    raw = get_original(socket, "socket")(fileno=fd)
    raw.settimeout(10)
    return raw


#### A peer process


_PEER = """
import json, os, socket, sys, cosock
cosock.enable()
srv = socket.create_server(("127.0.0.1", 0))
print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
conn, _ = srv.accept()
conn.settimeout(20)
assert conn.recv(1) == b"?"
conn.sendall(b"!")
conn.sendall(b"S" * 300_000)  # into the ring: the parent does not read it yet
print(json.dumps({"path": conn.cosock_path}), flush=True)
sys.stdin.readline()  # idle: not one call into the socket meanwhile
got = b""
while len(got) < 500_000:
    chunk = conn.recv(500_000 - len(got))
    if not chunk:
        break
    got += chunk
conn.sendall(b"after")
print(json.dumps({"exact": got == b"P" * 500_000, "n": len(got), "path": conn.cosock_path,
                  "reason": conn.cosock_info()["fallback_reason"]}), flush=True)
sys.stdin.readline()
"""


@contextlib.contextmanager
def _peer(code: str) -> Iterator[tuple[subprocess.Popen[str], CoSocket]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["port"]
        cosock.enable()
        try:
            cli = socket.create_connection(("127.0.0.1", port), timeout=20)
        finally:
            cosock.disable()
        assert isinstance(cli, CoSocket)
        try:
            cli.sendall(b"?")
            assert recv_all(cli, 1) == b"!"
            yield proc, cli
        finally:
            cli.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


def _line(proc: subprocess.Popen[str]) -> Any:
    assert proc.stdout is not None
    return json.loads(proc.stdout.readline())


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGSTOP, and wait until it took effect (delivery is asynchronous: a thread of the
    peer could still answer for a moment)."""
    proc.send_signal(signal.SIGSTOP)
    _wait_until(lambda: _thread_states(proc.pid) == {"T"})


def _thread_states(pid: int) -> set[str]:
    states = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            states.add(f.read().rsplit(")", 1)[1].split()[0])
    return states


def _tell(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()


def test_an_idle_peer_process_answers_through_its_residency_watch() -> None:
    """The peer's application is blocked in something else (stdin): its residency watch,
    woken by our urgent byte, answers.  Unread bytes both ways arrive exactly once; the
    peer's application then reads on as if nothing happened."""
    with _peer(_PEER) as (proc, cli):
        assert _line(proc) == {"path": "shm"}
        cli.sendall(b"P" * 200_000)  # unread by the peer: in its ring
        assert cli.cosock_path == "shm"
        raw = socket_from(cli.detach())
        try:
            raw.sendall(b"P" * 300_000)
            _tell(proc)
            assert recv_all(raw, 300_005) == b"S" * 300_000 + b"after"
            assert _line(proc) == {
                "exact": True,
                "n": 500_000,
                "path": "tcp",
                "reason": "handed-over",
            }
            _tell(proc)
            assert raw.recv(1) == b""
        finally:
            raw.close()


_STOPPABLE = """
import json, os, socket, sys, cosock
cosock.enable()
srv = socket.create_server(("127.0.0.1", 0))
print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
conn, _ = srv.accept()
conn.settimeout(20)
assert conn.recv(1) == b"?"
conn.sendall(b"!")
conn.sendall(b"S" * UNREAD)
print(json.dumps({"path": conn.cosock_path}), flush=True)
got = b""
while len(got) < 3:
    got += conn.recv(3 - len(got))
conn.sendall(got.upper())
sys.stdin.readline()
"""


@pytest.mark.parametrize("unread", [1000, 0])
def test_a_peer_killed_mid_downgrade_gives_a_clear_error_not_a_hang(unread: int) -> None:
    with _peer(_STOPPABLE.replace("UNREAD", str(unread))) as (proc, cli):
        assert _line(proc) == {"path": "shm"}
        if unread:
            _wait_until(lambda: cli._co is not None and cli._co.rx.available() == unread)  # type: ignore[union-attr]
        _stop(proc)
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                cli.cosock_downgrade(timeout=60)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.3)  # our PLAIN is out; the peer cannot answer
        assert t.is_alive()
        proc.kill()
        proc.wait()
        t.join(20)
        assert not t.is_alive(), "the downgrade hung on a dead peer"
        (exc,) = outcome
        if unread:
            assert isinstance(exc, ConnectionResetError), exc
            assert f"{unread} received bytes are only in shared memory" in str(exc)
            assert cli.cosock_path == "shm"  # still readable: what the peer left in the ring
            assert recv_all(cli, unread + 1) == b"S" * unread
            cli.cosock_downgrade()  # all read: the fd is honest as it is (EOF / reset)
        else:
            assert exc is None
        assert cli.cosock_path == "tcp"
        try:
            assert cli.recv(1) == b""
        except ConnectionResetError:
            pass  # the dead peer's kernel reset: what a plain socket reports too


def test_a_stopped_peer_times_out_clearly_and_the_downgrade_finishes_later() -> None:
    with _peer(_STOPPABLE.replace("UNREAD", "10")) as (proc, cli):
        assert _line(proc) == {"path": "shm"}
        _stop(proc)
        try:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match="did not answer the downgrade"):
                cli.cosock_downgrade(timeout=0.5)
            assert time.monotonic() - t0 < 15
        finally:
            proc.send_signal(signal.SIGCONT)
        # The socket is still usable; the peer's answer finishes the downgrade.
        cli.sendall(b"abc")
        assert recv_all(cli, 13) == b"S" * 10 + b"ABC"
        _wait_until(lambda: (cli.recv(0), cli.cosock_path)[1] == "tcp")
        assert cli.cosock_fallback_reason is _HANDED_OVER


def test_status_lists_both_ends_as_handed_over() -> None:
    from cosock import _census

    with pair() as (cli, conn):
        cli.cosock_downgrade()
        _wait_path(cli, conn, path="tcp")
        rows = {(r["local_port"], r["peer_port"]): r for r in _census.snapshot()["connections"]}
        for s in (cli, conn):
            row = rows[(s.getsockname()[1], s.getpeername()[1])]
            assert (row["path"], row["fallback_reason"]) == ("tcp", "handed-over"), row


def test_sha_of_a_large_transfer_across_a_detach() -> None:
    """A sender blocked on a full ring while the receiver detaches: the rest of the
    stream comes through the fd, in order (digest over 20 MB)."""
    with pair() as (cli, conn):
        data = os.urandom(1 << 20) * 20
        sender = threading.Thread(target=conn.sendall, args=(data,))
        sender.start()
        digest = hashlib.sha256(recv_all(cli, 3_000_000))
        raw = socket_from(cli.detach())
        try:
            digest.update(recv_all(raw, len(data) - 3_000_000))
            sender.join(30)
            assert digest.digest() == hashlib.sha256(data).digest()
        finally:
            raw.close()


def test_detach_refuses_bytes_only_this_object_holds_then_hands_over_once_read() -> None:
    """After a path switch a selector's pump parses the peer's DATA frames into the
    socket (they are off the kernel's queue): detach() cannot hand those over, so it says
    so and detaches nothing; once the application has read them, it hands over."""
    with pair() as (cli, conn):
        cli.cosock_switch()
        _wait_path(cli, conn)
        conn.sendall(b"x" * 100)
        _wait_until(lambda: (cli._cosock_pump(), cli._rxb)[1] is not None)
        with pytest.raises(OSError, match="read them before handing the socket over") as exc:
            cli.detach()
        assert exc.value.errno == errno.EBUSY
        assert cli.fileno() != -1
        assert recv_all(cli, 100) == b"x" * 100
        raw = socket_from(cli.detach())
        try:
            conn.sendall(b"after")
            assert recv_all(raw, 5) == b"after"
            raw.sendall(b"back")
            assert recv_all(conn, 4) == b"back"
        finally:
            raw.close()
