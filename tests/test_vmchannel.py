"""CoSocket over an ivshmem slot, without VMs: the ivshmem provider (``cosock._vmchannel``)
with a real VM gateway on loopback, a real pool file in /dev/shm standing for BAR2
(``COSOCK_IVSHMEM``) and two unmodified programs under ``cosock run`` standing for two guests
(tokens in 0600 files instead of fw_cfg; addresses 127.0.0.2 and 127.0.0.3 on lo).

The same programs run between real QEMU guests in test_vm_cosock.py (marker ``vm``).
"""

from __future__ import annotations

import contextlib
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

from cosock._errors import FallbackReason
from cosock._ivshmem import Pool
from cosock.agent import _vmgate

PEER = str(Path(__file__).with_name("vm_cosock_peer.py"))
RUN = [sys.executable, "-m", "cosock", "run", "--", sys.executable, PEER]
A, B, C = "127.0.0.2", "127.0.0.3", "127.0.0.4"

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
    # Each end marked its slot in the slot itself: mapped, then released (what a gateway
    # restarted after a crash reads before it unplugs a pool it did not make).
    from cosock._ivshmem import RELEASED

    pool, layout = world.gate.pool, world.gate.layout
    assert pool is not None
    uses = [pool.slot_use(layout, s) for s in range(layout.slot_count)]
    assert (RELEASED, RELEASED) in uses and pool.slots_in_use(layout) == [], uses


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


@contextlib.contextmanager
def _two_hosts(tmp_path: Path) -> Iterator[tuple[list[Path], list[_vmgate.VmGateway], list[Path]]]:
    """Two hosts' gateways with pools of their own: g1 and g2 on the first, g3 on the
    second (their guests files, to be rewritten by a test's "migration")."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    docs = (
        {"g1": {"token": "tok-1", "address": A}, "g2": {"token": "tok-2", "address": B}},
        {"g3": {"token": "tok-3", "address": C}},
    )
    pools: list[Path] = []
    gates: list[_vmgate.VmGateway] = []
    files: list[Path] = []
    try:
        for i, doc in enumerate(docs):
            pool = base / f"cosock-vmmove-{os.getpid()}-{time.monotonic_ns()}-{i}.ivshmem"
            with open(pool, "wb") as f:
                f.truncate(1 << 20)
            pools.append(pool)
            with Pool(pool) as p:
                p.format(64 << 10)
            files.append(tmp_path / f"vm-guests-{i}.json")
            files[i].write_text(json.dumps({"guests": doc}))
            gates.append(_vmgate.start(("127.0.0.1", 0), pool, files[i]))
        yield pools, gates, files
    finally:
        for gate in gates:
            gate.shutdown()
            gate.server_close()
        for pool in pools:
            pool.unlink()


def test_a_migrated_guest_follows_the_redirect_reopens_the_pool_and_republishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library side of a live migration, in-process: two hosts' gateways with their own
    pools; g2 is moved from the first to the second (the lab rewrites both files; the pool
    "device" is replaced, as the re-plug does). g2's listener keeper asks within a second and
    is redirected: it greets the new gateway, re-publishes its listener there, forgets the old
    pool (a slot of the new pool maps the new file) and never gives a slot back across hosts.
    A redirect to a gateway that does not answer is ``agent-unreachable`` at once, naming the
    move."""
    from cosock._errors import AgentUnavailable, FallbackReason
    from cosock._vmchannel import VmDirectory

    with _two_hosts(tmp_path) as (pools, gates, files):
        device = tmp_path / "resource2"
        device.symlink_to(pools[0])
        token = tmp_path / "token"
        token.write_text("tok-2")
        token.chmod(0o600)
        monkeypatch.setenv("COSOCK_VM_GATEWAY", f"127.0.0.1:{gates[0].server_address[1]}")
        monkeypatch.setenv("COSOCK_VM_TOKEN_FILE", str(token))
        monkeypatch.setenv("COSOCK_IVSHMEM", str(device))
        d = VmDirectory()
        try:
            d.listen("0.0.0.0", 9000)
            assert d.lookup(A, 9000)[0] is not None  # g1 is a neighbour
            d._open_pool()  # the old host's pool is open when the move comes
            assert ("g2", "0.0.0.0", 9000) in gates[0].listeners
            # The move: g2 runs on the second host now; its pool device is the second file.
            second = f"127.0.0.1:{gates[1].server_address[1]}"
            files[1].write_text(
                json.dumps(
                    {
                        "guests": {
                            "g2": {"token": "tok-2", "address": B},
                            "g3": {"token": "tok-3", "address": C},
                        }
                    }
                )
            )
            files[0].write_text(
                json.dumps(
                    {
                        "guests": {"g1": {"token": "tok-1", "address": A}},
                        "moved": {"g2": {"token": "tok-2", "gateway": second}},
                    }
                )
            )
            for f in files:
                os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
            device.unlink()
            device.symlink_to(pools[1])
            # Nothing asks the gateway here: the listener keeper follows the redirect alone.
            for _ in range(100):
                if ("g2", "0.0.0.0", 9000) in gates[1].listeners:
                    break
                time.sleep(0.05)
            assert ("g2", "0.0.0.0", 9000) in gates[1].listeners
            time.sleep(1.1)  # the guest list's cache
            listener, why = d.lookup(C, 9000)
            assert listener is not None and listener.guest == "g3", why
            assert d.lookup(A, 9000) == (None, "not-coresident")
            assert d.moves == 1 and not d._pools  # the old BAR is not used again
            assert ("g2", "0.0.0.0", 9000) in gates[1].listeners
            for _ in range(50):  # the old gateway's handler drops it when it hangs up
                if ("g2", "0.0.0.0", 9000) not in gates[0].listeners:
                    break
                time.sleep(0.05)
            assert ("g2", "0.0.0.0", 9000) not in gates[0].listeners
            made = d.offer((B, 40000), (C, 9000))
            assert made == FallbackReason.NOT_CORESIDENT  # g3 publishes no listener
            with VmAgentFor(gates[1], "tok-3") as g3:
                g3.listen(C, 9000)
                made = d.offer((B, 40000), (C, 9000))
                assert not isinstance(made, FallbackReason), made
                _, mm, _ = made
                assert d._pools[""][0].path == device
                with open(pools[1], "rb") as f:  # the slot lives in the second host's pool
                    f.seek(gates[1].layout.offset(mm._give_back.slot))
                    assert f.read(64) == bytes(mm[:64])
                mm.close()
                assert gates[1].table.free_count == gates[1].layout.slot_count
            # Moved again, to a host whose gateway is down: unreachable, naming the move.
            files[1].write_text(
                json.dumps(
                    {
                        "guests": {"g3": {"token": "tok-3", "address": C}},
                        "moved": {"g2": {"token": "tok-2", "gateway": "127.0.0.1:9"}},
                    }
                )
            )
            os.utime(files[1], ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
            time.sleep(1.1)
            t = time.monotonic()
            listener, why = d.lookup(C, 9000)
            assert listener is None and why.startswith("agent-unreachable"), why
            assert "moved" in why and "127.0.0.1:9" in why, why
            assert time.monotonic() - t < 5
            with pytest.raises(AgentUnavailable):
                d._call("guests")  # within the retry second: the kept reason, no wait
        finally:
            d.close()


class VmAgentFor:
    """A second guest's gateway connection (a listener of g3 on the second host)."""

    def __init__(self, gate: _vmgate.VmGateway, token: str) -> None:
        from cosock._vmagent import VmAgent

        self.agent = VmAgent(gate.server_address[:2], token=token)

    def __enter__(self) -> Any:
        return self.agent

    def __exit__(self, *exc: object) -> None:
        self.agent.close()


def test_a_moved_guest_whose_old_gateway_cannot_redirect_asks_the_one_fw_cfg_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a live migration the guest reads the gateway from the fw_cfg of the QEMU that
    runs it now (the lab starts the target QEMU with its host's; test_lab_qemu checks that a
    real moved guest reads the new one). So the old host need not know where the guest went:
    here the old gateway just forgets g2 (no ``moved`` entry: its agent restarted, or the host
    is gone) and hangs up; g2's listener keeper redials, and the gateway file (standing for
    fw_cfg) names the second host, where it re-publishes its listener and finds g3."""
    from cosock._vmchannel import VmDirectory

    token = tmp_path / "token"
    token.write_text("tok-2")
    token.chmod(0o600)
    fw_cfg = tmp_path / "gateway"
    with _two_hosts(tmp_path) as (pools, gates, files):
        first, second = (f"127.0.0.1:{g.server_address[1]}" for g in gates)
        fw_cfg.write_text(first.ljust(64))  # padded, as the lab passes it
        monkeypatch.setenv("COSOCK_VM_GATEWAY", "127.0.0.1:9")  # boot-time: never asked
        monkeypatch.setenv("COSOCK_VM_GATEWAY_FILE", str(fw_cfg))
        monkeypatch.setenv("COSOCK_VM_TOKEN_FILE", str(token))
        monkeypatch.setenv("COSOCK_IVSHMEM", str(pools[0]))
        d = VmDirectory()
        try:
            d.listen("0.0.0.0", 9000)
            assert d.lookup(A, 9000)[0] is not None
            assert ("g2", "0.0.0.0", 9000) in gates[0].listeners
            # The move: the second host lists g2, the first forgets it without a redirect,
            # and the running QEMU's fw_cfg names the second host's gateway.
            files[1].write_text(
                json.dumps(
                    {
                        "guests": {
                            "g2": {"token": "tok-2", "address": B},
                            "g3": {"token": "tok-3", "address": C},
                        }
                    }
                )
            )
            files[0].write_text(json.dumps({"guests": {"g1": {"token": "tok-1", "address": A}}}))
            for f in files:
                os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
            fw_cfg.write_text(second.ljust(64))
            for _ in range(100):  # the keeper: refused by the first, redials the second
                if ("g2", "0.0.0.0", 9000) in gates[1].listeners:
                    break
                time.sleep(0.05)
            assert ("g2", "0.0.0.0", 9000) in gates[1].listeners
            assert ("g2", "0.0.0.0", 9000) not in gates[0].listeners
            time.sleep(1.1)  # the guest list's cache
            listener, why = d.lookup(C, 9000)
            assert listener is not None and listener.guest == "g3", why
            assert d.lookup(A, 9000) == (None, "not-coresident")
            assert d.moves == 1 and d._gate_addr == gates[1].server_address[:2]
            # Bad input: a gateway file that is not ADDR:PORT is a clear reason, no hang.
            fw_cfg.write_text("garbage")
            from cosock._errors import AgentUnavailable
            from cosock._vmagent import gateway_address

            with pytest.raises(AgentUnavailable, match="not ADDR:PORT"):
                gateway_address()
        finally:
            d.close()


def test_a_switch_is_judged_on_a_fresh_guest_list_not_the_cached_one(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The residency watch switches a connection to TCP only if the peer is missing from a
    list fetched now: the second-long cache can predate an undone ``leaving`` mark that the
    peer has already re-upgraded on (the extra switch test_vm_cosock's leave-and-undo saw)."""
    from cosock._vmchannel import VmDirectory

    for key, value in world.env["g2"].items():
        if key.startswith("COSOCK_VM") or key == "COSOCK_IVSHMEM":
            monkeypatch.setenv(key, value)
    # The asking path (a pushed list is current anyway: test_vmwatch.py).
    monkeypatch.setenv("COSOCK_VM_WATCH", "0")
    guests = tmp_path / "vm-guests.json"
    doc = json.loads(guests.read_text())

    def write(leaving: bool) -> None:
        doc["guests"]["g1"]["leaving"] = leaving
        guests.write_text(json.dumps(doc))
        bump = time.time_ns() + (2 if leaving else 3) * 10**9
        os.utime(guests, ns=(bump, bump))

    d = VmDirectory()
    try:
        write(True)
        assert d.guest_owning(A) is None  # cached: g1 is leaving
        assert d.gone_for_sure(A)  # fetched now: still leaving, the switch goes ahead
        write(False)  # undone; the cache (< 1 s old) still says gone ...
        assert d.guest_owning(A) is None
        time.sleep(0.06)
        assert not d.gone_for_sure(A)  # ... a fresh list says g1 is back: no switch
        assert d.guest_owning(A) is not None
    finally:
        d.close()


def test_loopback_in_a_vm_takes_a_memfd_through_its_own_agent(
    world: World, cosock_agent: Path
) -> None:
    """A pretend VM (g2) with its own agent, as ``cosock run`` starts in a VM: a loopback
    connection between two of its programs takes a memfd (the local agent answers first), a
    loopback listener is not published to the gateway (no other VM can reach it), and a
    wildcard listener is published to both: the other VM (g1) still reaches it via a slot."""
    import socket

    world.env["g2"]["COSOCK_AGENT"] = str(cosock_agent)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        lo_port = s.getsockname()[1]
    srv = world.start("g2", "server", "127.0.0.1", str(lo_port), "3")
    assert not any(entry[0] == "g2" for entry in world.gate.listeners)
    report = world.run("g2", "client", "127.0.0.1", str(lo_port))
    assert report["stream"] == {"up_ok": True, "down_ok": True, "path": "shm", "reason": None}
    assert report["rr"]["ok"] and report["rr"]["path"] == "shm"
    assert report["eof"] == {"ok": True, "path": "shm", "reason": None}
    assert [x["path"] for x in _finish(srv)] == ["shm"] * 3
    assert world.gate.table.free_count == world.gate.layout.slot_count  # no slot: a memfd
    with socket.socket() as s:
        s.bind((B, 0))
        port = s.getsockname()[1]
    srv = world.start("g2", "server", "0.0.0.0", str(port), "2")
    assert ("g2", "0.0.0.0", port) in world.gate.listeners
    lo = world.run("g2", "plain-client", "127.0.0.1", str(port))
    assert lo == {"answer": "3", "path": "shm", "reason": None}
    other = world.run("g1", "plain-client", B, str(port))
    assert other == {"answer": "3", "path": "shm", "reason": None}
    assert [x["path"] for x in _finish(srv)] == ["shm", "shm"]
    assert _slots_back(world)


def test_loopback_in_a_vm_still_takes_a_memfd_while_the_gateway_is_down(
    world: World, cosock_agent: Path
) -> None:
    """The VM's own agent is up, its host's gateway is not (a closed port): a loopback
    listener is still published to the local agent, so a loopback connection takes a memfd;
    it used to stay on TCP (``agent-unreachable``: the listener asked the gateway who we are)."""
    import socket

    env = world.env["g2"]
    env["COSOCK_AGENT"] = str(cosock_agent)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    env["COSOCK_VM_GATEWAY"] = f"127.0.0.1:{dead}"  # nobody listens there now
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        lo_port = s.getsockname()[1]
    srv = world.start("g2", "server", "127.0.0.1", str(lo_port), "3")
    try:
        report = world.run("g2", "client", "127.0.0.1", str(lo_port))
        assert report["stream"] == {"up_ok": True, "down_ok": True, "path": "shm", "reason": None}
        assert report["rr"]["ok"] and report["rr"]["path"] == "shm"
        assert [x["path"] for x in _finish(srv)] == ["shm"] * 3
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.communicate()


@contextlib.contextmanager
def _in_process_guest(world: World, monkeypatch: pytest.MonkeyPatch, guest: str) -> Iterator[Any]:
    """This process as ``guest`` of ``world``: its VmDirectory (closed afterwards)."""
    from cosock._vmchannel import VmDirectory

    for key in ("COSOCK_VM_GATEWAY", "COSOCK_VM_TOKEN_FILE", "COSOCK_IVSHMEM"):
        monkeypatch.setenv(key, world.env[guest][key])
    d = VmDirectory()
    try:
        yield d
    finally:
        d.close()


def _slot_bytes(world: World, slot: int, start: int, n: int) -> bytes:
    with Pool(world.pool) as p:
        layout = p.layout()
    with open(world.pool, "rb") as f:
        f.seek(layout.offset(slot) + start)
        return f.read(n)


def test_a_forking_server_gives_every_connections_slot_back(world: World, free_port: int) -> None:
    """A ForkingTCPServer's child serves each connection; its parent mapped the slot at
    accept() and closes its copy at once.  Neither process gave a slot shared by fork() back
    (either might still use it), so a long-running forking server used up its pair's pool:
    in a VM, 28 of 400 connections on shm, the rest on TCP for want of a slot.  Now the last
    of the processes to let go gives it back: more connections than slots, all on shm.
    Found with it: a child's first census went out on the parent's gateway connection, and
    the parent took its answer for a claim's (KeyError in accept(): the server died)."""
    n = 2 * world.gate.layout.slot_count + 3
    srv = world.start("g2", "forking-server", B, str(free_port), str(n))
    try:
        report = world.run("g1", "fork-clients", B, str(free_port), str(n))
        assert _finish(srv)[-1] == {"served": n}
    finally:
        if srv.poll() is None:  # (its children end with their connections)
            srv.kill()
            srv.communicate()
    assert report["bad"] == []
    assert report["paths"] == ["shm"] * n
    assert _slots_back(world), "every slot is given back"


def test_a_slot_given_back_is_no_longer_mapped(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a path switch gives the slot back, the process's mapping of it (the frozen
    rings' views still point into it) shows a private copy, never the slot again: in a VM a
    kept mapping of a hot-unplugged pool becomes one of the pair's next pool, plugged at the
    same BAR address, so a write through it (a thread racing the switch, a test's scribble)
    would land in another connection's rings, and a read would deliver its bytes."""
    from cosock._vmagent import VmAgent
    from cosock._vmchannel import switched

    with (
        _in_process_guest(world, monkeypatch, "g1") as d,
        VmAgent(world.gate.server_address[:2], token="tok-2") as g2,
    ):
        g2.listen(B, 9000)
        made = d.offer((A, 40000), (B, 9000))
        assert not isinstance(made, FallbackReason), made
        _, mm, _ = made
        slot, generation = mm._give_back.slot, mm._give_back.generation
        g2.claim_offer_in((A, 40000, B, 9000))
        data = 4096 + 8  # inside ring 0's data, past its header
        mm[data : data + 4] = b"mine"
        assert _slot_bytes(world, slot, data, 4) == b"mine"
        view = memoryview(mm)[data : data + 4]  # as a frozen ring's view of its data
        switched(mm)  # given back, still mapped
        g2.free_slot(slot, generation)
        assert bytes(view) == b"mine"  # it shows what it showed...
        view[:] = b"late"  # ...but a write through it stays in this process
        mm[data + 4 : data + 8] = b"more"
        assert _slot_bytes(world, slot, data, 8) == b"mine" + bytes(4)
        view.release()
        mm.close()
        assert _slots_back(world)


def test_a_slot_that_holds_another_grant_is_not_mapped_and_named_as_the_cause(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A party maps a slot only if it carries its grant's stamp; a ring whose slot was
    granted again under it says so instead of "corrupted"; and a mapping of an older grant
    never marks the slot released (the new grant's use marks are not its to write)."""
    from cosock._errors import RingCorrupted
    from cosock._ivshmem import MAPPED, SERVER, PoolError, new_stamp, read_stamp
    from cosock._ring import RingReader
    from cosock._vmagent import VmAgent

    with (
        _in_process_guest(world, monkeypatch, "g1") as d,
        VmAgent(world.gate.server_address[:2], token="tok-2") as g2,
    ):
        g2.listen(B, 9000)
        made = d.offer((A, 40000), (B, 9000))
        assert not isinstance(made, FallbackReason), made
        _, mm, capacity = made
        slot, generation = mm._give_back.slot, mm._give_back.generation
        *_, stamp = g2.claim_offer_grant((A, 40000, B, 9000))
        assert stamp and read_stamp(mm) == stamp  # the grant's stamp, in the slot
        with pytest.raises(PoolError, match="another grant"):
            d._map(slot, generation, "", SERVER, stamp ^ 1)
        rx = RingReader(mm, 1, capacity)
        assert rx.available() == 0
        # The slot is formatted for another grant under our feet, its ring written to.
        with Pool(world.pool) as p:
            layout = p.layout()
            p.format_slot(layout, slot, new_stamp())
            with p.map_slot(layout, slot) as other:
                head = 4096 + capacity + 8 * 8  # ring 1's head word
                other[head : head + 8] = (3 * capacity).to_bytes(8, "little")
                other[512:520] = MAPPED.to_bytes(8, "little")  # the new client maps it
        assert mm.grant_lost()
        with pytest.raises(RingCorrupted, match="granted to another connection"):
            rx.available()
        rx.release()
        mm.close()  # given back: the gateway frees our grant, the slot's marks stay theirs
        with Pool(world.pool) as p:
            assert p.slot_use(p.layout(), slot) == (MAPPED, 0)
