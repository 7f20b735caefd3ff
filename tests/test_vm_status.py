"""The host's ``cosock status`` lists the cosock connections inside its QEMU guests.

Each process in a VM reports its census to the host agent's VM gateway (identified by its
fw_cfg token); the host agent lists those processes under the VM's name beside its own.
Real VMs (one host, two VMs, the host root over 9p) under TCG: a connection between
``cosock run`` programs in the two VMs is listed at both ends on shm with the bytes sent,
then on TCP with one switch each once the client's VM is marked leaving, and back on shm when
the mark is undone; a VM that reports garbage or too many rows gets a clear error and
disturbs neither the other rows nor the agent. Without VMs: test_vmcensus.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import QEMU_GROUP
from test_lab_qemu import COSOCK, PY, running_lab

pytestmark = [
    pytest.mark.vm,
    pytest.mark.xdist_group(QEMU_GROUP),
    pytest.mark.timeout(900),
    pytest.mark.leaks_checked_by_module,
]

PEER = str(Path(__file__).with_name("vm_cosock_peer.py"))
RUN = [COSOCK, "run", "--", PY]
SERVER_VM, CLIENT_VM = "h1g2", "h1g1"
PORT = 6101
N = 1_000_003

#: Run in a VM as root (the token is root's): report garbage, then too many rows, then a
#: row for the other VM's address; print each answer of the gateway.
BAD_REPORTER = """
import json, sys
from cosock._vmagent import SlotRefused, VmAgent, parse_address
gate = VmAgent(parse_address(sys.argv[1]))
row = {"local_addr": gate.address, "local_port": 1, "peer_addr": sys.argv[2],
       "peer_port": 2, "accelerated": True, "path": "shm", "fallback_reason": None,
       "error": None, "bytes_sent": 1, "bytes_received": 1, "switches": 0, "upgrades": 0,
       "upgrades_refused": 0}
doc = {"pid": 4242, "comm": "liar", "listeners": [], "fallbacks": {}}
out = []
for conns in (["garbage"], [row] * 1001, [{**row, "local_addr": sys.argv[2]}]):
    try:
        gate.census({**doc, "connections": conns})
        out.append("accepted")
    except SlotRefused as exc:
        out.append(str(exc))
    import time; time.sleep(0.6)
out.append(sorted(gate.guests()))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def vmlab() -> Iterator[Any]:
    with running_lab(hosts=1, guests=2, root="9p") as lab:
        yield lab


def _lines(lab: Any, guest: str, log: str) -> list[dict[str, Any]]:
    text = lab.run(guest, ["cat", log], timeout=60).stdout.decode(errors="replace")
    return [json.loads(x) for x in text.splitlines() if x.startswith("{")]


def _until(check: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _status(lab: Any, *extra: str) -> subprocess.CompletedProcess[str]:
    sock = lab.hosts()[0]["agent_socket"]
    r = subprocess.run(
        [COSOCK, "status", "--socket", sock, *extra], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return r


def _ends(lab: Any, port: int = PORT) -> dict[str, dict[str, Any]]:
    """The rows of the connection to ``port`` in the host's ``cosock status --json``, by VM."""
    doc = json.loads(_status(lab, "--json").stdout)
    out = {}
    for proc in doc["processes"]:
        for c in proc["connections"]:
            if port in (c["local_port"], c["peer_port"]) and proc.get("vm"):
                out[proc["guest"]] = {**c, "pid": proc["pid"]}
    return out


def _echoed(ends: dict[str, dict[str, Any]], size: int = 1000) -> dict[str, dict[str, Any]]:
    """``ends`` once both are listed and each has sent the ``size`` bytes echo; else empty."""
    done = len(ends) == 2 and all(e["bytes_sent"] == size for e in ends.values())
    return ends if done else {}


def test_the_hosts_status_lists_both_ends_in_the_vms_across_a_switch_and_back(
    vmlab: Any,
) -> None:
    from cosock.lab.qemu import _migrate

    client_addr = vmlab.guest(CLIENT_VM).address
    server_addr = vmlab.guest(SERVER_VM).address
    srv_log = f"/tmp/vm-status-srv-{time.time_ns()}.log"
    cli_log = f"/tmp/vm-status-cli-{time.time_ns()}.log"
    stop = f"/tmp/vm-status-stop-{time.time_ns()}"
    vmlab.spawn(SERVER_VM, [*RUN, PEER, "echo-server", "0.0.0.0", str(PORT)], log=srv_log)
    _until(lambda: _lines(vmlab, SERVER_VM, srv_log), "the echo server")
    argv = [*RUN, PEER, "hold-client", server_addr, str(PORT), str(N), stop]
    vmlab.spawn(CLIENT_VM, argv, log=cli_log)
    try:
        (held,) = _until(lambda: _lines(vmlab, CLIENT_VM, cli_log), "the client's echo")
        assert held["held"] == N and held["path"] == "shm", held

        def listed(path: str, sent: int) -> Any:
            ends = _ends(vmlab)
            ok = set(ends) == {CLIENT_VM, SERVER_VM} and all(
                e["path"] == path and e["bytes_received"] == sent for e in ends.values()
            )
            return ends if ok else None

        ends = _until(lambda: listed("shm", N), "both ends on shm")
        c, s = ends[CLIENT_VM], ends[SERVER_VM]
        assert (c["local_addr"], c["local_port"], c["peer_addr"], c["peer_port"]) == (
            client_addr,
            held["local_port"],
            server_addr,
            PORT,
        )
        assert (s["local_addr"], s["local_port"], s["peer_addr"], s["peer_port"]) == (
            server_addr,
            PORT,
            client_addr,
            held["local_port"],
        )
        for e in (c, s):
            assert (e["bytes_sent"], e["bytes_received"], e["switches"]) == (N, N, 0)
            assert e["accelerated"] is True and e["fallback_reason"] is None
        table = _status(vmlab).stdout
        assert CLIENT_VM in table and SERVER_VM in table and "vm" in table, table
        text = _status(vmlab, "--prometheus").stdout
        assert 'path="shm"} 2' in text, text

        state = vmlab._state
        record = next(g for g in state["guests"] if g["name"] == CLIENT_VM)
        try:
            _migrate.switch_to_tcp(state, record, 120)  # returns once no slot is held
            ends = _until(lambda: listed("tcp", N), "both ends on tcp")
            assert ends[CLIENT_VM]["switches"] == ends[SERVER_VM]["switches"] == 1
            vmlab.run(CLIENT_VM, ["touch", stop + ".more"], timeout=60)
            _until(lambda: len(_lines(vmlab, CLIENT_VM, cli_log)) > 1, "the second echo")
            assert _lines(vmlab, CLIENT_VM, cli_log)[1] == {
                "more": N,
                "path": "tcp",
                "reason": None,
            }
            ends = _until(lambda: listed("tcp", 2 * N), "the bytes sent over TCP")
            for e in ends.values():
                assert (e["bytes_sent"], e["switches"]) == (2 * N, 1)
            assert 'cosock_path_switches{host="h1"} 2' in _status(vmlab, "--prometheus").stdout
        finally:
            _migrate.write_vm_guests(state)  # it stays: the client upgrades to a fresh slot
        # The client upgrades at once (its residency watch), but an application that does
        # not read leaves the server's answer unread: the server shows `upgrading` until the
        # client reads (seen here: an idle client stays `tcp`). So it echoes once more.
        time.sleep(3)
        print(json.dumps({"idle after the undo": _ends(vmlab)}))
        vmlab.run(CLIENT_VM, ["touch", stop + ".more"], timeout=60)
        _until(lambda: len(_lines(vmlab, CLIENT_VM, cli_log)) > 2, "the third echo")
        try:
            ends = _until(lambda: listed("shm", 3 * N), "both ends back on shm")
        except AssertionError as exc:
            logs = vmlab.run(CLIENT_VM, ["sh", "-c", f"cat {cli_log}; dmesg | tail -5"], timeout=60)
            raise AssertionError(f"{exc}: {_ends(vmlab)}\n{logs.stdout.decode()}") from None
        assert ends[CLIENT_VM]["upgrades"] == 1
    finally:
        vmlab.run(CLIENT_VM, ["touch", stop], timeout=60)
    _until(lambda: {"done": True} in _lines(vmlab, CLIENT_VM, cli_log), "the client's end")
    # Both processes exited: their gateway connections, and so their reports, are gone.
    _until(lambda: not _ends(vmlab), "the rows to go", timeout=60)


def test_a_vm_reporting_garbage_or_too_much_is_refused_and_disturbs_nothing(
    vmlab: Any,
) -> None:
    """A process in h1g1 with the VM's token reports garbage, too many rows and a row with
    h1g2's address: three clear refusals; meanwhile a real connection's rows stay listed and
    the agent answers."""
    server_addr = vmlab.guest(SERVER_VM).address
    stop = f"/tmp/vm-status-stop-{time.time_ns()}"
    cli_log = f"/tmp/vm-status-cli-{time.time_ns()}.log"
    srv_log = f"/tmp/vm-status-srv-{time.time_ns()}.log"
    port = PORT + 1
    vmlab.spawn(SERVER_VM, [*RUN, PEER, "echo-server", "0.0.0.0", str(port)], log=srv_log)
    _until(lambda: _lines(vmlab, SERVER_VM, srv_log), "the echo server")
    vmlab.spawn(
        CLIENT_VM, [*RUN, PEER, "hold-client", server_addr, str(port), "1000", stop], log=cli_log
    )
    try:
        _until(lambda: _lines(vmlab, CLIENT_VM, cli_log), "the client's echo")
        # Both ends listed with the echo counted (a process reports at most every 0.5 s:
        # the server's row may still say 0 bytes sent when it first shows).
        before = _until(lambda: _echoed(_ends(vmlab, port)), "both ends to report the echo")
        gateway = f"{vmlab.hosts()[0]['address']}:7071"
        r = vmlab.run(CLIENT_VM, [PY, "-c", BAD_REPORTER, gateway, server_addr], timeout=300)
        assert r.returncode == 0, r.stderr.decode()[-3000:]
        answers = json.loads(r.stdout.decode().splitlines()[-1])
        assert answers[0] == "census: connection 0: not an object", answers
        assert answers[1] == "census: 1001 connections in one report, more than 1000", answers
        assert answers[2] == (
            f"census: connection 0: local address {server_addr} is {SERVER_VM}'s, not this VM's"
        ), answers
        assert answers[3] == [CLIENT_VM, SERVER_VM]  # its gateway connection still serves
        after = _ends(vmlab, port)
        assert {g: e["bytes_sent"] for g, e in after.items()} == {
            g: e["bytes_sent"] for g, e in before.items()
        }
        doc = json.loads(_status(vmlab, "--json").stdout)
        assert not [p for p in doc["processes"] if p.get("comm") == "liar"]
        assert doc["vm_census_rejected"] == {CLIENT_VM: 3}
        assert "census reports refused by the VM gateway: h1g1 3" in _status(vmlab).stdout
    finally:
        vmlab.run(CLIENT_VM, ["touch", stop], timeout=60)
    _until(lambda: {"done": True} in _lines(vmlab, CLIENT_VM, cli_log), "the client's end")


def _cpu_ticks(lab: Any, guest: str, pid: int) -> int:
    """utime + stime of a process in a VM (clock ticks of the VM's kernel)."""
    stat = lab.run(guest, ["cat", f"/proc/{pid}/stat"], timeout=60, check=True).stdout.decode()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def _requests(lab: Any) -> dict[str, dict[str, int]]:
    return dict(json.loads(_status(lab, "--json").stdout)["vm_requests"])


def test_an_idle_vm_process_is_pushed_changes_instead_of_asking(vmlab: Any) -> None:
    """Two idle ``cosock run`` processes with a connection between the VMs: with the watch
    (default) they send the gateway no request at all in 30 s; with ``COSOCK_VM_WATCH=0``
    (asking, as before pushes) their residency watches and listener keeper ask for the guest
    list about once a second each. The CPU time both spent is printed (not asserted: TCG
    timings swing with the machine's load)."""
    server_addr = vmlab.guest(SERVER_VM).address
    results = {}
    for i, env in enumerate(({"COSOCK_VM_WATCH": "0"}, {})):
        port = PORT + 2 + i
        stop = f"/tmp/vm-status-stop-{time.time_ns()}"
        cli_log = f"/tmp/vm-status-cli-{time.time_ns()}.log"
        srv_log = f"/tmp/vm-status-srv-{time.time_ns()}.log"
        argv = [*RUN, PEER, "echo-server", "0.0.0.0", str(port)]
        vmlab.spawn(SERVER_VM, argv, env=env, log=srv_log)
        _until(lambda srv_log=srv_log: _lines(vmlab, SERVER_VM, srv_log), "the echo server")
        argv = [*RUN, PEER, "hold-client", server_addr, str(port), "1000", stop]
        vmlab.spawn(CLIENT_VM, argv, env=env, log=cli_log)
        try:
            _until(lambda cli_log=cli_log: _lines(vmlab, CLIENT_VM, cli_log), "the client")
            ends = _until(
                lambda port=port: len(_ends(vmlab, port)) == 2 and _ends(vmlab, port), "listed"
            )
            time.sleep(5)  # settled: the census sent, the watches open
            pids = {g: e["pid"] for g, e in ends.items()}
            cpu0 = {g: _cpu_ticks(vmlab, g, pid) for g, pid in pids.items()}
            asked0 = _requests(vmlab)
            time.sleep(30)
            asked1 = _requests(vmlab)
            cpu1 = {g: _cpu_ticks(vmlab, g, pid) for g, pid in pids.items()}
        finally:
            vmlab.run(CLIENT_VM, ["touch", stop], timeout=60)
        _until(lambda cli_log=cli_log: {"done": True} in _lines(vmlab, CLIENT_VM, cli_log), "end")
        grew = {
            g: {op: n - asked0.get(g, {}).get(op, 0) for op, n in ops.items()}
            for g, ops in asked1.items()
        }
        results["watch" if not env else "asking"] = {
            "requests in 30 s": {
                g: {op: n for op, n in ops.items() if n} for g, ops in grew.items()
            },
            "cpu ticks in 30 s": {g: cpu1[g] - cpu0[g] for g in cpu0},
        }
    print(json.dumps(results))
    asking, watch = results["asking"], results["watch"]
    for guest in (CLIENT_VM, SERVER_VM):
        assert asking["requests in 30 s"][guest].get("guests", 0) >= 10, results
        assert watch["requests in 30 s"].get(guest, {}) == {}, results
