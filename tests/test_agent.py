"""Host agent and its client: real agent processes and real Unix sockets, no mocks."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import cosock
from cosock import AgentUnavailable
from cosock.agent import (
    AgentClient,
    AgentRejected,
    agent_answers,
    ensure_agent,
    register_guest,
    status,
    unregister_guest,
)
from cosock.agent._wire import LineReader, LineTooLong, WireError, decode, encode

SELF_NETNS = os.stat("/proc/self/ns/net").st_ino
SRC = str(Path(cosock.__file__).resolve().parents[1])
FAKE_NETNS = 4_000_000_001  # an inode no real namespace here has


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "COSOCK_ENABLE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, env.get("PYTHONPATH")]))
    return env


def _wait(pred: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _kill(pid: int) -> None:
    """SIGKILL and reap (or wait for the zombie, if it is not our child)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        _wait(lambda: _gone(pid))


def _agent_pids(path: Path) -> list[int]:
    """Live agent processes serving ``path``, found by their command line."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"cosock.agent" in argv and str(path).encode() in argv and not _gone(int(entry.name)):
            pids.append(int(entry.name))
    return pids


class Agent:
    """``python -m cosock.agent`` in a subprocess, restartable on the same path."""

    def __init__(self, path: Path, host: str, auto: bool) -> None:
        self.path, self.host, self.auto = path, host, auto
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Agent:
        argv = [sys.executable, "-m", "cosock.agent", "--socket", str(self.path)]
        argv += ["--host", self.host] + (["--auto"] if self.auto else [])
        argv += ["--trust-listeners"]  # these tests register listeners without sockets
        proc = self.proc = subprocess.Popen(
            argv, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        assert _wait(lambda: agent_answers(self.path) or proc.poll() is not None)
        assert proc.poll() is None, "agent exited at start-up"
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(5)


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    if len(str(tmp_path)) < 70:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="cs-agent-"))
    yield short
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def make_agent(sock_dir: Path) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(auto: bool = True, host: str = "h1", name: str = "agent.sock") -> Agent:
        agent = Agent(sock_dir / name, host, auto).start()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.kill()


@pytest.fixture
def make_client() -> Iterator[Callable[[Path], AgentClient]]:
    clients: list[AgentClient] = []

    def make(path: Path) -> AgentClient:
        clients.append(AgentClient(path))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


def _spawn_listener(
    path: Path, port: int, children: list[subprocess.Popen[str]], **kw: Any
) -> subprocess.Popen[str]:
    """A process that registers a listener, says so, and waits for stdin to close."""
    code = textwrap.dedent(
        f"""
        import json, os, sys
        from pathlib import Path
        from cosock.agent import AgentClient
        c = AgentClient(Path({str(path)!r}))
        c.listen("0.0.0.0", {port}, "/rv/child")
        me = c.self_guest
        print(json.dumps({{"guest": me and me.name, "netns": os.stat("/proc/self/ns/net").st_ino}}))
        sys.stdout.flush()
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        **kw,
    )
    children.append(proc)
    return proc


def _child_said(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"child failed (exit {proc.wait(5)})"
    result: dict[str, Any] = json.loads(line)
    return result


#### Wire format (pure)


def test_wire_roundtrip_and_errors() -> None:
    msg = {"op": "listen", "addr": "::1", "port": 80, "s": "é\n"}
    line = encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line[:-1]) == msg
    for bad in (
        b"garbage",
        b"[1]",
        b'"x"',
        b"NaN",
        b'{"a": Infinity}',
        b"\xff\xfe",
        b"[" * 100_000,
    ):
        with pytest.raises(WireError):
            decode(bad)
    reader = LineReader(limit=10)
    reader.feed(b'{"a":1}\n{"b"')
    assert reader.next_line() == b'{"a":1}'
    assert reader.next_line() is None
    reader.feed(b":2}\n")
    assert reader.next_line() == b'{"b":2}'
    reader.feed(b"x" * 11)
    with pytest.raises(LineTooLong):
        reader.next_line()
    with pytest.raises(LineTooLong):  # poisoned for good
        reader.next_line()


#### Subscriptions and guests


def test_subscribe_gets_auto_guest(
    make_agent: Callable[..., Agent], make_client: Callable[[Path], AgentClient]
) -> None:
    agent = make_agent(auto=True)
    client = make_client(agent.path)
    assert client.available and client.unavailable_reason is None
    me = client.self_guest
    assert me is not None
    assert (me.name, me.netns, me.addresses, me.host) == (
        f"netns-{SELF_NETNS}",
        SELF_NETNS,
        (),
        "h1",
    )
    snap = client.snapshot
    assert snap is not None and snap["host"] == "h1" and snap["self"]["name"] == me.name
    rv = client.rendezvous_dir
    assert rv == agent.path.parent / "rv" and rv.is_dir()
    assert rv.stat().st_mode & 0o777 == 0o700  # per-user mode
    assert agent.path.parent.stat().st_mode & 0o777 == 0o700
    st = status(agent.path)
    assert {"pid": os.getpid(), "netns": SELF_NETNS, "guest": me.name} in st["subscribers"]


def test_register_guest_becomes_self_before_reply(
    make_agent: Callable[..., Agent], make_client: Callable[[Path], AgentClient]
) -> None:
    agent = make_agent(auto=False)
    client = make_client(agent.path)
    assert client.available and client.self_guest is None
    with pytest.raises(AgentRejected, match="not a known guest"):
        client.listen("0.0.0.0", 8000, "/rv/x")
    register_guest(agent.path, "g1", SELF_NETNS, ["10.9.0.2", "::ffff:10.9.0.20"])
    # No sleep: the push was queued to us before register_guest got its reply.
    assert client.self_guest == cosock.agent.GuestInfo(
        "g1", SELF_NETNS, ("10.9.0.2", "10.9.0.20"), "h1"
    )
    unregister_guest(agent.path, "g1")
    assert client.self_guest is None
    unregister_guest(agent.path, "g1")  # idempotent


def test_listen_is_visible_to_others_once_it_returns(
    make_agent: Callable[..., Agent], make_client: Callable[[Path], AgentClient]
) -> None:
    agent = make_agent()
    server, observer = make_client(agent.path), make_client(agent.path)
    assert observer.available
    for port in range(9000, 9030):
        server.listen("0.0.0.0", port, f"/rv/{port}")
        info, reason = observer.lookup("127.0.0.1", port)  # only the non-blocking drain
        assert info is not None, reason
        assert (info.port, info.rendezvous, info.pid) == (port, f"/rv/{port}", os.getpid())
    server.unlisten("0.0.0.0", 9000)
    assert observer.lookup("127.0.0.1", 9000) == (None, "no-listener")


def test_lookup_rules(
    make_agent: Callable[..., Agent], make_client: Callable[[Path], AgentClient]
) -> None:
    agent = make_agent(auto=False)
    register_guest(agent.path, "g1", SELF_NETNS, ["10.9.0.2", "fd00::2"])
    register_guest(agent.path, "g2", FAKE_NETNS, ["10.9.0.3"])
    register_guest(agent.path, "far", FAKE_NETNS + 1, ["10.9.0.4"], host="elsewhere")
    client = make_client(agent.path)
    client.listen("0.0.0.0", 8080, "/rv/a")
    client.listen("127.0.0.1", 8081, "/rv/b")
    client.listen("10.9.0.2", 8082, "/rv/c")
    client.listen("::", 8083, "/rv/d")
    client.listen("0.0.0.0", 8084, "/rv/wild")
    client.listen("10.9.0.2", 8084, "/rv/exact")

    def found(ip: str, port: int) -> str:
        info, reason = client.lookup(ip, port)
        return info.rendezvous if info else reason

    assert found("127.0.0.1", 8080) == "/rv/a"
    assert found("::1", 8080) == "/rv/a"
    assert found("::ffff:10.9.0.2", 8080) == "/rv/a"
    assert found("::ffff:127.0.0.1", 8081) == "/rv/b"
    assert found("127.0.0.5", 8081) == "/rv/b"  # loopback matches a loopback bind
    assert found("10.9.0.2", 8081) == "no-listener"
    assert found("10.9.0.2", 8082) == "/rv/c"
    assert found("127.0.0.1", 8082) == "no-listener"
    assert found("FD00:0::2", 8083) == "/rv/d"
    assert found("10.9.0.2", 8084) == "/rv/exact"  # the specific bind wins
    assert found("127.0.0.1", 8084) == "/rv/wild"
    assert found("127.0.0.1", 9999) == "no-listener"
    assert found("10.9.0.3", 8080) == "no-listener"  # co-resident guest, nothing listens
    assert found("10.9.0.4", 8080) == "not-coresident"  # registered on another host
    assert found("192.0.2.1", 8080) == "not-coresident"
    assert found("no-such-host", 8080) == "not-coresident"
    owner = client.guest_owning("10.9.0.3")
    assert owner is not None and owner.name == "g2"
    me = client.guest_owning("127.0.0.1")
    assert me is not None and me.name == "g1" and client.guest_owning("10.9.0.2") == me
    assert client.guest_owning("10.9.0.4") is None and client.guest_owning("192.0.2.1") is None
    with pytest.raises(AgentRejected, match="already belongs"):
        register_guest(agent.path, "g3", FAKE_NETNS + 2, ["10.9.0.3"])
    with pytest.raises(AgentRejected, match="reserved"):
        register_guest(agent.path, "netns-12", FAKE_NETNS + 2, [])
    with pytest.raises(AgentRejected, match="not an IP"):
        client.listen("nonsense", 1, "/rv/x")
    unregister_guest(agent.path, "g2")
    assert found("10.9.0.3", 8080) == "not-coresident"
    # Re-registering our guest under a new name keeps our listeners (they follow the netns).
    register_guest(agent.path, "renamed", SELF_NETNS, ["10.9.0.2"])
    info, _ = client.lookup("10.9.0.2", 8082)
    assert info is not None and info.guest == "renamed"


def test_backlogged_subscriber_still_sees_the_newest_listener(
    make_agent: Callable[..., Agent], make_client: Callable[[Path], AgentClient]
) -> None:
    agent = make_agent()
    server, idle = make_client(agent.path), make_client(agent.path)
    assert idle.available
    long_path = "/rv/" + "x" * 4000  # big snapshots fill the idle socket buffer quickly
    for port in range(9100, 9160):
        server.listen("0.0.0.0", port, f"{long_path}{port}")
    # Megabytes of pushes were sent to `idle`; the agent could not write the newest one
    # until `idle` drained the backlog, yet its first lookup already sees it.
    info, reason = idle.lookup("127.0.0.1", 9159)
    assert info is not None, reason
    assert idle.snapshot is not None and len(idle.snapshot["listeners"]) == 60


def test_listeners_go_when_their_process_exits(
    make_agent: Callable[..., Agent],
    make_client: Callable[[Path], AgentClient],
    children: list[subprocess.Popen[str]],
) -> None:
    agent = make_agent()
    client = make_client(agent.path)
    proc = _spawn_listener(agent.path, 7070, children)
    assert _child_said(proc)["guest"] == f"netns-{SELF_NETNS}"
    info, reason = client.lookup("127.0.0.1", 7070)
    assert info is not None and info.pid == proc.pid, reason
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(5) == 0
    assert _wait(lambda: client.lookup("127.0.0.1", 7070) == (None, "no-listener"))
    assert status(agent.path)["listeners"] == []


#### Misbehaving clients


def _recv_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        data = sock.recv(4096)
        if not data:
            break
        buf += data
    return buf


def test_garbage_and_oversize_lines(
    make_agent: Callable[..., Agent], make_client: Callable[[Path], AgentClient]
) -> None:
    agent = make_agent()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(5)
    raw.connect(str(agent.path))
    cases = [
        (b"garbage\n", "malformed"),
        (b"[1, 2]\n", "JSON object"),
        (b"[" * 50_000 + b"\n", "malformed"),
        (b'{"op": "nope"}\n', "unknown op"),
        (b'{"no_op": 1}\n', "unknown op"),
        (b'{"op": "listen", "addr": "", "port": 80, "rendezvous": "/x"}\n', "subscribe first"),
        (b'{"op": "register_guest", "name": "", "netns": 5}\n', "name"),
        (b'{"op": "register_guest", "name": "g", "netns": true}\n', "netns"),
        (b'{"op": "register_guest", "name": "g", "netns": 5, "addresses": ["127.0.0.1"]}\n', ""),
    ]
    for line, expect in cases:
        raw.sendall(line)
        reply = json.loads(_recv_line(raw))
        assert reply["ok"] is False and expect in reply["error"], (line[:40], reply)
    raw.sendall(b'{"op": "status"}\n')  # the same connection still works
    assert json.loads(_recv_line(raw))["ok"] is True

    big = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    big.settimeout(5)
    big.connect(str(agent.path))
    try:
        big.sendall(b"x" * ((1 << 20) + 4096))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the agent may hang up before we finish: that is the point
    reply = json.loads(_recv_line(big))
    assert reply["ok"] is False and "longer than" in reply["error"]
    try:  # then disconnected: EOF, or a reset when our excess bytes were still unread
        assert big.recv(100) == b""
    except ConnectionResetError:
        pass
    big.close()
    raw.close()

    # Every op with fields of every JSON type: each gets one reply, none kills the agent.
    rng = random.Random(0)
    values: list[Any] = [None, True, 0, -1, 70000, 1.5, "", "x" * 300, "::1", [], ["10.0.0.1"], {}]
    fuzz = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fuzz.settimeout(5)
    fuzz.connect(str(agent.path))
    ops = ["register_guest", "unregister_guest", "subscribe", "listen", "unlisten", "status"]
    ops += ["connections", "metrics"]
    fields = ["name", "netns", "addresses", "host", "addr", "port", "rendezvous"]
    requests = []
    for _ in range(300):
        req = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(0, len(fields)))}
        requests.append(encode({"op": rng.choice(ops), **req}))
    fuzz.sendall(b"".join(requests))
    replies = 0
    buf = b""
    while replies < len(requests):
        data = fuzz.recv(1 << 16)
        assert data, "agent hung up on valid JSON"
        buf += data
        *lines, buf = buf.split(b"\n")
        replies += sum(1 for line in lines if "ok" in json.loads(line))
    fuzz.close()

    client = make_client(agent.path)  # the agent still serves everyone else
    assert client.available
    counters = status(agent.path)["counters"]
    assert counters["malformed"] >= 4 and counters["errors"] >= len(cases) + 1
    assert counters["dropped"] == 1


#### Agent death and restart


def test_agent_killed_then_restarted(
    make_agent: Callable[..., Agent], make_client: Callable[[Path], AgentClient]
) -> None:
    agent = make_agent()
    client = make_client(agent.path)
    client.listen("0.0.0.0", 8123, "/rv/one")
    assert client.lookup("127.0.0.1", 8123)[0] is not None

    agent.kill(signal.SIGKILL)  # leaves a stale socket file behind
    start = time.monotonic()
    info, reason = client.lookup("127.0.0.1", 8123)
    assert info is None and reason.startswith("agent-unreachable: "), reason
    for _ in range(1000):  # unavailable lookups never block
        assert client.lookup("127.0.0.1", 8123)[0] is None
    assert time.monotonic() - start < 1.0
    assert not client.available and client.unavailable_reason
    assert client.self_guest is None and client.snapshot is None
    with pytest.raises(AgentUnavailable):
        client.listen("0.0.0.0", 8124, "/rv/two")  # failed: not to be re-sent later

    agent.start()
    last_attempt = client._last_attempt
    assert last_attempt is not None
    if time.monotonic() - last_attempt < 0.9:
        assert not client.available  # the agent answers, but we are inside the back-off
    assert _wait(lambda: client.available, timeout=3)
    assert time.monotonic() - last_attempt >= 1.0
    listeners = {(x["port"], x["pid"]) for x in status(agent.path)["listeners"]}
    assert listeners == {(8123, os.getpid())}  # re-registered by the reconnect itself
    assert client.lookup("127.0.0.1", 8123)[0] is not None


def test_hung_agent_costs_one_short_wait(
    make_agent: Callable[..., Agent], make_client: Callable[[Path], AgentClient]
) -> None:
    agent = make_agent()
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGSTOP)  # accepts connections (backlog), never answers
    try:
        client = make_client(agent.path)
        start = time.monotonic()
        info, reason = client.lookup("127.0.0.1", 80)
        assert info is None and reason.startswith("agent-unreachable: ")
        assert time.monotonic() - start < 1.0
        start = time.monotonic()
        for _ in range(100):
            assert client.lookup("127.0.0.1", 80)[0] is None
        assert time.monotonic() - start < 0.1
        start = time.monotonic()
        with pytest.raises(AgentUnavailable, match="did not reply"):
            client.listen("0.0.0.0", 8200, "/rv/late")
        assert 1.9 < time.monotonic() - start < 3.0
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    assert _wait(lambda: client.available)  # reconnected after the back-off
    # The timed-out listen was settled by hanging up: the agent does not keep it.
    assert _wait(lambda: status(agent.path)["listeners"] == [])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_clean_exit_removes_socket(make_agent: Callable[..., Agent], sig: int) -> None:
    agent = make_agent()
    agent.kill(sig)
    assert agent.proc is not None and agent.proc.returncode == 0
    assert not agent.path.exists()
    assert not agent.path.with_name("agent.sock.version").exists()


#### ensure_agent


def test_ensure_agent_starts_once(sock_dir: Path) -> None:
    path = sock_dir / "auto" / "agent.sock"
    try:
        assert ensure_agent(path, host="hx") is True
        assert ensure_agent(path, host="hx") is False
        st = status(path)
        assert st["host"] == "hx" and st["auto_guests"] is True
        assert _agent_pids(path) == [st["pid"]]
        assert (path.parent / "agent.log").exists()
    finally:
        for pid in _agent_pids(path):
            _kill(pid)


def test_concurrent_ensure_agent_threads(sock_dir: Path) -> None:
    path = sock_dir / "agent.sock"
    barrier = threading.Barrier(4)
    results: list[bool] = []

    def run() -> None:
        barrier.wait()
        results.append(ensure_agent(path))

    threads = [threading.Thread(target=run) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(results) == [False, False, False, True]
        assert len(_agent_pids(path)) == 1
    finally:
        for pid in _agent_pids(path):
            _kill(pid)


def test_concurrent_ensure_agent_processes(sock_dir: Path) -> None:
    path = sock_dir / "agent.sock"
    code = (
        "import sys; from pathlib import Path; from cosock.agent import ensure_agent; "
        "print(ensure_agent(Path(sys.argv[1])))"
    )
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(path)], env=_env(), stdout=subprocess.PIPE
            )
            for _ in range(3)
        ]
        outs = sorted(p.communicate(timeout=10)[0].strip() for p in procs)
        assert outs == [b"False", b"False", b"True"]
        assert len(_agent_pids(path)) == 1
    finally:
        for pid in _agent_pids(path):
            _kill(pid)


#### Command line


def test_cli_errors_are_one_line(make_agent: Callable[..., Agent], sock_dir: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cosock.agent", *args],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=10,
        )

    for args in (("--bogus",), ("--socket",), ("--socket", str(sock_dir / "x.sock"), "--host", "")):
        result = run(*args)
        assert result.returncode != 0
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    agent = make_agent()
    result = run("--socket", str(agent.path), "--host", "h2")
    assert result.returncode != 0 and "already answers" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert agent_answers(agent.path)  # the running agent is untouched


#### Fork safety


def test_shared_client_after_fork(
    make_agent: Callable[..., Agent], monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = make_agent()
    monkeypatch.setenv("COSOCK_AGENT", str(agent.path))
    AgentClient.reset_shared()
    parent = AgentClient.shared()
    try:
        assert AgentClient.shared() is parent
        parent.listen("0.0.0.0", 6060, "/rv/parent")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: report, then leave without running pytest's cleanup
            try:
                child = AgentClient.shared()
                ok = child is not parent and child.available
                ok = ok and child.lookup("127.0.0.1", 6060)[0] is not None
                os.write(w, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        os.waitpid(pid, 0)
        # The child's copy of our connection was closed without a word: we are intact.
        assert parent.lookup("127.0.0.1", 6060)[0] is not None
        pids = {s["pid"] for s in status(agent.path)["subscribers"]}
        assert pids == {os.getpid()}
    finally:
        AgentClient.reset_shared()


#### Across network namespaces (root only)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating network namespaces needs root")
def test_other_netns_identified_by_inode(
    make_agent: Callable[..., Agent],
    make_client: Callable[[Path], AgentClient],
    children: list[subprocess.Popen[str]],
    request: pytest.FixtureRequest,
) -> None:
    netns = pytest.importorskip("pyroute2.netns")
    agent = make_agent(auto=True)
    names = [f"cstest-agent-{os.getpid()}-{i}" for i in range(2)]
    for name in names:
        netns.create(name)
        request.addfinalizer(functools.partial(netns.remove, name))
    registered, anonymous = (os.stat(f"/var/run/netns/{n}").st_ino for n in names)
    register_guest(agent.path, "g2", registered, ["10.77.0.3"])

    def enter(name: str) -> Callable[[], None]:
        return lambda: netns.setns(name)

    proc = _spawn_listener(agent.path, 7000, children, preexec_fn=enter(names[0]))
    assert _child_said(proc) == {"guest": "g2", "netns": registered}
    proc2 = _spawn_listener(agent.path, 7001, children, preexec_fn=enter(names[1]))
    assert _child_said(proc2) == {"guest": f"netns-{anonymous}", "netns": anonymous}

    client = make_client(agent.path)
    info, reason = client.lookup("10.77.0.3", 7000)
    assert info is not None and (info.guest, info.pid) == ("g2", proc.pid), reason
    owner = client.guest_owning("10.77.0.3")
    assert owner is not None and owner.netns == registered
    # The anonymous guest has no address, and loopback is ours: its listener stays private.
    assert client.lookup("127.0.0.1", 7001) == (None, "no-listener")
    subs = {s["pid"]: s["guest"] for s in status(agent.path)["subscribers"]}
    assert subs[proc.pid] == "g2" and subs[proc2.pid] == f"netns-{anonymous}"


#### Change detection and hand-over (what lab migration relies on)


def test_version_and_wait_fileno_see_pushes(
    make_agent: Callable[..., Agent], make_client: Callable[[Path], AgentClient]
) -> None:
    import select

    agent = make_agent()
    client, other = make_client(agent.path), make_client(agent.path)
    assert client.version == 0  # nothing connects before the first use
    fd = client.wait_fileno()
    v0 = client.version
    assert v0 > 0 and not select.select([fd], [], [], 0)[0]
    other.listen("0.0.0.0", 8301, "/rv/a")  # a change: the agent pushes to client
    assert select.select([fd], [], [], 5)[0] == [fd]
    v1 = client.version  # moved before any poll: read from the agent's page
    assert v1 > v0
    client.poll()
    assert not select.select([fd], [], [], 0)[0]  # drained
    assert client.lookup("127.0.0.1", 8301)[0] is not None  # the pushed table is applied
    assert client.version == v1


def test_unregister_with_disconnect_hands_processes_over(
    make_agent: Callable[..., Agent], make_client: Callable[[Path], AgentClient]
) -> None:
    """What migration does to an old agent: its guest's processes are hung up on, at once,
    and reconnect on their next poll (no 1 s back-off), re-registering their listeners."""
    import select

    agent = make_agent(auto=False)
    inode = os.stat("/proc/self/ns/net").st_ino
    register_guest(agent.path, "g1", inode, ["10.99.0.1"])
    client = make_client(agent.path)
    client.listen("0.0.0.0", 8302, "/rv/b")
    fd = client.wait_fileno()
    v0 = client.version
    assert unregister_guest(agent.path, "g1", disconnect=True) == 1
    assert select.select([fd], [], [], 5)[0] == [fd]  # EOF already, as the reply came
    assert client.version > v0
    register_guest(agent.path, "g1", inode, ["10.99.0.1"])
    client.poll()  # one poll: EOF seen, reconnected, listeners sent again
    assert client.self_guest is not None and client.self_guest.name == "g1"
    assert client.last_relisten_error is None
    listeners = {(x["port"], x["pid"]) for x in status(agent.path)["listeners"]}
    assert listeners == {(8302, os.getpid())}
    # A plain unregister leaves connections alone; a second hang-up soon after still works.
    assert unregister_guest(agent.path, "g1") == 0  # hangs up on nobody
    register_guest(agent.path, "g1", inode, ["10.99.0.1"])
    assert unregister_guest(agent.path, "g1", disconnect=True) == 1
    register_guest(agent.path, "g1", inode, ["10.99.0.1"])
    deadline = time.monotonic() + 2
    while client.self_guest is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert client.self_guest.name == "g1"
