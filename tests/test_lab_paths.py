"""End to end in a lab of real network namespaces (root): which path each connection takes
between guests, byte-exact transfers, fallbacks, concurrency and a forged offer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cosock._run import run_env

PEERS = str(Path(__file__).with_name("lab_peers.py"))
DEMO = [sys.executable, "-m", "cosock._demo_apps"]
PORT = 7100


def _env(lab: Any, guest: str, cosock: bool) -> dict[str, str]:
    env = lab.env(guest)
    return run_env(env, start_agent=False) if cosock else env


def _server(lab: Any, guest: str, argv: list[str], cosock: bool = True) -> subprocess.Popen[str]:
    proc = lab.popen(guest, argv, env=_env(lab, guest, cosock), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("{"), f"server in {guest} did not start: {line!r}"
    return proc


def _run(lab: Any, guest: str, argv: list[str], cosock: bool = True, timeout: float = 120) -> Any:
    out = lab.run(guest, argv, env=_env(lab, guest, cosock), capture_output=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    text = out.stdout if isinstance(out.stdout, str) else out.stdout.decode()
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture
def demo_server(lab: Any) -> Any:
    proc = _server(lab, "h1g1", [*DEMO, "server", "--port", str(PORT)])
    yield lab.guest("h1g1").addresses[0]
    proc.kill()
    proc.wait()


@pytest.mark.parametrize(
    "client,cosock,path",
    [("h1g2", True, "shm"), ("h2g1", True, "tcp"), ("h1g2", False, "tcp")],
    ids=["same-host-cosock", "other-host-cosock", "same-host-plain-client"],
)
def test_path_between_guests(lab, demo_server, client, cosock, path):
    size = 8 << 20
    result = _run(
        lab,
        client,
        [*DEMO, "client", "--host", demo_server, "--port", str(PORT), "--bytes", str(size)],
        cosock,
    )
    assert result["verified"] is True
    assert result["bytes"] == 2 * size
    assert result["path"] == path


def test_cosock_client_to_plain_server_in_another_guest(lab):
    proc = _server(lab, "h1g1", [*DEMO, "server", "--port", str(PORT)], cosock=False)
    try:
        ip = lab.guest("h1g1").addresses[0]
        result = _run(
            lab,
            "h1g2",
            [*DEMO, "client", "--host", ip, "--port", str(PORT), "--bytes", str(1 << 20)],
        )
        assert (result["verified"], result["path"]) == (True, "tcp")
    finally:
        proc.kill()
        proc.wait()


def test_one_gibibyte_each_way_with_hashes(lab, demo_server):
    result = _run(
        lab,
        "h1g2",
        [*DEMO, "client", "--host", demo_server, "--port", str(PORT), "--bytes", str(1 << 30)],
        timeout=600,
    )
    assert result == {**result, "verified": True, "path": "shm", "bytes": 2 << 30}


def test_two_hundred_concurrent_connections_between_guests(lab):
    proc = _server(lab, "h1g1", [sys.executable, PEERS, "hash-server", str(PORT)])
    try:
        ip = lab.guest("h1g1").addresses[0]
        result = _run(lab, "h1g2", [sys.executable, PEERS, "many", ip, str(PORT), "200"])
        assert result["ok"] == 200
        assert result["paths"] == {"shm": 200}
        assert result["server_paths"] == {"shm": 200}
    finally:
        proc.kill()
        proc.wait()


def test_half_close_between_guests(lab):
    proc = _server(lab, "h1g1", [sys.executable, PEERS, "hash-server", str(PORT)])
    try:
        ip = lab.guest("h1g1").addresses[0]
        result = _run(lab, "h1g2", [sys.executable, PEERS, "half-close", ip, str(PORT)])
        assert result == {"reply": "got 100000", "path": "shm"}
    finally:
        proc.kill()
        proc.wait()


def test_forged_offer_from_another_guest_cannot_claim_a_connection(lab):
    """A process in h1g2 offers a channel for a connection that h2g2's plain client is about
    to make.  The server must not accept it (the sender does not own that address): the
    real client is served plainly, byte-exact, and never touches the forger's memory."""
    from cosock.agent.client import status

    proc = _server(lab, "h1g1", [sys.executable, PEERS, "hash-server", str(PORT)])
    try:
        ip = lab.guest("h1g1").addresses[0]
        victim_ip = lab.guest("h2g2").addresses[0]
        listeners = status(lab.host("h1").agent_socket)["listeners"]
        rendezvous = next(item["rendezvous"] for item in listeners if item["port"] == PORT)
        victim_port = 40123
        _run(
            lab,
            "h1g2",
            [
                sys.executable,
                PEERS,
                "forge-offer",
                rendezvous,
                victim_ip,
                str(victim_port),
                ip,
                str(PORT),
            ],
            cosock=False,
        )
        code = (
            "import socket,hashlib,json;"
            f"s=socket.socket();s.bind(('{victim_ip}',{victim_port}));s.connect(('{ip}',{PORT}));"
            "d=b'v'*5000;s.sendall(len(d).to_bytes(8,'big')+d);"
            "h=s.recv(32,socket.MSG_WAITALL);p=s.recv(9,socket.MSG_WAITALL).decode().strip();"
            "print(json.dumps({'ok':h==hashlib.sha256(d).digest(),'server_path':p}))"
        )
        result = _run(lab, "h2g2", [sys.executable, "-c", code], cosock=False)
        assert result == {"ok": True, "server_path": "tcp"}
    finally:
        proc.kill()
        proc.wait()


def test_agent_killed_live_connection_keeps_working_new_ones_fall_back(lab):
    """Live connections never depend on the agent; new ones use plain TCP while it is down."""
    code = (
        "import socket,sys,json,time,os\n"
        f"s=socket.create_connection(('{{ip}}',{PORT}))\n"
        "d=os.urandom(100000);s.sendall(len(d).to_bytes(8,'big')+d)\n"
        "first=s.recv(32,socket.MSG_WAITALL);p=s.recv(9,socket.MSG_WAITALL)\n"
        "print(json.dumps({'path':s.cosock_path}),flush=True)\n"
    )
    proc = _server(lab, "h1g1", [sys.executable, PEERS, "hash-server", str(PORT)])
    try:
        ip = lab.guest("h1g1").addresses[0]
        before = _run(lab, "h1g2", [sys.executable, "-c", code.replace("{ip}", ip)])
        assert before["path"] == "shm"
        agent_pid = lab.host("h1").agent_pid
        import os
        import signal

        os.kill(agent_pid, signal.SIGKILL)
        time.sleep(0.2)
        after = _run(lab, "h1g2", [sys.executable, "-c", code.replace("{ip}", ip)])
        assert after["path"] == "tcp"
    finally:
        proc.kill()
        proc.wait()
