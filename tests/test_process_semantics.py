"""Process semantics under ``cosock.enable()`` (what ``cosock run`` does), each case in a
fresh interpreter: ``os.fork`` with a live accelerated connection, ``socket.fromfd``,
``socketpair``, UDP and ``AF_UNIX`` sockets, ``getaddrinfo``.

Found here (see docs/transparency.md, "Process semantics"): a forked child that takes over a
connection keeps working on the shared-memory path, and a child's close or exit does not end
the parent's stream; a connection used by both processes after a fork continues correctly
(one owner at a time, a takeover from an exited one, else a downgrade to plain TCP);
``fromfd`` of an accelerated connection's fd used to yield a plain-TCP CoSocket on the
control stream that broke the connection (fixed: ``enable()`` wraps ``fromfd``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.usefixtures("cosock_agent"), pytest.mark.timeout(60)]

_PRELUDE = """
import json, os, socket, sys, cosock
cosock.enable()

def recv_all(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out

def shm_pair():
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname(), timeout=10)
    conn, _ = srv.accept()
    conn.settimeout(10)
    cli.sendall(b"?"); assert conn.recv(1) == b"?"
    conn.sendall(b"!"); assert cli.recv(1) == b"!"
    assert cli.cosock_path == conn.cosock_path == "shm"
    return srv, cli, conn
"""


def _run(code: str) -> Any:
    """Run ``code`` after the prelude in a new interpreter; its last stdout line as JSON."""
    out = subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_forked_child_serves_the_inherited_connection_alone() -> None:
    """The usual pattern (ForkingMixIn, pre-fork handoff): after the fork only the child
    uses the connection, both ways, while the parent keeps its copy open."""
    result = _run(
        """
        srv, cli, conn = shm_pair()
        big = os.urandom(3 << 20)  # three rings' worth: the child blocks and is woken
        pid = os.fork()
        if pid == 0:
            cli.sendall(big)
            ok = recv_all(cli, 5) == b"reply" and cli.cosock_path == "shm"
            cli.close()
            os._exit(0 if ok else 3)
        got = recv_all(conn, len(big))
        conn.sendall(b"reply")
        _, status = os.waitpid(pid, 0)
        print(json.dumps({
            "child": os.waitstatus_to_exitcode(status), "exact": got == big,
            "paths": [cli.cosock_path, conn.cosock_path],
        }))
        """
    )
    assert result == {"child": 0, "exact": True, "paths": ["shm", "shm"]}


# Both processes using one connection after a fork (``cosock._forkshare``).  Found here:
# each process kept its own ring positions, so bytes the child received were received again
# by the parent (duplicated), and a send after the other process's sends overwrote its
# unread bytes (lost).  Now the first user after the fork owns the channel; one that has
# exited or closed its copy is taken over from the positions in shared memory; one that is
# alive is asked to downgrade it, and both continue on plain TCP, as TCP would behave.


def test_parent_reads_after_the_forked_child_read() -> None:
    """The child read part and exited: the parent takes over where it stopped."""
    result = _run(
        """
        srv, cli, conn = shm_pair()
        conn.sendall(b"12345abcde")
        pid = os.fork()
        if pid == 0:
            os._exit(0 if recv_all(cli, 5) == b"12345" else 3)
        os.waitpid(pid, 0)
        print(json.dumps({"parent": cli.recv(100).decode()}))
        """
    )
    assert result == {"parent": "abcde"}


def test_parent_sends_after_the_forked_child_sent() -> None:
    """The child sent and exited: the parent's bytes follow the child's, none lost."""
    result = _run(
        """
        srv, cli, conn = shm_pair()
        pid = os.fork()
        if pid == 0:
            cli.sendall(b"child ")
            os._exit(0)
        os.waitpid(pid, 0)
        conn.settimeout(2)
        try:
            cli.sendall(b"parent")
            got = recv_all(conn, 12).decode()
        except OSError as exc:
            got = repr(exc)
        print(json.dumps({"got": got}))
        """
    )
    assert result == {"got": "child parent"}


def test_both_processes_alive_take_turns_on_plain_tcp() -> None:
    """Parent and child both alive, both reading and sending: the second to use the
    connection asks the owner (its residency watch, while its application waits on a
    pipe) to downgrade it; then the kernel's queue is shared, as with plain TCP."""
    result = _run(
        """
        srv, cli, conn = shm_pair()
        conn.sendall(b"12345abcde")
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            got = recv_all(cli, 5)
            cli.sendall(b"child ")
            os.write(done_w, got)
            os.read(go_r, 1)  # alive, not calling into the socket, while the parent works
            cli.sendall(b"again")
            os._exit(0)
        first = os.read(done_r, 5)
        rest = cli.recv(100)  # the child owns the channel: it hands it over
        cli.sendall(b"parent ")
        os.write(go_w, b"x")
        _, status = os.waitpid(pid, 0)
        got = recv_all(conn, 18).decode()
        conn.sendall(b"to whoever reads")
        print(json.dumps({
            "child_read": first.decode(), "parent_read": rest.decode(), "peer_got": got,
            "status": status, "paths": [cli.cosock_path, conn.cosock_path],
            "reason": conn.cosock_info()["fallback_reason"],
            "tail": recv_all(cli, 16).decode(),
        }))
        """
    )
    assert result == {
        "child_read": "12345",
        "parent_read": "abcde",
        "peer_got": "child parent again",
        "status": 0,
        "paths": ["tcp", "tcp"],
        "reason": "handed-over",
        "tail": "to whoever reads",
    }


def test_detach_in_one_process_while_the_forked_child_owns_the_connection() -> None:
    """The child uses the connection (and owns it), the parent detaches its copy: the
    child's watch downgrades it on request, so the parent's fd is an honest TCP stream
    that the child keeps sharing."""
    result = _run(
        """
        srv, cli, conn = shm_pair()
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            cli.sendall(b"child ")
            os.write(done_w, b"x")
            os.read(go_r, 1)
            cli.sendall(b"again")
            os._exit(0)
        os.read(done_r, 1)
        raw = socket.socket.__mro__[1](fileno=cli.detach())
        raw.sendall(b"raw ")
        os.write(go_w, b"x")
        os.waitpid(pid, 0)
        got = recv_all(conn, 15).decode()
        conn.sendall(b"back")
        raw.settimeout(10)
        print(json.dumps({"got": got, "back": recv_all(raw, 4).decode(),
                          "path": conn.cosock_path}))
        """
    )
    assert result == {"got": "child raw again", "back": "back", "path": "tcp"}


def test_forked_child_closing_at_exit_does_not_end_the_parents_stream() -> None:
    result = _run(
        """
        srv, cli, conn = shm_pair()
        pid = os.fork()
        if pid == 0:
            os._exit(0)  # without touching it
        os.waitpid(pid, 0)
        pid = os.fork()
        if pid == 0:
            cli.close(); conn.close()
            sys.exit(0)  # a regular exit: atexit hooks, garbage collection
        os.waitpid(pid, 0)
        conn.sendall(b"x" * 100000)
        n = len(recv_all(cli, 100000))
        cli.shutdown(socket.SHUT_WR)
        print(json.dumps({"n": n, "eof": conn.recv(1) == b"", "path": cli.cosock_path}))
        """
    )
    assert result == {"n": 100000, "eof": True, "path": "shm"}


_RECEIVER = """
import socket, sys, multiprocessing.connection, multiprocessing.reduction
unix = int(sys.argv[2])
if sys.argv[1] == "send_fds":
    _, fds, _, _ = socket.recv_fds(socket.socket(fileno=unix), 10, 1)
    fd = fds[0]
else:
    fd = multiprocessing.reduction.recv_handle(multiprocessing.connection.Connection(unix))
t = socket.socket(fileno=fd)
t.settimeout(10)
got = b""
while len(got) < 22:
    got += t.recv(22 - len(got))
t.sendall(got.upper())
print(got.decode(), flush=True)
"""


@pytest.mark.parametrize("how", ["send_fds", "multiprocessing.reduction"])
def test_accelerated_fd_passed_to_another_process(how: str) -> None:
    """An accelerated connection's fd sent with SCM_RIGHTS to a process that has no channel
    for it: sending it downgrades the connection first, so that process reads and writes
    an honest TCP stream (bytes unread at that moment included), and the sender keeps a
    working plain socket on the same connection.  Found: the receiver used to read the
    control stream (frames), and the ring's bytes were lost to it."""
    result = _run(
        f"""
        import subprocess, multiprocessing.connection, multiprocessing.reduction
        srv, cli, conn = shm_pair()
        conn.sendall(b"unread before the pass")
        here, there = socket.socketpair()
        receiver = subprocess.Popen(
            [sys.executable, "-c", {_RECEIVER!r}, {how!r}, str(there.fileno())],
            pass_fds=[there.fileno()], stdout=subprocess.PIPE)
        there.close()
        if {how!r} == "send_fds":
            socket.send_fds(here, [b"x"], [cli.fileno()])
        else:
            multiprocessing.reduction.send_handle(
                multiprocessing.connection.Connection(here.detach()), cli.fileno(), receiver.pid)
        out, _ = receiver.communicate(timeout=30)
        upper = recv_all(conn, 22).decode()
        cli.sendall(b"sender still here")
        print(json.dumps({{
            "receiver_got": out.decode().strip(),
            "peer_got": upper + recv_all(conn, 17).decode(),
            "paths": [cli.cosock_path, conn.cosock_path],
            "reason": conn.cosock_info()["fallback_reason"], "rc": receiver.returncode,
        }}))
        """
    )
    assert result == {
        "receiver_got": "unread before the pass",
        "peer_got": "UNREAD BEFORE THE PASSsender still here",
        "paths": ["tcp", "tcp"],
        "reason": "handed-over",
        "rc": 0,
    }


def test_accelerated_socket_pickled_for_a_spawned_pool_worker() -> None:
    """multiprocessing pickles a socket with a duplicate of its fd.  Found: a CoSocket
    could not be pickled at all ("cannot pickle 'CoSocket' object") when
    ``multiprocessing.reduction`` was imported before ``enable()``, and when imported
    after, an accelerated one went without its channel (the worker read control frames).
    Now an accelerated one is downgraded first, so the worker reads the bytes that were
    unread at that moment and talks on plain TCP.  ``disable()`` restores the reducer
    registry exactly."""
    result = _run(
        """
        import multiprocessing as mp, _socket
        from multiprocessing.reduction import ForkingPickler
        from cosock import CoSocket
        srv, cli, conn = shm_pair()
        conn.sendall(b"hello")
        # Blocking (the worker's socket shares the fd's O_NONBLOCK flag): the peer resends
        # the bytes unread at the hand-over, and they may still be on their way.
        cli.settimeout(None)
        with mp.get_context("spawn").Pool(1) as pool:
            got = pool.apply(_socket.socket.recv, (cli, 5))
            pool.apply(_socket.socket.sendall, (cli, b"from the pool"))
        back = recv_all(conn, 13)
        ours = ForkingPickler._extra_reducers[CoSocket].__module__
        cosock.disable()
        after = ForkingPickler._extra_reducers.get(CoSocket)
        print(json.dumps({"got": got.decode(), "back": back.decode(),
                          "paths": [cli.cosock_path, conn.cosock_path],
                          "reason": conn.cosock_info()["fallback_reason"],
                          "registered": ours, "after": getattr(after, "__name__", None)}))
        """
    )
    assert result == {
        "got": "hello",
        "back": "from the pool",
        "paths": ["tcp", "tcp"],
        "reason": "handed-over",
        "registered": "cosock._mpreduce",
        # multiprocessing.reduction was imported after enable(): it had registered its
        # own reducer for socket.socket, i.e. CoSocket, and gets it back.
        "after": "_reduce_socket",
    }


def test_socket_pickled_when_multiprocessing_was_imported_before_enable(tmp_path: Path) -> None:
    """The case that failed outright: ``multiprocessing`` imported first (its reducer
    registered for the stdlib class only), then ``enable()``."""
    script = tmp_path / "prog.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, multiprocessing as mp, _socket, socket
            import cosock

            if __name__ == "__main__":
                cosock.enable()
                srv = socket.create_server(("127.0.0.1", 0))
                cli = socket.create_connection(srv.getsockname(), timeout=10)
                conn, _ = srv.accept()
                conn.settimeout(10)
                cli.sendall(b"?"); assert conn.recv(1) == b"?"
                conn.sendall(b"!"); assert cli.recv(1) == b"!"
                conn.sendall(b"hello")
                cli.settimeout(None)  # blocking: see the test above
                with mp.get_context("spawn").Pool(1) as pool:
                    got = pool.apply(_socket.socket.recv, (cli, 5))
                cosock.disable()
                from multiprocessing.reduction import ForkingPickler
                from cosock import CoSocket
                print(json.dumps({"got": got.decode(), "path": conn.cosock_path,
                                  "left": CoSocket in ForkingPickler._extra_reducers}))
            """
        )
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "got": "hello",
        "path": "tcp",
        "left": False,
    }


def test_fromfd_of_a_plain_connection_works() -> None:
    """A connection that is plain TCP (peer not a cosock listener): ``fromfd`` gives a
    working socket on the same connection."""
    result = _run(
        """
        import _socket
        plain_srv = socket.socket.__mro__[1](socket.AF_INET, socket.SOCK_STREAM)
        plain_srv.bind(("127.0.0.1", 0)); plain_srv.listen()
        cli = socket.create_connection(plain_srv.getsockname(), timeout=10)
        conn, _ = plain_srv.accept()
        twin = socket.fromfd(cli.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        twin.sendall(b"via twin"); got = recv_all(conn, 8)
        conn.sendall(b"back"); back = recv_all(twin, 4)
        print(json.dumps({"type": type(twin).__name__, "got": got.decode(),
                          "back": back.decode(), "path": cli.cosock_path}))
        """
    )
    assert result == {"type": "CoSocket", "got": "via twin", "back": "back", "path": "tcp"}


def test_fromfd_of_an_accelerated_connection_shares_it() -> None:
    """Found here: ``fromfd`` used to wrap a dup of the control fd in a channel-less
    CoSocket whose sends reset the connection ('unknown frame type'); ``enable()`` now
    wraps ``socket.fromfd`` so that the new socket shares the channel, like ``dup()``."""
    result = _run(
        """
        srv, cli, conn = shm_pair()
        twin = socket.fromfd(cli.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        try:
            twin.sendall(b"via twin"); got = recv_all(conn, 8).decode()
            conn.sendall(b"back"); back = recv_all(twin, 4).decode()
        except OSError as exc:
            got = back = repr(exc)
        print(json.dumps({"got": got, "back": back, "path": conn.cosock_path}))
        """
    )
    assert result == {"got": "via twin", "back": "back", "path": "shm"}


def test_socketpair_udp_and_unix_sockets_are_untouched(tmp_path: Path) -> None:
    result = _run(
        f"""
        out = {{}}
        a, b = socket.socketpair()
        a.sendall(b"pair" * 50000); b.settimeout(5)
        out["pair"] = [type(a).__name__, len(recv_all(b, 200000)), a.family == socket.AF_UNIX,
                       getattr(a, "cosock_path", None)]
        u1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u1.bind(("127.0.0.1", 0))
        u2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u2.bind(("127.0.0.1", 0))
        u2.sendto(b"datagram", u1.getsockname()); u1.settimeout(5)
        data, addr = u1.recvfrom(100)
        out["udp"] = [data.decode(), addr == u2.getsockname(), u1.type == socket.SOCK_DGRAM]
        path = {str(tmp_path / "u.sock")!r}
        us = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); us.bind(path); us.listen()
        uc = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); uc.settimeout(5)
        uc.connect(path); ua, _ = us.accept()
        uc.sendall(b"unix" * 25000); ua.settimeout(5)
        out["unix"] = [len(recv_all(ua, 100000)), ua.getsockname() == path]
        from cosock._census import snapshot
        out["listed"] = len(snapshot()["connections"])
        print(json.dumps(out))
        """
    )
    assert result == {
        "pair": ["CoSocket", 200000, True, "tcp"],
        "udp": ["datagram", True, True],
        "unix": [100000, True],
        "listed": 0,
    }


def test_getaddrinfo_and_resolution_helpers_are_unchanged() -> None:
    result = _run(
        """
        cosock.disable()
        queries = [("localhost", 80), ("127.0.0.1", 0), ("::1", 8080, socket.AF_INET6),
                   ("localhost", "http", 0, socket.SOCK_STREAM), (None, 0, 0, 0, 0,
                   socket.AI_PASSIVE)]
        names = ["getaddrinfo", "gethostbyname", "getfqdn", "inet_pton", "create_connection",
                 "create_server", "socketpair"]
        before = {n: getattr(socket, n) for n in names}
        plain = [socket.getaddrinfo(*q) for q in queries]
        cosock.enable()
        same = {n: getattr(socket, n) is before[n] for n in names}
        print(json.dumps({"same": same, "results": [socket.getaddrinfo(*q) for q in queries]
                          == plain}))
        """
    )
    assert result["results"] is True
    assert all(result["same"].values()), result["same"]


@pytest.mark.parametrize(
    "argv",
    [["run", "--", "no-such-program-xyz"], ["run", "no-such-program-xyz"]],
    ids=["fast-path", "cli"],
)
def test_cosock_run_missing_program_is_127_like_the_shell(argv: list[str]) -> None:
    """``cosock run -- CMD`` skips the CLI framework (it starts every program); both
    forms answer a missing program the same way."""
    out = subprocess.run(
        [sys.executable, "-m", "cosock", *argv], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 127
    assert out.stderr == "cosock: command not found: no-such-program-xyz\n"


def test_disable_with_open_connections_and_mixed_sockets() -> None:
    """Issue 5, bad input: ``disable()`` while connections are open (they keep working, on
    shared memory); a program mixing plain and cosock sockets (a plain client of a cosock
    listener, a cosock client of a plain listener) gets correct, plain-TCP connections."""
    result = _run(
        """
        import threading
        srv, cli, conn = shm_pair()
        cosock.disable()
        big = os.urandom(3 << 20)
        box = []
        reader = threading.Thread(target=lambda: box.append(recv_all(conn, len(big))))
        reader.start(); cli.sendall(big); reader.join(30)
        conn.sendall(b"still here"); back = recv_all(cli, 10)
        out = {"open": [box == [big], back.decode(), cli.cosock_path, conn.cosock_path]}
        plain = socket.socket(); plain.settimeout(10)  # disabled: the stdlib class
        plain.connect(srv.getsockname()); accepted, _ = srv.accept()
        plain.sendall(b"plain to cosock"); got = recv_all(accepted, 15)
        out["plain_client"] = [type(plain).__name__, got.decode(), accepted.cosock_path,
                               accepted.cosock_info().get("fallback_reason")]
        psrv = socket.create_server(("127.0.0.1", 0))
        cosock.enable()
        co = socket.create_connection(psrv.getsockname(), timeout=10); peer, _ = psrv.accept()
        co.sendall(b"cosock to plain"); got = recv_all(peer, 15)
        # (the stdlib's accept() builds its socket from the module's class at call time)
        out["cosock_client"] = [type(co).__name__, peer.cosock_path, got.decode(),
                                co.cosock_path, co.cosock_info().get("fallback_reason")]
        print(json.dumps(out))
        """
    )
    assert result == {
        "open": [True, "still here", "shm", "shm"],
        "plain_client": ["socket", "plain to cosock", "tcp", "no-offer"],
        "cosock_client": ["CoSocket", "tcp", "cosock to plain", "tcp", "not-coresident"],
    }
