"""The host's ``cosock status`` sees the connections inside QEMU guests, without VMs.

The processes of a VM report their census to the host agent's VM gateway (``census``
request, identified by their fw_cfg token); the agent lists those processes marked with the
VM's name. Here: the gateway's checks against a VM that reports garbage or too much (raw
requests with a token), and two unmodified programs under ``cosock run`` standing for two
guests (test_vmchannel.py's world: a real gateway and pool file) listed by a real agent
serving that gateway, through the CLI, across a switch to TCP. The same with real VMs is in
test_vm_status.py (marker ``vm``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cosock._vmagent import SlotRefused, VmAgent
from cosock.agent import _vmcensus, _vmgate
from cosock.agent.client import connections, metrics, status
from cosock.agent.server import AgentServer
from sockutil import wait_for
from test_vmchannel import RUN, A, B, World, _finish, free_port, world  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def _row(local: str, lport: int, peer: str, pport: int, **extra: Any) -> dict[str, Any]:
    return {
        "local_addr": local,
        "local_port": lport,
        "peer_addr": peer,
        "peer_port": pport,
        "accelerated": True,
        "path": "shm",
        "fallback_reason": None,
        "error": None,
        "bytes_sent": 10,
        "bytes_received": 20,
        "switches": 0,
        "upgrades": 0,
        "upgrades_refused": 0,
        **extra,
    }


def _doc(pid: int, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "pid": pid,
        "comm": "python3",
        "connections": rows,
        "listeners": [],
        "fallbacks": {},
        **extra,
    }


@pytest.fixture
def agent(world: World) -> Iterator[Path]:  # noqa: F811
    """A real agent (in this process) serving the world's VM gateway."""
    short = Path(tempfile.mkdtemp(prefix="csv-", dir="/tmp"))
    server = AgentServer(short / "agent.sock", "h1", auto_guests=True, vm_gateway=world.gate)
    loop = threading.Thread(target=server.serve_forever, name="test-agent")
    loop.start()
    try:
        yield server.path
    finally:
        server.stop()
        loop.join(10)
        server.close()
        shutil.rmtree(short, ignore_errors=True)


def _vm_procs(agent: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for proc in connections(agent)["processes"]:
        if proc.get("vm"):
            out.setdefault(proc["guest"], []).append(proc)
    return out


def test_a_vms_report_is_listed_under_its_own_name_and_lives_with_its_connection(
    world: World,  # noqa: F811
    agent: Path,
) -> None:
    addr = world.gate.server_address[:2]
    with VmAgent(addr, token="tok-1") as g1, VmAgent(addr, token="tok-2") as g2:
        g1.census(_doc(100, [_row(A, 40000, B, 7000)]))
        g2.census(_doc(200, [_row(B, 7000, A, 40000, bytes_sent=20, bytes_received=10)]))
        procs = _vm_procs(agent)
        assert [p["pid"] for p in procs["g1"]] == [100] and [p["pid"] for p in procs["g2"]] == [200]
        (c,) = procs["g1"][0]["connections"]
        assert (c["local_addr"], c["peer_port"], c["bytes_sent"]) == (A, 7000, 10)
        assert procs["g1"][0]["uid"] is None and procs["g1"][0]["comm"] == "python3"
        # A new report replaces the old one (not sooner than half a second later).
        time.sleep(_vmcensus.MIN_INTERVAL_S)
        g1.census(_doc(100, [_row(A, 40000, B, 7000, bytes_sent=99)]))
        (c,) = _vm_procs(agent)["g1"][0]["connections"]
        assert c["bytes_sent"] == 99
        g2.census(None)  # its process has nothing left to list
        assert "g2" not in _vm_procs(agent)
        text = metrics(agent)
        assert 'cosock_connections{host="h1",path="shm"} 1' in text
        assert 'cosock_bytes{host="h1",direction="sent"} 99' in text
    # Both gateway connections closed: their reports went with them.
    wait_for(lambda: not _vm_procs(agent), timeout=10)
    state = status(agent)
    assert [g["name"] for g in state["vm_guests"]] == ["g1", "g2"]


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ("not a dict", "not an object"),
        (_doc(0, []), "pid 0 is not a process id"),
        (_doc(5, [_row(A, 1, B, 2, path="warp")]), "connection 0: path 'warp' is not one of"),
        (_doc(5, [_row(A, 1, B, 70000)]), "connection 0: peer_port 70000 is outside"),
        (_doc(5, [_row(A, 1, B, 2, bytes_sent=-1)]), "bytes_sent must be a non-negative"),
        (_doc(5, [_row(A, 1, B, 2, bytes_sent=1 << 64)]), "bytes_sent must be a non-negative"),
        (_doc(5, [_row(A, 1, B, 2, error="x" * 300)]), "error must be a string of at most"),
        (_doc(5, [_row(A, 1, B, 2, accelerated="yes")]), "accelerated must be true or false"),
        (_doc(5, [_row("banana", 1, B, 2)]), "local_addr and peer_addr must be IP addresses"),
        # Rows of another VM's connection: g1 cannot speak for g2's address.
        (_doc(5, [_row(B, 7000, A, 40000)]), "local address 127.0.0.3 is g2's, not this VM's"),
        (_doc(5, [_row("10.9.9.9", 7000, A, 40000)]), "local address 10.9.9.9 is not this VM's"),
        (_doc(5, [], listeners=[{"addr": B, "port": 1}]), "listener 0: local address"),
        (_doc(5, [], fallbacks={"x": "many"}), "is not reason: count"),
        (
            _doc(5, [_row(A, 1 + i % 60000, B, 2) for i in range(_vmcensus.MAX_CONNECTIONS + 1)]),
            "1001 connections in one report, more than 1000",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_a_bad_report_gets_a_clear_error_and_changes_nothing(
    world: World,  # noqa: F811
    agent: Path,
    doc: Any,
    error: str,
) -> None:
    addr = world.gate.server_address[:2]
    with VmAgent(addr, token="tok-1") as g1, VmAgent(addr, token="tok-2") as g2:
        g1.census(_doc(100, [_row(A, 40000, B, 7000)]))
        g2.census(_doc(200, [_row(B, 7000, A, 40000)]))
        time.sleep(_vmcensus.MIN_INTERVAL_S)
        with pytest.raises(SlotRefused, match=re.escape(error)):
            g1.census(doc)
        # g1's previous report, g2's, the gateway connection and the agent are unchanged.
        procs = _vm_procs(agent)
        assert [p["pid"] for p in procs["g1"]] == [100]
        assert [p["pid"] for p in procs["g2"]] == [200]
        assert g1.guests() == {"g1": A, "g2": B}
        assert status(agent)["vm_census_rejected"] == {"g1": 1}


def test_a_vm_is_bounded_in_rate_processes_rows_and_line_length(
    world: World,  # noqa: F811
    agent: Path,
) -> None:
    addr = world.gate.server_address[:2]
    with VmAgent(addr, token="tok-2") as other:
        other.census(_doc(9, [_row(B, 7000, A, 40000)]))
        with VmAgent(addr, token="tok-1") as g1:
            g1.census(_doc(100, []))
            with pytest.raises(SlotRefused, match=r"at most one report every 0\.5 s"):
                g1.census(_doc(100, [_row(A, 40000, B, 7000)]))
        # Rows over all of a VM's processes: 4 reports of 1000 fill 4000 of 4096.
        full = [_row(A, 1 + i, B, 2) for i in range(_vmcensus.MAX_CONNECTIONS)]
        held = [VmAgent(addr, token="tok-1") for _ in range(5)]
        try:
            for i, g in enumerate(held[:4]):
                g.census(_doc(10 + i, full))
            with pytest.raises(SlotRefused, match="would list 5000 rows, more than 4096"):
                held[4].census(_doc(20, full))
            held[4].census(_doc(20, full[:96]))  # exactly the rest fits
        finally:
            for g in held:
                g.close()
        # An over-long line is refused and the connection closed; others carry on.
        with socket.create_connection(addr, timeout=30) as raw:
            raw.sendall(b'{"op": "hello", "token": "tok-1"}\n')
            f = raw.makefile("rb")
            assert json.loads(f.readline())["ok"]
            raw.sendall(b"x" * _vmgate.MAX_LINE)  # no newline within the limit
            reply = json.loads(f.readline())
            assert reply == {"ok": False, "error": "request longer than 1048576 bytes"}
            assert f.readline() == b""  # hung up
            f.close()
        wait_for(lambda: set(_vm_procs(agent)) == {"g2"}, timeout=10)
        assert other.guests() == {"g1": A, "g2": B}
        assert [p["pid"] for p in _vm_procs(agent)["g2"]] == [9]


def test_processes_per_vm_are_bounded(world: World, agent: Path) -> None:  # noqa: F811
    addr = world.gate.server_address[:2]
    held = []
    try:
        for i in range(_vmcensus.MAX_REPORTS_PER_VM):
            g = VmAgent(addr, token="tok-1")
            held.append(g)
            g.census(_doc(1 + i, []))
        with (
            VmAgent(addr, token="tok-1") as extra,
            pytest.raises(SlotRefused, match="g1 already has 64 processes listed"),
        ):
            extra.census(_doc(999, []))
        assert len(_vm_procs(agent)["g1"]) == _vmcensus.MAX_REPORTS_PER_VM
    finally:
        for g in held:
            g.close()


def _status_json(agent: Path) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-m", "cosock", "status", "--json", "--socket", str(agent)],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("COSOCK_VM")},
    )
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def _ends(doc: dict[str, Any], port: int) -> dict[str, dict[str, Any]]:
    """The connection to ``port`` as listed per VM (both ends)."""
    out = {}
    for proc in doc["processes"]:
        for c in proc["connections"]:
            if port in (c["local_port"], c["peer_port"]) and proc.get("vm"):
                out[proc["guest"]] = c
    return out


def _mark_leaving(w: World, guest: str, leaving: bool) -> None:
    path = w.gate.guests.path
    data = json.loads(path.read_text())
    data["guests"][guest]["leaving"] = leaving
    path.write_text(json.dumps(data))
    later = time.time_ns() + 10**9 * (3 if leaving else 5)
    os.utime(path, ns=(later, later))


def test_cosock_status_on_the_host_lists_both_ends_in_the_vms_with_their_bytes(
    world: World,  # noqa: F811
    agent: Path,
    free_port: int,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two pretend guests under ``cosock run`` with one connection through a slot: the
    host's ``cosock status --json`` lists both ends under their VM names, on shm, with the
    bytes that were echoed, and follows the bytes sent later; the table and the metrics
    show them."""
    n = 300_007
    stop = str(tmp_path / "stop")
    srv = world.start("g2", "echo-server", B, str(free_port))
    client = subprocess.Popen(
        [*RUN, "hold-client", B, str(free_port), str(n), stop],
        env=world.env["g1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None
    try:
        held = json.loads(client.stdout.readline())
        assert held["held"] == n and held["path"] == "shm", held

        def shm_both() -> Any:
            ends = _ends(_status_json(agent), free_port)
            return ends if set(ends) == {"g1", "g2"} and ends["g1"]["bytes_sent"] == n else None

        ends = wait_for(shm_both, timeout=30)
        c, s = ends["g1"], ends["g2"]
        assert (c["local_addr"], c["local_port"], c["peer_addr"], c["peer_port"]) == (
            A,
            held["local_port"],
            B,
            free_port,
        )
        assert (s["local_addr"], s["local_port"], s["peer_addr"]) == (B, free_port, A)
        assert (c["path"], s["path"]) == ("shm", "shm")
        assert (c["bytes_sent"], c["bytes_received"]) == (n, n)
        assert (s["bytes_sent"], s["bytes_received"]) == (n, n)
        assert c["switches"] == s["switches"] == 0

        # More bytes: the census follows them (the reports change, so they are sent again).
        Path(stop + ".more").touch()
        more = json.loads(client.stdout.readline())
        assert more == {"more": n, "path": "shm", "reason": None}

        def counted() -> Any:
            ends = _ends(_status_json(agent), free_port)
            return ends if ends.get("g2", {}).get("bytes_received") == 2 * n else None

        ends = wait_for(counted, timeout=30)
        assert ends["g1"]["bytes_sent"] == ends["g1"]["bytes_received"] == 2 * n
        assert ends["g2"]["bytes_sent"] == 2 * n
        text = metrics(agent)
        assert 'cosock_connections{host="h1",path="shm"} 2' in text
        assert f'cosock_bytes{{host="h1",direction="sent"}} {4 * n}' in text
        # (A pretend guest's address is a loopback one, which the residency watch never
        # switches: the switch to TCP is checked with real VMs, test_vm_status.py.)
        _mark_leaving(world, "g1", True)
        table = subprocess.run(
            [sys.executable, "-m", "cosock", "status", "--socket", str(agent)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert table.returncode == 0, table.stderr
        assert "g1" in table.stdout and "vm (leaving)" in table.stdout, table.stdout
    finally:
        Path(stop).touch()
        _mark_leaving(world, "g1", False)
        out, _ = client.communicate(timeout=60)
        served = _finish(srv)
    assert client.returncode == 0
    assert json.loads(out.splitlines()[-1]) == {"done": True}
    assert served == [{"echoed": 2 * n, "path": "shm", "reason": None}]
    # Both processes exited: their gateway connections, and so their reports, are gone.
    wait_for(lambda: not _ends(_status_json(agent), free_port), timeout=15)
