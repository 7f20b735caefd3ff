"""The lab: namespaces, bridges, veths, addresses, agents, teardown and the ``cosock lab`` CLI.

Everything is checked from outside the code under test: links through pyroute2 inside each
namespace, connectivity with real TCP between guests, agents through their own client, and
leftovers through /run/netns and /proc.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute, netns
from typer.testing import CliRunner

from conftest import requires_root, unique_lab_name
from cosock import CosockError
from cosock.lab import (
    Guest,
    Host,
    InvalidLabSpec,
    Lab,
    LabExists,
    LabNotFound,
    NeedsRoot,
    UnknownGuest,
    UnknownHost,
    _agents,
    _netns,
    _state,
    down,
)
from cosock.lab.cli import app

#### Helpers

ECHO_SERVER = r"""
import socket, sys
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    conn, (peer, _) = srv.accept()
    with conn:
        data = b""
        while chunk := conn.recv(1024):
            data += chunk
        conn.sendall(peer.encode() + b" " + data)
"""

ECHO_CLIENT = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
    c.sendall(sys.argv[3].encode())
    c.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := c.recv(1024):
        reply += chunk
print(reply.decode())
"""


@contextlib.contextmanager
def echo_server(lab: Lab, guest: str, port: int = 7000) -> Iterator[subprocess.Popen[str]]:
    proc = lab.popen(
        guest, [sys.executable, "-c", ECHO_SERVER, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def tcp_echo(lab: Lab, client: str, server: Guest, port: int = 7000) -> str:
    """Connect from ``client`` to ``server``; the reply names the peer address the server saw."""
    argv = [sys.executable, "-c", ECHO_CLIENT, server.address, str(port), f"hi from {client}"]
    result = lab.run(client, argv, capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    return str(result.stdout.strip())


def links(ns: str | None) -> dict[str, Any]:
    """ifname -> link message, in namespace ``ns`` (None: the root namespace)."""
    ipr = IPRoute() if ns is None else IPRoute(netns=ns, flags=0)
    with ipr:
        return {link.get("ifname"): link for link in ipr.get_links()}


def ipv4(ns: str | None) -> dict[str, set[str]]:
    ipr = IPRoute() if ns is None else IPRoute(netns=ns, flags=0)
    with ipr:
        names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        found: dict[str, set[str]] = {}
        for a in ipr.get_addr(family=socket.AF_INET):
            found.setdefault(names[a["index"]], set()).add(f"{a.get('address')}/{a['prefixlen']}")
        return found


def lab_namespaces(name: str) -> list[str]:
    return sorted(ns for ns in netns.listnetns() if ns.startswith(f"cs-{name}-"))


def pids_in_netns(ns: str) -> list[int]:
    key = _netns.netns_key(ns)
    assert key is not None
    return _netns.pids_in({key})


def assert_gone(name: str, pids: Sequence[int] = ()) -> None:
    assert lab_namespaces(name) == []
    assert not _state.state_path(name).exists()
    assert not _state.lab_dir(name).exists()
    assert name not in Lab.list()
    alive = [pid for pid in pids if _netns.alive(pid)]
    assert alive == [], f"still running: {alive}"


def one_line_error(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


runner = CliRunner()


def cli(*args: str) -> Any:
    return runner.invoke(app, list(args))


#### Validation and errors (no root needed)


@pytest.mark.parametrize("name", ["", "Lab", "a-b", "toolongname", "x y", "lab!", "é"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidLabSpec, match="invalid lab name"):
        Lab.up(name)
    with pytest.raises(InvalidLabSpec):
        down(name)


@pytest.mark.parametrize(
    ("hosts", "guests"), [(0, 1), (9, 1), (1, 0), (1, 17), (-1, 2), (True, 2), ("2", 2)]
)
def test_bad_sizes_are_refused(hosts: Any, guests: Any) -> None:
    with pytest.raises(InvalidLabSpec, match="invalid number"):
        Lab.up(unique_lab_name(), hosts=hosts, guests=guests)


def test_errors_are_cosock_errors_of_the_usual_kinds() -> None:
    assert issubclass(LabExists, CosockError)
    assert issubclass(NeedsRoot, PermissionError)
    assert issubclass(InvalidLabSpec, ValueError)
    assert issubclass(UnknownGuest, LookupError)


def test_load_of_unknown_lab() -> None:
    with pytest.raises(LabNotFound, match="no lab named"):
        Lab.load(unique_lab_name())


def test_not_root_gets_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    name = unique_lab_name()
    with pytest.raises(NeedsRoot, match="needs root") as info:
        Lab.up(name)
    assert "\n" not in str(info.value)
    with pytest.raises(NeedsRoot):
        down(name)
    result = cli("up", "--name", name)
    assert result.exit_code == 1
    assert "needs root" in one_line_error(result.stderr)
    assert not _state.state_path(name).exists()


#### Topology


@requires_root
def test_up_builds_the_topology(lab: Lab) -> None:
    n = lab.name
    assert [h.name for h in lab.hosts] == ["h1", "h2"]
    assert [g.name for g in lab.guests] == ["h1g1", "h1g2", "h2g1", "h2g2"]
    assert lab_namespaces(n) == sorted(
        f"cs-{n}-{m}" for m in ["h1", "h2", "h1g1", "h1g2", "h2g1", "h2g2"]
    )
    assert lab.guest("h2g1") == Guest(
        name="h2g1", netns=f"cs-{n}-h2g1", host="h2", addresses=("10.77.2.11",)
    )
    assert lab.host("h1").agent_socket == Path(f"/run/cosock/labs/{n}/h1/agent.sock")

    for h in (1, 2):
        ns = f"cs-{n}-h{h}"
        ls = links(ns)
        br = ls["br0"]
        assert br.get(("linkinfo", "kind")) == "bridge"
        assert br.get("state") == "up"
        assert ipv4(ns)["br0"] == {f"10.77.{h}.1/16"}
        ports = {name for name, link in ls.items() if link.get("master") == br["index"]}
        wire = {"wh2"} if h == 1 else {"wh1"}
        assert ports == {f"vh{h}g1", f"vh{h}g2"} | wire
        for port in ports:
            assert ls[port].get(("linkinfo", "kind")) == "veth"
            assert ls[port].get("operstate") == "UP"
        for g in (1, 2):
            gns = f"cs-{n}-h{h}g{g}"
            gl = links(gns)
            assert set(gl) == {"lo", "eth0"}
            assert gl["lo"].get("state") == "up"
            assert gl["eth0"].get(("linkinfo", "kind")) == "veth"
            assert gl["eth0"].get("operstate") == "UP"
            assert ipv4(gns) == {"lo": {"127.0.0.1/8"}, "eth0": {f"10.77.{h}.{10 + g}/16"}}
            assert lab.link_of(f"h{h}g{g}") == {"netns": ns, "ifname": f"vh{h}g{g}"}

    state = json.loads(_state.state_path(n).read_text())
    assert state["status"] == lab.status == "up"
    assert state["guests"][0]["ifnames"] == {"guest": "eth0", "port": "vh1g1"}


@requires_root
def test_three_hosts_are_one_segment(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(3, 1)
    assert [g.name for g in lab.guests] == ["h1g1", "h2g1", "h3g1"]
    with echo_server(lab, "h3g1"):
        assert tcp_echo(lab, "h2g1", lab.guest("h3g1")) == "10.77.2.11 hi from h2g1"


@requires_root
def test_nothing_is_created_in_the_root_namespace(lab_factory: Callable[..., Lab]) -> None:
    before_links, before_addrs = set(links(None)), ipv4(None)
    with _link_events() as events:
        lab = lab_factory(2, 1)
        assert ipv4(None) == before_addrs
        lab.down()
        created = events()
    assert set(links(None)) == before_links
    ours = [name for name in created if name.startswith(("vh", "wh", "br0"))]
    assert ours == [], f"links appeared in the root namespace: {ours}"


@contextlib.contextmanager
def _link_events() -> Iterator[Callable[[], list[str]]]:
    """Names of links created (RTM_NEWLINK) in the root namespace while the block runs."""
    rtm_newlink, ifla_ifname, rtmgrp_link = 16, 3, 1
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((0, rtmgrp_link))
    sock.setblocking(False)

    def names() -> list[str]:
        found = []
        with contextlib.suppress(BlockingIOError):
            while data := sock.recv(1 << 16):
                off = 0
                while off + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, off)
                    if kind == rtm_newlink:
                        at = off + 32  # nlmsghdr (16) + ifinfomsg (16)
                        while at + 4 <= off + length:
                            alen, atype = struct.unpack_from("=HH", data, at)
                            if alen < 4:
                                break
                            if atype == ifla_ifname:
                                found.append(data[at + 4 : at + alen].split(b"\0")[0].decode())
                            at += (alen + 3) & ~3
                    off += (length + 3) & ~3
        return found

    try:
        yield names
    finally:
        sock.close()


#### Connectivity


@requires_root
def test_tcp_between_guests_same_host_and_cross_host(lab: Lab) -> None:
    with echo_server(lab, "h1g1"):
        server = lab.guest("h1g1")
        assert tcp_echo(lab, "h1g2", server) == "10.77.1.12 hi from h1g2"  # same host
        assert tcp_echo(lab, "h2g1", server) == "10.77.2.11 hi from h2g1"  # across the wire
    with echo_server(lab, "h2g2", port=8000):
        assert tcp_echo(lab, "h1g1", lab.guest("h2g2"), 8000) == "10.77.1.11 hi from h1g1"


@requires_root
def test_moving_a_guest_port_keeps_it_reachable(lab: Lab) -> None:
    """The migration primitive: re-plug h1g1's wire into h2's bridge, processes untouched."""
    n = lab.name
    with echo_server(lab, "h1g1") as server:
        link = lab.link_of("h1g1")
        with _netns.Netlinks() as nl:
            _netns.move_port(nl, link["ifname"], link["netns"], f"cs-{n}-h2")
            _netns.wait_operational(nl, f"cs-{n}-h2", ["vh1g1"], time.monotonic() + 5)
        assert "vh1g1" not in links(f"cs-{n}-h1")
        h2 = links(f"cs-{n}-h2")
        assert h2["vh1g1"].get("master") == h2["br0"]["index"]
        assert tcp_echo(lab, "h2g2", lab.guest("h1g1")) == "10.77.2.12 hi from h2g2"
        assert server.poll() is None


#### Running things in guests


@requires_root
def test_env_popen_and_run(lab: Lab) -> None:
    g = lab.guest("h2g1")
    env = lab.env("h2g1")
    # The guest's own agent path, a link to its host's directory (migration re-points it).
    assert env["COSOCK_AGENT"] == f"/run/cosock/labs/{lab.name}/guests/h2g1/agent.sock"
    assert os.path.samefile(env["COSOCK_AGENT"], lab.host("h2").agent_socket)
    assert env["COSOCK_GUEST"] == "h2g1"
    assert env["COSOCK_LAB"] == lab.name
    script = (
        "import os; print(os.stat('/proc/self/ns/net').st_ino);"
        "print(os.environ['COSOCK_GUEST'], os.environ['COSOCK_AGENT'], os.environ['EXTRA'])"
    )
    out = lab.run(
        g, [sys.executable, "-c", script], env={"EXTRA": "x"}, capture_output=True, text=True
    )
    inode, rest = out.stdout.splitlines()
    assert int(inode) == g.netns_inode() == os.stat(f"/run/netns/{g.netns}").st_ino
    assert rest == f"h2g1 {env['COSOCK_AGENT']} x"
    assert lab.run(g, [sys.executable, "-c", "raise SystemExit(3)"]).returncode == 3
    with pytest.raises(subprocess.TimeoutExpired):
        lab.run(g, [sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.2)
    with pytest.raises(UnknownGuest, match="no guest 'h9g9'"):
        lab.popen("h9g9", ["true"])
    with pytest.raises(UnknownHost):
        lab.host("h9")


@requires_root
def test_load_sees_the_same_lab(lab: Lab) -> None:
    again = Lab.load(lab.name)
    assert again.to_json() == lab.to_json()
    assert again.hosts == lab.hosts
    assert lab.name in Lab.list()
    data = lab.to_json()
    assert set(data) == {"name", "hosts", "guests"}
    assert data["hosts"][0] == {
        "name": "h1",
        "netns": f"cs-{lab.name}-h1",
        "agent_socket": f"/run/cosock/labs/{lab.name}/h1/agent.sock",
        "agent_pid": lab.hosts[0].agent_pid,
    }
    assert data["guests"][3] == {
        "name": "h2g2",
        "host": "h2",
        "netns": f"cs-{lab.name}-h2g2",
        "addresses": ["10.77.2.12"],
    }
    assert isinstance(lab.hosts[0], Host)


#### Agents


@requires_root
def test_agents_run_in_their_host_with_their_guests(lab: Lab) -> None:
    from cosock.agent import client

    for host in lab.hosts:
        assert _agents.is_agent(host.agent_pid)
        assert os.stat(f"/proc/{host.agent_pid}/ns/net").st_ino == os.stat(host.netns_path).st_ino
        status = client.status(host.agent_socket)
        registered = {g["name"]: g for g in status["guests"]}
        expected = lab.guests_of(host)
        assert set(registered) == {g.name for g in expected}
        for g in expected:
            assert registered[g.name]["netns"] == g.netns_inode()
            assert registered[g.name]["addresses"] == list(g.addresses)


@requires_root
def test_agent_that_fails_to_start_leaves_nothing(
    lab_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(CosockError, match="agent of host h1 exited with status 1") as info:
        Lab.up(lab_name, 1, 1)
    assert "\n" not in str(info.value)
    assert_gone(lab_name)


@requires_root
def test_failure_in_the_middle_of_up_leaves_nothing(
    lab_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _netns.attach_guest
    calls = []

    def flaky(*args: Any) -> None:
        calls.append(args)
        if len(calls) == 3:
            raise OSError("injected failure")
        real(*args)

    monkeypatch.setattr(_netns, "attach_guest", flaky)
    with pytest.raises(OSError, match="injected failure"):
        Lab.up(lab_name, 2, 2)
    assert_gone(lab_name)


#### Existing labs and teardown


@requires_root
def test_up_with_an_existing_name(lab: Lab) -> None:
    with pytest.raises(LabExists, match="already exists") as info:
        Lab.up(lab.name)
    assert "\n" not in str(info.value)
    assert Lab.load(lab.name).to_json() == lab.to_json()  # untouched


@requires_root
def test_up_over_stale_namespaces(lab_name: str) -> None:
    _netns.create_netns(f"cs-{lab_name}-h1g1")
    with pytest.raises(LabExists, match="namespaces"):
        Lab.up(lab_name)
    assert lab_name in Lab.list()
    result = cli("ls", "--json")
    assert {"name": lab_name, "hosts": [], "guests": [], "status": "stale"} in json.loads(
        result.stdout
    )
    down(lab_name)
    assert_gone(lab_name)


@requires_root
def test_down_is_idempotent(lab: Lab) -> None:
    pids = [h.agent_pid for h in lab.hosts]
    lab.down()
    assert_gone(lab.name, pids)
    lab.down()
    down(lab.name)
    down(unique_lab_name())  # never existed
    with pytest.raises(LabNotFound):
        Lab.load(lab.name)


@requires_root
def test_down_kills_every_process_in_the_lab(lab: Lab) -> None:
    spawner = "import subprocess, sys, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    procs = [
        lab.popen(g, [sys.executable, "-c", spawner], start_new_session=True) for g in lab.guests
    ]
    pids: list[int] = []
    for g in lab.guests:
        for _ in range(200):  # until the grandchild exists
            found = pids_in_netns(g.netns)
            if len(found) >= 2:
                break
            subprocess.run(["sleep", "0.01"])
        assert len(found) >= 2
        pids += found
    lab.down()
    for proc in procs:
        assert proc.wait(timeout=5) == -9
    assert_gone(lab.name, pids + [h.agent_pid for h in lab.hosts])


@requires_root
def test_down_after_a_crash_without_state(lab: Lab) -> None:
    pids = [h.agent_pid for h in lab.hosts]
    sleeper = lab.popen("h1g2", ["sleep", "300"])
    _state.state_path(lab.name).unlink()  # as if `up` had died before writing it
    down(lab.name)
    assert sleeper.wait(timeout=5) == -9
    assert_gone(lab.name, pids)


@requires_root
def test_down_with_a_corrupt_state(lab: Lab) -> None:
    pids = [h.agent_pid for h in lab.hosts]
    _state.state_path(lab.name).write_text("{ torn")
    down(lab.name)
    assert_gone(lab.name, pids)


#### CLI


@requires_root
def test_cli_up_json_ls_and_down(lab_name: str) -> None:
    result = cli("up", "--name", lab_name, "--hosts", "1", "--guests", "3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == Lab.load(lab_name).to_json()
    assert [g["name"] for g in data["guests"]] == ["h1g1", "h1g2", "h1g3"]
    assert data["guests"][2]["addresses"] == ["10.77.1.13"]

    listed = json.loads(cli("ls", "--json").stdout)
    assert {**data, "status": "up"} in listed
    assert json.loads(cli("ls", "--name", lab_name, "--json").stdout) == data
    table = cli("ls", "--name", lab_name)
    assert table.exit_code == 0 and "h1g3" in table.stdout and "10.77.1.13" in table.stdout

    again = cli("up", "--name", lab_name)
    assert again.exit_code == 1
    assert "already exists" in one_line_error(again.stderr)

    for _ in range(2):
        gone = cli("down", "--name", lab_name)
        assert gone.exit_code == 0
        assert gone.stdout.strip() == f"lab {lab_name} is down"
    assert_gone(lab_name)


@requires_root
def test_cli_up_prints_tables(lab_name: str) -> None:
    result = cli("up", "--name", lab_name, "--hosts", "1", "--guests", "1")
    assert result.exit_code == 0, result.output
    for word in ("h1g1", "10.77.1.11", f"cs-{lab_name}-h1", "agent.sock"):
        assert word in result.stdout


@requires_root
def test_cli_exec_runs_in_the_guest_and_returns_its_status(lab: Lab) -> None:
    base = [sys.executable, "-c", "from cosock.lab.cli import app; app()", "exec"]
    script = "import os, sys; print(os.environ['COSOCK_GUEST']); sys.exit(7)"
    cmd = [*base, "--name", lab.name, "h2g2", "--", sys.executable, "-c", script]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout.strip()) == (7, "h2g2"), done.stderr

    plain = subprocess.run([*base, "--name", lab.name, "h2g2", "true"], capture_output=True)
    assert plain.returncode == 0

    missing = subprocess.run(
        [*base, "--name", lab.name, "h7g7", "--", "true"], capture_output=True, text=True
    )
    assert missing.returncode == 1
    assert "no guest 'h7g7'" in one_line_error(missing.stderr)

    nocmd = subprocess.run(
        [*base, "--name", lab.name, "h1g1", "--", "/nonexistent/cmd"],
        capture_output=True,
        text=True,
    )
    assert nocmd.returncode == 127
    one_line_error(nocmd.stderr)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["up", "--hosts", "0"], "invalid number of hosts"),
        (["up", "--hosts", "abc"], "not an integer"),
        (["up", "--guests", "17"], "invalid number of guests"),
        (["up", "--name", "Bad!"], "invalid lab name"),
        (["down", "--name", "a_b"], "invalid lab name"),
        (["ls", "--name", "zz9zz9"], "no lab named"),
        (["exec", "--name", "zz9zz9", "h1g1", "--", "true"], "no lab named"),
        (["exec", "h1g1"], "no command given"),
        (["exec", "h1g1", "--"], "no command given"),
        (["restart-agent", "h1", "--name", "zz9zz9"], "no lab named"),
        (["restart-agent", "h1", "--name", "Bad!"], "invalid lab name"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], message: str) -> None:
    result = cli(*args)
    assert result.exit_code == 1
    assert message in one_line_error(result.stderr)
    assert result.stdout == ""
