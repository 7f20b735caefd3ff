"""Sockets cosock cannot see: made in C (uvloop, grpcio) or by a process not under
``cosock run``.  Such programs keep working on plain TCP under ``cosock run``, and
``cosock status`` (the agent's ``connections`` op, ``"unmanaged"``) lists both ends of
their connections from the kernel's TCP table: path ``tcp``, not accelerated, reason
``not-intercepted``, with pid and comm.  Connections the census lists are not listed again.

Real processes and sockets; loopback (private agent) and, as root, a lab of network
namespaces (server in h1g1, client in h1g2, both listed by h1's agent).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apprun import PY, TESTS, Client, Row, World, lab_world, loopback_world, stopping
from conftest import IS_ROOT, start_agent
from cosock import CoSocket
from cosock.agent import _unmanaged
from cosock.agent._plain import PLAIN_SOCKET
from cosock.agent.client import connections
from sockutil import accelerated_pair, listener, recv_all, wait_for

pytestmark = pytest.mark.timeout(120)

BYPASS = str(TESTS / "bypass_programs.py")
REASON = "not-intercepted"


def _kinds() -> list[Any]:
    out = []
    for kind, module in (("uv", "uvloop"), ("grpc", "grpc")):
        try:
            __import__(module)
        except ImportError:
            out.append(pytest.param(kind, marks=pytest.mark.skip(reason=f"{module} missing")))
        else:
            out.append(kind)
    return out


@pytest.fixture(params=["loopback", "lab"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    if request.param == "lab":
        if not IS_ROOT:
            pytest.skip("needs root: the lab creates network namespaces")
        made = lab_world(request.getfixturevalue("lab"), tmp_path)
    else:
        made = loopback_world(request.getfixturevalue("cosock_agent"), tmp_path)
    with stopping(made) as w:
        yield w


def _unmanaged_rows(agents: list[Path]) -> list[Row]:
    return [r for agent in agents for r in connections(agent)["unmanaged"]]


def _plain_row(row: Row) -> bool:
    return (
        row["path"] == "tcp"
        and row["accelerated"] is False
        and row["fallback_reason"] == REASON
        and row["error"] is None
        and row["bytes_sent"] is None
    )


@pytest.mark.parametrize("kind", _kinds())
def test_c_sockets_work_under_cosock_run_and_both_ends_are_listed(world: World, kind: str) -> None:
    """uvloop (create_server/create_connection with host and port: libuv's sockets) or
    grpcio (C-core's sockets) between two processes under ``cosock run``: the echo is
    exact, the census lists neither end, the kernel's table both, not accelerated."""
    port = world.port()
    server = world.serve([PY, BYPASS, f"{kind}-server", world.server_host, str(port)])
    client = Client(world, world.near, [PY, BYPASS, f"{kind}-client", world.server_host, str(port)])
    report = client.read()
    assert report["echo_ok"] is True, report
    if kind == "uv":
        assert report["sock"] == "PseudoSocket"  # libuv's socket, not a CoSocket

    def both_ends() -> tuple[Row, Row] | None:
        rows = _unmanaged_rows(world.agents)
        c = [r for r in rows if r["peer_port"] == port and r["pid"] == client.proc.pid]
        if len(c) != 1:
            return None
        s = [
            r
            for r in rows
            if (r["local_port"], r["peer_port"]) == (port, c[0]["local_port"])
            and r["local_addr"] == c[0]["peer_addr"]
        ]
        return (c[0], s[0]) if len(s) == 1 else None

    c_row, s_row = wait_for(both_ends)
    if kind == "uv":
        assert c_row["local_port"] == report["local_port"]
    assert _plain_row(c_row) and _plain_row(s_row), (c_row, s_row)
    assert s_row["pid"] == server.pid
    assert c_row["comm"] and s_row["comm"]
    assert (s_row["peer_addr"], s_row["peer_port"]) == (c_row["local_addr"], c_row["local_port"])
    if world.mode == "lab":
        assert (c_row["guest"], s_row["guest"]) == ("h1g2", "h1g1")
    # The census (CoSockets only) has neither end: nothing of this connection is managed.
    managed = [r for r in world.rows() if port in (r["local_port"], r["peer_port"])]
    assert managed == []
    assert client.finish() == [{"closed": True}]
    wait_for(lambda: not [r for r in _unmanaged_rows(world.agents) if r["peer_port"] == port])


def _plain_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    srv = PLAIN_SOCKET(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = PLAIN_SOCKET(socket.AF_INET, socket.SOCK_STREAM)
    cli.connect(srv.getsockname())
    acc, _ = srv.accept()
    return srv, cli, acc


def _key(sock: socket.socket) -> tuple[str, int, str, int]:
    (la, lp, *_), (pa, pp, *_) = sock.getsockname(), sock.getpeername()
    return (la, lp, pa, pp)


def _by_key(rows: list[Row]) -> dict[tuple[str, int, str, int], Row]:
    return {(r["local_addr"], r["local_port"], r["peer_addr"], r["peer_port"]): r for r in rows}


def test_managed_connections_are_not_listed_again_and_plain_ones_are(
    cosock_agent: Path,
) -> None:
    """In one process: an accelerated CoSocket pair (census, shm), a CoSocket client of a
    plain listener (census lists its end, the kernel's table the accepted end) and a pair
    of plain sockets (both ends from the kernel's table, with our pid); the CLI's JSON
    and table carry them."""
    co_srv = listener()
    plain_srv, plain_cli, plain_acc = _plain_pair()
    mixed = CoSocket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with accelerated_pair(co_srv) as (shm_cli, shm_acc):
            mixed.connect(plain_srv.getsockname())
            mixed_acc, _ = plain_srv.accept()
            with mixed_acc:
                mixed.sendall(b"hello")
                assert recv_all(mixed_acc, 5) == b"hello"

                def listed() -> Any:
                    reply = connections(cosock_agent)
                    census = _by_key([c for p in reply["processes"] for c in p["connections"]])
                    plain = _by_key(reply["unmanaged"])
                    want = [_key(s) for s in (shm_cli, shm_acc, mixed)]
                    if all(k in census for k in want) and _key(mixed_acc) in plain:
                        return census, plain
                    return None

                census, plain = wait_for(listed)
                assert census[_key(shm_cli)]["path"] == census[_key(shm_acc)]["path"] == "shm"
                assert census[_key(mixed)]["fallback_reason"] == "not-coresident"
                for managed in (shm_cli, shm_acc, mixed):
                    assert _key(managed) not in plain
                for sock in (plain_cli, plain_acc, mixed_acc):
                    row = plain[_key(sock)]
                    assert _plain_row(row) and row["pid"] == os.getpid(), row
                    assert row["uid"] == os.geteuid()

                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "cosock",
                        "status",
                        "--json",
                        "--socket",
                        str(cosock_agent),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert out.returncode == 0, out.stderr
                state = json.loads(out.stdout)
                assert _key(plain_acc) in _by_key(state["unmanaged"])
                assert state["unmanaged_truncated"] == 0
                table = subprocess.run(
                    [sys.executable, "-m", "cosock", "status", "--socket", str(cosock_agent)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    env={**os.environ, "COLUMNS": "250"},
                )
                assert table.returncode == 0, table.stderr
                la, lp, pa, pp = _key(plain_acc)
                line = [
                    x
                    for x in table.stdout.splitlines()
                    if f"{la}:{lp} " in x and f"{pa}:{pp} " in x
                ]
                assert line and REASON in line[0], table.stdout
    finally:
        for s in (mixed, co_srv, plain_srv, plain_cli, plain_acc):
            s.close()


def test_scan_is_bounded_reads_ipv6_and_skips_what_the_census_knows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scan itself on this process's namespace: real sockets, v4 and v6."""
    me = _unmanaged.netns_inode(os.getpid())
    assert me is not None
    srv6 = PLAIN_SOCKET(socket.AF_INET6, socket.SOCK_STREAM)
    pairs = [_plain_pair() for _ in range(4)]
    try:
        srv6.bind(("::1", 0))
        srv6.listen()
        cli6 = PLAIN_SOCKET(socket.AF_INET6, socket.SOCK_STREAM)
        cli6.connect(srv6.getsockname()[:2])
        acc6, _ = srv6.accept()
        with cli6, acc6:
            ours = [*(s for _, c, a in pairs for s in (c, a)), cli6, acc6]
            skipped = _key(pairs[0][1])
            found = _unmanaged.scan({me: "here"}, {(me, skipped)})
            rows = _by_key(found.rows)
            assert skipped not in rows
            for sock in ours[1:]:
                row = rows[_key(sock)]
                assert row["guest"] == "here" and row["pid"] == os.getpid(), row
            assert rows[_key(cli6)]["local_addr"] == "::1"

            # sock_diag (what the scan uses when it may) and /proc/net/tcp agree.
            def raw(sock: socket.socket) -> _unmanaged.RawKey:
                la, lp, pa, pp = _key(sock)
                lraw, praw = _unmanaged._packed(la), _unmanaged._packed(pa)
                assert lraw is not None and praw is not None
                return (lraw, lp, praw, pp)

            ours_raw = {raw(x) for x in ours}
            diag = [r for r in _unmanaged._table(os.getpid(), me) if r[0] in ours_raw]
            proc = [r for r in _unmanaged._proc_table(os.getpid()) if r[0] in ours_raw]
            assert len(diag) == len(ours) and sorted(diag) == sorted(proc)
            assert {u for _, u, _ in diag} == {os.geteuid()}

            monkeypatch.setattr(_unmanaged, "MAX_ROWS", 3)
            monkeypatch.setattr(_unmanaged, "MAX_FDS", 0)
            small = _unmanaged.scan({me: "here"}, set())
            assert len(small.rows) == 3 and small.truncated >= len(ours) - 3
            assert all(r["pid"] is None for r in small.rows)  # no fds read: no owner
            # Another user's view of the same namespace: none of root's sockets.
            assert _unmanaged.scan({me: None}, set(), uid=65534).rows == []
    finally:
        srv6.close()
        for trio in pairs:
            for s in trio:
                s.close()


_NOBODY = textwrap.dedent(
    """
    import json, os, socket, sys
    from pathlib import Path
    from cosock.agent.client import connections
    import encodings.idna  # everything imported before we lose root's files
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    rows = connections(Path(sys.argv[1]))["unmanaged"]
    print(json.dumps({"port": srv.getsockname()[1], "rows": rows}))
    """
)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run a client as another user")
def test_a_non_root_client_sees_only_its_own_plain_connections() -> None:
    """Shared (root) agent: a client running as nobody gets its own plain connections
    from the kernel's table and none of root's; root gets both."""
    short = Path(tempfile.mkdtemp(prefix="csb-", dir="/tmp"))
    short.chmod(0o755)
    path = short / "agent.sock"
    agent = start_agent(path, auto=False)
    srv, cli, acc = _plain_pair()
    try:
        out = subprocess.run(
            [sys.executable, "-c", _NOBODY, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout)
        ports = {r["peer_port"] for r in seen["rows"]} | {r["local_port"] for r in seen["rows"]}
        assert seen["port"] in ports
        assert srv.getsockname()[1] not in ports
        assert {r["uid"] for r in seen["rows"]} == {65534}
        assert all(
            r["pid"] for r in seen["rows"] if seen["port"] in (r["local_port"], r["peer_port"])
        )
        rows = _by_key(connections(path)["unmanaged"])
        assert _key(cli) in rows and _key(acc) in rows
    finally:
        for s in (srv, cli, acc):
            s.close()
        agent.kill()
        agent.wait()
        shutil.rmtree(short, ignore_errors=True)


_SCAN_AS_NOBODY = textwrap.dedent(
    """
    import json, os, socket
    from cosock.agent import _unmanaged
    import encodings.idna  # everything imported before we lose root's files
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    me = _unmanaged.netns_inode(os.getpid())
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    _unmanaged._diag_socket(None).close()  # sock_diag needs no privilege in our netns
    rows = _unmanaged.scan({me: None}, set(), uid=65534).rows
    print(json.dumps({"port": srv.getsockname()[1], "pid": os.getpid(), "rows": rows}))
    """
)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to become another user")
def test_scan_works_without_root() -> None:
    """The loopback case of a per-user agent: a process that is not root lists its own
    plain connections with its pid (sock_diag and /proc/<pid>/fd of its own processes)."""
    out = subprocess.run(
        [sys.executable, "-c", _SCAN_AS_NOBODY], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    ends = [r for r in seen["rows"] if seen["port"] in (r["local_port"], r["peer_port"])]
    assert len(ends) == 2 and all(r["pid"] == seen["pid"] and _plain_row(r) for r in ends), ends
