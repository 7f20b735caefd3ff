"""CoSocket over an ivshmem slot, without VMs: the ivshmem provider (``cosock._vmchannel``)
with a real VM gateway on loopback, a real pool file in /dev/shm standing for BAR2
(``COSOCK_IVSHMEM``) and two unmodified programs under ``cosock run`` standing for two guests
(tokens in 0600 files instead of fw_cfg; addresses 127.0.0.2 and 127.0.0.3 on lo).

The same programs run between real QEMU guests in test_vm_cosock.py (marker ``vm``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cosock._ivshmem import Pool
from cosock.agent import _vmgate

PEER = str(Path(__file__).with_name("vm_cosock_peer.py"))
RUN = [sys.executable, "-m", "cosock", "run", "--", sys.executable, PEER]
A, B = "127.0.0.2", "127.0.0.3"

pytestmark = pytest.mark.timeout(120)


@dataclass
class World:
    gate: _vmgate.VmGateway
    pool: Path
    env: dict[str, dict[str, str]]

    def start(self, guest: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*RUN, *args], env=self.env[guest], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline() or "{}")
        assert "listening" in first, first
        return proc

    def run(self, guest: str, *args: str, **extra: str) -> dict[str, Any]:
        r = subprocess.run(
            [*RUN, *args],
            env={**self.env[guest], **extra},
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return dict(json.loads(r.stdout.splitlines()[-1]))


def _finish(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    pool = base / f"cosock-vmch-test-{os.getpid()}-{time.monotonic_ns()}.ivshmem"
    with open(pool, "wb") as f:
        f.truncate(4 << 20)
    with Pool(pool) as p:
        p.format(64 << 10)
    guests = tmp_path / "vm-guests.json"
    doc = {
        "guests": {"g1": {"token": "tok-1", "address": A}, "g2": {"token": "tok-2", "address": B}}
    }
    guests.write_text(json.dumps(doc))
    gate = _vmgate.start(("127.0.0.1", 0), pool, guests)
    env = {}
    for name, token in (("g1", "tok-1"), ("g2", "tok-2")):
        tok = tmp_path / f"token-{name}"
        tok.write_text(token)
        tok.chmod(0o600)
        env[name] = {
            **os.environ,
            "COSOCK_VM_GATEWAY": f"127.0.0.1:{gate.server_address[1]}",
            "COSOCK_VM_TOKEN_FILE": str(tok),
            "COSOCK_IVSHMEM": str(pool),
            "COSOCK_AGENT": str(tmp_path / "no-local-agent.sock"),  # cosock run starts none
            "PEER_SOURCE": A if name == "g1" else B,
        }
    try:
        yield World(gate, pool, env)
    finally:
        gate.shutdown()
        gate.server_close()
        pool.unlink()


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((B, 0))
        return int(s.getsockname()[1])


def _slots_back(world: World) -> bool:
    deadline = time.monotonic() + 10
    while world.gate.table.free_count != world.gate.layout.slot_count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_stream_rr_and_eof_go_through_a_slot_byte_exact(world: World, free_port: int) -> None:
    srv = world.start("g2", "server", B, str(free_port), "3")
    report = world.run("g1", "client", B, str(free_port))
    served = _finish(srv)
    assert report["stream"] == {"up_ok": True, "down_ok": True, "path": "shm", "reason": None}
    assert report["rr"]["ok"] and report["rr"]["path"] == "shm"
    assert report["eof"] == {"ok": True, "path": "shm", "reason": None}
    assert [s["path"] for s in served] == ["shm", "shm", "shm"]
    assert _slots_back(world), "every slot is given back when its connections close"
    assert world.gate.listeners == {}  # the listener left with its process


def test_asyncio_echo_goes_through_a_slot(world: World, free_port: int) -> None:
    srv = world.start("g2", "aserver", B, str(free_port))
    try:
        report = world.run("g1", "aclient", B, str(free_port))
    finally:
        srv.terminate()
        srv.communicate(timeout=30)
    assert report["ok"] and report["path"] == "shm", report
    assert report["bytes"] == sum(32_768 + i for i in range(64))


def test_a_server_without_cosock_gets_plain_tcp(world: World, free_port: int) -> None:
    """The listener is not published (not under cosock): the gateway refuses the offer and
    the connection is plain TCP, nothing of the handshake reaching the server."""
    plain = [sys.executable, PEER, "server", B, str(free_port), "1"]
    srv = subprocess.Popen(plain, env=world.env["g2"], stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None and "listening" in srv.stdout.readline()
    report = world.run("g1", "plain-client", B, str(free_port))
    assert report == {"answer": "3", "path": "tcp", "reason": "not-coresident"}
    assert _finish(srv) == [{"cmd": "eof", "path": "plain", "reason": None}]
    assert _slots_back(world)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"COSOCK_IVSHMEM": "/nonexistent/resource2"}, "no-shm-device"),
        ({"COSOCK_VM_GATEWAY": "127.0.0.1:1"}, "agent-unreachable"),
        ({"COSOCK_VM_TOKEN_FILE": "/nonexistent/token"}, "agent-unreachable"),
    ],
    ids=["no-device", "no-gateway", "no-token"],
)
def test_what_is_missing_falls_back_to_tcp_with_a_reason(
    world: World, free_port: int, extra: dict[str, str], reason: str
) -> None:
    srv = world.start("g2", "server", B, str(free_port), "1")
    report = world.run("g1", "plain-client", B, str(free_port), **extra)
    assert report == {"answer": "3", "path": "tcp", "reason": reason}
    assert _finish(srv)[0]["path"] == "tcp"
    assert _slots_back(world)


def test_a_peer_that_is_not_a_vm_of_this_host_gets_tcp(world: World, free_port: int) -> None:
    """127.0.0.1 is in no guest's record: not co-resident, no gateway offer made."""
    srv = world.start("g2", "server", "127.0.0.1", str(free_port), "1")
    report = world.run("g1", "plain-client", "127.0.0.1", str(free_port), PEER_SOURCE="")
    assert report == {"answer": "3", "path": "tcp", "reason": "not-coresident"}
    assert _finish(srv)[0]["path"] == "tcp"
