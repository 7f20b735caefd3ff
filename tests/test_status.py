"""``cosock status``: the connections of this host's processes as the agent reports them.

Real connections (loopback guest, private agent): each process publishes its own census
file, the agent reads them; checked against what the sockets themselves say and against
the bytes sent. Also the CLI (JSON, Prometheus text, watch, errors) in subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cosock import CoSocket
from cosock.agent.client import connections, metrics
from sockutil import accelerated_pair, listener, recv_all, wait_for

pytestmark = pytest.mark.usefixtures("cosock_agent")

_TESTS = Path(__file__).parent


_wait = wait_for  # the census publishes once a second


def _rows(agent: Path, pid: int | None = None) -> dict[tuple[str, int, str, int], Any]:
    """Connections listed by the agent (of ``pid`` only if given), by 4-tuple."""
    out = {}
    for proc in connections(agent)["processes"]:
        if pid is None or proc["pid"] == pid:
            for c in proc["connections"]:
                out[(c["local_addr"], c["local_port"], c["peer_addr"], c["peer_port"])] = c
    return out


def _key(sock: socket.socket) -> tuple[str, int, str, int]:
    local, peer = sock.getsockname(), sock.getpeername()
    return (local[0], local[1], peer[0], peer[1])


def _mine(agent: Path) -> dict[str, Any]:
    procs = [p for p in connections(agent)["processes"] if p["pid"] == os.getpid()]
    return procs[0] if procs else {}


def _listed(agent: Path, sock: socket.socket, **want: Any) -> Callable[[], Any]:
    """A check: the agent lists ``sock``'s connection with the fields in ``want``."""

    def check() -> Any:
        row = _rows(agent, os.getpid()).get(_key(sock))
        return row if row and all(row[k] == v for k, v in want.items()) else None

    return check


def test_accelerated_connection_shows_tuple_pid_shm_and_exact_bytes(cosock_agent: Path) -> None:
    srv = listener()
    try:
        with accelerated_pair(srv) as (cli, conn):
            cli.sendall(b"a" * 70_000)
            assert recv_all(conn, 70_000) == b"a" * 70_000
            conn.sendall(b"b" * 1234)
            assert recv_all(cli, 1234) == b"b" * 1234
            # accelerated_pair's settle() moved one byte each way first.
            c = _wait(_listed(cosock_agent, cli, bytes_sent=70_001, bytes_received=1235))
            s = _wait(_listed(cosock_agent, conn, bytes_sent=1235, bytes_received=70_001))
            for row in (c, s):
                assert row["path"] == "shm" and row["accelerated"] is True
                assert row["fallback_reason"] is None and row["error"] is None
                assert row["switches"] == row["upgrades"] == 0
            assert (c["local_port"], c["peer_port"]) == (s["peer_port"], s["local_port"])
            assert c["peer_port"] == srv.getsockname()[1]
            proc = _mine(cosock_agent)
            assert proc["uid"] == os.getuid() and proc["guest"]  # the auto guest of our netns
        # Closed: the rows go (the process itself lives on).
        _wait(lambda: _key_gone(cosock_agent, c, s))
    finally:
        srv.close()


def _key_gone(agent: Path, *rows: dict[str, Any]) -> bool:
    listed = _rows(agent, os.getpid())
    return all(
        (r["local_addr"], r["local_port"], r["peer_addr"], r["peer_port"]) not in listed
        for r in rows
    )


def test_switched_connection_shows_tcp_one_switch_and_bytes_go_on(cosock_agent: Path) -> None:
    srv = listener()
    try:
        with accelerated_pair(srv) as (cli, conn):
            assert cli.cosock_switch()
            cli.sendall(b"x" * 5000)  # the server follows the switch while it reads
            assert recv_all(conn, 5000) == b"x" * 5000
            conn.sendall(b"y" * 300)
            assert recv_all(cli, 300) == b"y" * 300
            assert cli.cosock_path == conn.cosock_path == "tcp"
            want = {"path": "tcp", "switches": 1, "accelerated": True}
            _wait(_listed(cosock_agent, cli, bytes_sent=5001, bytes_received=301, **want))
            _wait(_listed(cosock_agent, conn, bytes_sent=301, bytes_received=5001, **want))
            text = metrics(cosock_agent)
            assert _sample(text, "cosock_path_switches") >= 2
    finally:
        srv.close()


def test_plain_tcp_fallbacks_show_their_reason_and_are_counted(cosock_agent: Path) -> None:
    from cosock import _census

    before = _census.snapshot()["fallbacks"]  # what this process publishes, from its start
    srv = listener()  # a cosock listener reached by a plain client: no offer
    plain_srv = socket.socket()  # a plain listener reached by cosock: not co-resident
    plain_srv.bind(("127.0.0.1", 0))
    plain_srv.listen()
    plain_cli = socket.socket()
    co_cli = CoSocket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        plain_cli.settimeout(10)
        plain_cli.connect(srv.getsockname())
        accepted, _ = srv.accept()
        co_cli.settimeout(10)
        co_cli.connect(plain_srv.getsockname())
        peer, _ = plain_srv.accept()
        accepted.sendall(b"hi")
        assert recv_all(plain_cli, 2) == b"hi"
        want = {"path": "tcp", "accelerated": False, "bytes_sent": None}
        _wait(_listed(cosock_agent, accepted, fallback_reason="no-offer", **want))
        _wait(_listed(cosock_agent, co_cli, fallback_reason="not-coresident", **want))
        after = _mine(cosock_agent)["fallbacks"]
        for reason in ("no-offer", "not-coresident"):
            assert after.get(reason, 0) == before.get(reason, 0) + 1
        # Only CoSockets are ours to list: the plain sockets' ends are absent.
        assert _key(plain_cli) not in _rows(cosock_agent) and _key(peer) not in _rows(cosock_agent)
        accepted.close()
        peer.close()
    finally:
        for s in (srv, plain_srv, plain_cli, co_cli):
            s.close()


_CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from sockutil import accelerated_pair, listener
    srv = listener()
    with accelerated_pair(srv) as (cli, conn):
        print(cli.getsockname()[1], flush=True)
        sys.stdin.readline()
    srv.close()
    print("closed", flush=True)
    sys.stdin.readline()
    """
)


def _child(cosock_agent: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(tests=str(_TESTS))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip().isdigit(), line
    return proc, int(line)


def _census_file(cosock_agent: Path, pid: int) -> Path:
    return cosock_agent.parent / "conn" / f"{pid}.json"


def test_rows_and_file_go_when_sockets_close_and_process_exits(cosock_agent: Path) -> None:
    proc, port = _child(cosock_agent)
    try:

        def both_shm() -> Any:
            rows = _rows(cosock_agent, proc.pid)
            return rows if [r["path"] for r in rows.values()] == ["shm", "shm"] else None

        rows = _wait(both_shm)  # the census may first see the server side in its handshake
        assert port in {k[1] for k in rows}
        assert _census_file(cosock_agent, proc.pid).exists()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "closed"
        _wait(lambda: not _rows(cosock_agent, proc.pid))
        # Nothing left: the census thread retires and takes the file with it.
        _wait(lambda: not _census_file(cosock_agent, proc.pid).exists())
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_process_file_is_ignored_and_removed(cosock_agent: Path) -> None:
    proc, _ = _child(cosock_agent)
    try:
        _wait(lambda: _rows(cosock_agent, proc.pid))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
        assert _census_file(cosock_agent, proc.pid).exists()  # nobody cleaned up after it
        assert proc.pid not in {p["pid"] for p in connections(cosock_agent)["processes"]}
        assert not _census_file(cosock_agent, proc.pid).exists()
    finally:
        proc.kill()
        proc.wait()


def test_forged_file_naming_another_process_is_ignored(cosock_agent: Path) -> None:
    """A file must be written by the process it names (same start time and owner)."""
    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        connections(cosock_agent)  # the agent is serving: its directories exist
        fake = {
            "format": 1,
            "pid": target.pid,
            "start": 1,  # not the process's real start time
            "comm": "x",
            "connections": [],
            "listeners": [],
            "fallbacks": {"not-coresident": 7},
        }
        (cosock_agent.parent / "conn" / f"{target.pid}.json").write_text(json.dumps(fake))
        (cosock_agent.parent / "conn" / "junk.json").write_text("{")
        assert target.pid not in {p["pid"] for p in connections(cosock_agent)["processes"]}
    finally:
        target.kill()
        target.wait()


#### CLI


def _cosock(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cosock", *args], capture_output=True, text=True, timeout=timeout
    )


_CONN_SCHEMA = {
    "local_addr": str,
    "local_port": int,
    "peer_addr": str,
    "peer_port": int,
    "accelerated": bool,
    "path": str,
    "switches": int,
    "upgrades": int,
    "upgrades_refused": int,
}


def test_status_json_schema(cosock_agent: Path) -> None:
    srv = listener()
    try:
        with accelerated_pair(srv) as (cli, _):
            _wait(_listed(cosock_agent, cli, path="shm"))
            out = _cosock("status", "--json", "--socket", str(cosock_agent))
            assert out.returncode == 0, out.stderr
            state = json.loads(out.stdout)
            for key in ("host", "guests", "listeners", "subscribers", "processes"):
                assert key in state
            (proc,) = [p for p in state["processes"] if p["pid"] == os.getpid()]
            assert set(proc) >= {"pid", "uid", "comm", "guest", "age", "connections"}
            assert set(proc) >= {"listeners", "fallbacks"}
            assert proc["connections"]
            for conn in proc["connections"]:
                for key, kind in _CONN_SCHEMA.items():
                    assert type(conn[key]) is kind, (key, conn)
                for key in ("bytes_sent", "bytes_received"):
                    assert conn[key] is None or type(conn[key]) is int
                for key in ("fallback_reason", "error"):
                    assert conn[key] is None or type(conn[key]) is str
            # The table shows the same connection; watch refreshes a bounded number of times.
            table = _cosock("status", "--socket", str(cosock_agent))
            assert table.returncode == 0 and "connections" in table.stdout, table.stderr
            watch = _cosock(
                "status",
                "--json",
                "--count",
                "2",
                "--interval",
                "0.1",
                "--socket",
                str(cosock_agent),
            )
            assert watch.returncode == 0, watch.stderr
            lines = watch.stdout.splitlines()
            assert len(lines) == 2 and all("processes" in json.loads(x) for x in lines)
            live = _cosock(
                "status",
                "--watch",
                "--count",
                "2",
                "--interval",
                "0.1",
                "--socket",
                str(cosock_agent),
            )
            assert live.returncode == 0 and "connections" in live.stdout, live.stderr
    finally:
        srv.close()


_SAMPLE = re.compile(
    r'(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*)\} (?P<value>[0-9]+)\Z'
)
_META = re.compile(
    r"# (HELP [a-zA-Z_:][a-zA-Z0-9_:]* .+|TYPE [a-zA-Z_:][a-zA-Z0-9_:]* "
    r"(counter|gauge))\Z"
)


def _parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], int]:
    """Prometheus text format, strictly: every line a HELP/TYPE comment or a sample."""
    assert text.endswith("\n")
    samples = {}
    typed = set()
    for line in text.splitlines():
        if line.startswith("#"):
            assert _META.match(line), line
            if line.startswith("# TYPE"):
                typed.add(line.split()[2])
            continue
        m = _SAMPLE.match(line)
        assert m, line
        assert m["name"] in typed, f"sample before its TYPE: {line}"
        labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m["labels"]))
        samples[(m["name"], labels)] = int(m["value"])
    return samples


def _sample(text: str, name: str, **labels: str) -> int:
    """Sum of ``name`` samples whose labels include ``labels``."""
    return sum(
        v for (n, ls), v in _parse(text).items() if n == name and set(labels.items()) <= set(ls)
    )


def test_prometheus_text_parses_and_counts_match(cosock_agent: Path) -> None:
    srv = listener()
    plain = socket.socket()
    try:
        plain.settimeout(10)
        with accelerated_pair(srv) as (cli, conn):
            plain.connect(srv.getsockname())
            accepted, _ = srv.accept()
            cli.sendall(b"z" * 4096)
            assert recv_all(conn, 4096) == b"z" * 4096
            _wait(_listed(cosock_agent, accepted, fallback_reason="no-offer"))
            _wait(_listed(cosock_agent, cli, bytes_sent=4097))
            out = _cosock("status", "--prometheus", "--socket", str(cosock_agent))
            assert out.returncode == 0, out.stderr
            text = out.stdout
            assert text == metrics(cosock_agent)  # the CLI prints the op's text
            rows = _rows(cosock_agent)  # every process of this agent (only ours in tests)
            procs = connections(cosock_agent)["processes"]
            by_path = {p: sum(1 for r in rows.values() if r["path"] == p) for p in ("shm", "tcp")}
            assert _sample(text, "cosock_connections", path="shm") == by_path["shm"] >= 2
            assert _sample(text, "cosock_connections", path="tcp") == by_path["tcp"] >= 1
            assert _sample(text, "cosock_plain_connections", reason="no-offer") >= 1
            assert _sample(text, "cosock_processes") == len(procs)
            fallbacks = sum(p["fallbacks"].get("no-offer", 0) for p in procs)
            assert _sample(text, "cosock_fallbacks_total", reason="no-offer") == fallbacks >= 1
            sent = sum(r["bytes_sent"] for r in rows.values() if r["accelerated"])
            assert _sample(text, "cosock_bytes", direction="sent") == sent >= 4097
            accepted.close()
    finally:
        plain.close()
        srv.close()


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--prometheus", "--json"],
        ["status", "--count", "0"],
        ["status", "--interval", "abc"],
    ],
)
def test_status_bad_arguments_give_one_line_errors(argv: list[str]) -> None:
    out = _cosock(*argv)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cosock"), out.stderr


def test_status_unreachable_agent_is_one_line(tmp_path: Path) -> None:
    for extra in ([], ["--prometheus"], ["--json", "--count", "1"]):
        out = _cosock("status", "--socket", str(tmp_path / "none.sock"), *extra)
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "unreachable" in lines[0], out.stderr
