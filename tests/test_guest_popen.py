"""The guest command server's interactive ``popen`` (what ``QemuLab.popen`` rides on), run on
the host: a real server on loopback, real children, the host side through a namespace socket
like the lab's. No VM: the VM suites use it under TCG; here every edge is quick to reach."""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import requires_root
from cosock.lab.qemu import GuestCommandError
from cosock.lab.qemu._guestd import Server
from cosock.lab.qemu._popen import LOST, GuestPopen, popen

pytestmark = [requires_root]

TOKEN = "t0ken"
OWN_NETNS = Path("/proc/self/ns/net")


@pytest.fixture
def server() -> Iterator[int]:
    """A command server on 127.0.0.1 (its port), stopped afterwards."""
    srv = Server(0, TOKEN, host="127.0.0.1")
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        thread.join()
        srv.server_close()


def start(port: int, argv: list[str], token: str = TOKEN, **kw: bool) -> GuestPopen:
    opts = {"stdin": True, "stdout": True, **kw}
    return popen(OWN_NETNS, "127.0.0.1", token, argv, port=port, **opts)


def read_until(proc: GuestPopen, want: bytes, timeout: float = 10.0) -> bytes:
    """What ``Peer.read`` does: select + os.read on ``stdout.fileno()``."""
    assert proc.stdout is not None
    fd, buf = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while want not in buf:
        remaining = deadline - time.monotonic()
        assert remaining > 0 and select.select([fd], [], [], remaining)[0], (buf, _state(proc))
        data = os.read(fd, 65536)
        if not data:
            break
        buf += data
    return buf


def _state(proc: GuestPopen) -> str:
    """What a stuck child is doing (for the failure message)."""
    out = []
    for task in Path(f"/proc/{proc.pid}").glob("task/*"):
        try:
            stat = (task / "stat").read_text().rpartition(")")[2].split()[0]
            out.append(f"{task.name} {stat} {(task / 'wchan').read_text()}")
        except OSError:
            pass
    kids = [c for p in Path("/proc").glob("[0-9]*") if (c := _ppid_child(p, proc.pid))]
    return f"child {proc.pid}: {out or 'gone'}; its children {kids}"


def _ppid_child(p: Path, ppid: int) -> str:
    try:
        stat = (p / "stat").read_text()
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == ppid:
            return f"{p.name} {fields[0]} {(p / 'cmdline').read_bytes()!r}"
    except (OSError, ValueError, IndexError):
        pass
    return ""


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def close(proc: GuestPopen) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def test_stdin_stdout_and_exit_status_like_popen(server: int) -> None:
    proc = start(server, [sys.executable, "-u", "-c", CAT_THEN_EXIT])
    assert proc.poll() is None and proc.pid > 0
    assert proc.stdin is not None
    for i in range(3):
        proc.stdin.write(f"line {i}\n".encode())
        proc.stdin.flush()
        assert read_until(proc, b"\n") == f"line {i}\n".encode()
    proc.stdin.close()  # EOF reaches the child, which answers and exits 3
    assert read_until(proc, b"bye") == b"bye"
    assert proc.wait(10) == 3
    assert proc.stdout is not None and os.read(proc.stdout.fileno(), 10) == b""
    close(proc)
    assert gone(proc.pid)


CAT_THEN_EXIT = """
import sys
for line in sys.stdin:
    sys.stdout.write(line)
sys.stdout.write("bye")
sys.exit(3)
"""


def test_large_output_arrives_whole_and_stderr_can_join_it(server: int) -> None:
    script = "import sys; sys.stdout.buffer.write(b'x' * 5_000_000); print('err', file=sys.stderr)"
    proc = start(server, [sys.executable, "-c", script], stdin=False, stderr_to_stdout=True)
    assert proc.stdin is None
    out = read_until(proc, b"err\n", timeout=30)
    assert out.count(b"x") == 5_000_000 and out.endswith(b"err\n")
    assert proc.wait(10) == 0
    close(proc)


def test_kill_and_terminate_reach_the_child(server: int) -> None:
    proc = start(server, ["sleep", "600"])
    proc.kill()
    assert proc.wait(10) == -9
    close(proc)
    assert gone(proc.pid)
    proc = start(server, ["sleep", "600"])
    proc.terminate()
    assert proc.wait(10) == -15
    proc.kill()  # after the end: nothing, as with Popen
    close(proc)


def test_a_missing_program_is_status_127_and_nothing_runs(server: int) -> None:
    proc = start(server, ["/nonexistent/program", "x"])
    assert proc.poll() == 127 and proc.wait(0) == 127
    assert proc.lost is not None and "nonexistent" in proc.lost
    assert proc.stdout is not None and os.read(proc.stdout.fileno(), 10) == b""
    proc.kill()  # finished: nothing to signal
    assert proc.stdin is not None and proc.stdin.closed
    close(proc)


def test_a_wrong_token_or_no_command_is_a_clear_error_and_starts_nothing(server: int) -> None:
    before = set(Path("/proc").glob("[0-9]*"))
    with pytest.raises(GuestCommandError, match="bad token"):
        start(server, ["sleep", "600"], token="wrong")
    with pytest.raises(GuestCommandError, match="no command given"):
        start(server, [])
    assert not [p for p in set(Path("/proc").glob("[0-9]*")) - before if _is_sleep(p)]


def _is_sleep(proc_dir: Path) -> bool:
    try:
        return (proc_dir / "cmdline").read_bytes().startswith(b"sleep\x00600")
    except OSError:
        return False


def test_a_dropped_connection_kills_the_child_and_its_session(server: int) -> None:
    """The host side vanishes (its socket closed, no kill sent): the server kills the child's
    whole session, grandchildren included; the host side reports the status as lost."""
    proc = start(server, ["sh", "-c", "sleep 600 & echo $!; wait"])
    grandchild = int(read_until(proc, b"\n"))
    assert Path(f"/proc/{grandchild}").exists()
    proc._drop()
    assert proc.wait(10) == LOST and proc.lost
    assert gone(proc.pid) and gone(grandchild)
    close(proc)


def test_an_unreachable_server_is_a_clear_error(server: int) -> None:
    with pytest.raises(GuestCommandError, match=r"command server of guest at 127\.0\.0\.1"):
        popen(OWN_NETNS, "127.0.0.1", TOKEN, ["true"], stdin=False, stdout=False, port=1)


def test_output_that_came_with_the_reply_line_is_delivered_at_once() -> None:
    """The child's first output and even its status can arrive in the same read as the reply
    line; nothing more may come (it waits for a command): it must be delivered anyway."""
    import socket

    from cosock.lab.qemu._guestd import frame

    ours, theirs = socket.socketpair()
    early = frame(b"o", b'{"listening": 1}\n')
    proc = GuestPopen(ours, ["peer"], 42, early, stdin=True, out=True)
    try:
        assert read_until(proc, b"\n", timeout=5) == b'{"listening": 1}\n'
        assert proc.poll() is None
        theirs.sendall(frame(b"x", b"0"))
        assert proc.wait(5) == 0
    finally:
        theirs.close()
        close(proc)
