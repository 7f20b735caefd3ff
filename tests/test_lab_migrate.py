"""Live migration in the lab: ``Lab.migrate`` and ``cosock [lab] migrate``.

Checked from outside the code under test: links through pyroute2 inside each namespace,
traffic through the wire veth's byte counters, connections with real processes streaming
through plain sockets, agents through their status, and what ``AgentClient`` says from
long-running processes inside the guests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute, netns

from conftest import requires_root
from cosock.agent.client import status
from cosock.lab import (
    Lab,
    MigrationError,
    NetemUnavailable,
    UnknownGuest,
    UnknownHost,
    _netns,
    _state,
)
from labpeers import Peer, stream_phase

PEERS = str(Path(__file__).with_name("migrate_peers.py"))
ROOT = str(Path(__file__).resolve().parents[1] / "src")

pytestmark = [requires_root, pytest.mark.timeout(180)]


#### Helpers


def links(ns: str) -> dict[str, Any]:
    with IPRoute(netns=ns, flags=0) as ipr:
        return {link.get("ifname"): link for link in ipr.get_links()}


def wire_bytes(lab: Lab) -> int:
    """Bytes that went through the inter-host wires (each counted once, at the hub's end)."""
    total = 0
    hub = lab.hosts[0].netns
    for ns, ifname in lab.wire_ends():
        if ns == hub:
            stats = links(ns)[ifname].get("IFLA_STATS64")
            total += stats["rx_bytes"] + stats["tx_bytes"]
    return total


def agent_guests(lab: Lab, host: str) -> dict[str, str]:
    """Guest -> host as the agent of ``host`` reports them."""
    return {g["name"]: g["host"] for g in status(lab.host(host).agent_socket)["guests"]}


def agent_listeners(lab: Lab, host: str) -> set[tuple[str, int]]:
    return {(x["guest"], x["port"]) for x in status(lab.host(host).agent_socket)["listeners"]}


def port_is_on(lab: Lab, guest: str, host: str) -> bool:
    port = f"v{guest}"
    here = links(lab.host(host).netns)
    return port in here and here[port].get("master") == here["br0"]["index"]


ECHO = r"""
import socket, sys
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    conn, (peer, _) = srv.accept()
    with conn:
        conn.sendall(peer.encode() + b" " + conn.recv(100))
"""

ASK = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as c:
    c.sendall(b"hi")
    print(c.recv(100).decode())
"""


@contextlib.contextmanager
def echo_server(lab: Lab, guest: str, port: int) -> Iterator[None]:
    proc = lab.popen(guest, [sys.executable, "-c", ECHO, str(port)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        yield
    finally:
        proc.kill()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


def echo(lab: Lab, client: str, server: str, port: int) -> str:
    ip = lab.guest(server).address
    out = lab.run(
        client, [sys.executable, "-c", ASK, ip, str(port)], capture_output=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return str(out.stdout.decode().strip())


def lab_namespaces(name: str) -> list[str]:
    return sorted(ns for ns in netns.listnetns() if ns.startswith(f"cs-{name}-"))


#### Moving and coming back


def test_migrate_and_back(lab: Lab) -> None:
    env_before = lab.env("h1g1")["COSOCK_AGENT"]
    with echo_server(lab, "h1g1", 7100):
        moved = lab.migrate("h1g1", "h2")
        assert moved.host == "h2" and moved.address == "10.77.1.11"
        assert lab.guest("h1g1").host == "h2"
        assert Lab.load(lab.name).guest("h1g1").host == "h2"
        assert Lab.load(lab.name).link_of("h1g1") == {
            "netns": lab.host("h2").netns,
            "ifname": "vh1g1",
        }
        assert port_is_on(lab, "h1g1", "h2") and "vh1g1" not in links(lab.host("h1").netns)
        # Processes keep one agent path, which now leads to h2's agent.
        assert lab.env("h1g1")["COSOCK_AGENT"] == env_before
        assert os.path.samefile(env_before, lab.host("h2").agent_socket)
        assert agent_guests(lab, "h2")["h1g1"] == "h2"
        assert "h1g1" not in agent_guests(lab, "h1")
        # Reachable from its old neighbour (across the wire) and its new one.
        assert echo(lab, "h1g2", "h1g1", 7100) == "10.77.1.12 hi"
        assert echo(lab, "h2g2", "h1g1", 7100) == "10.77.2.12 hi"

        back = lab.migrate("h1g1", "h1")
        assert back.host == "h1" and Lab.load(lab.name).guest("h1g1").host == "h1"
        assert port_is_on(lab, "h1g1", "h1") and "vh1g1" not in links(lab.host("h2").netns)
        assert os.path.samefile(env_before, lab.host("h1").agent_socket)
        assert agent_guests(lab, "h1")["h1g1"] == "h1"
        assert "h1g1" not in agent_guests(lab, "h2")
        assert echo(lab, "h1g2", "h1g1", 7100) == "10.77.1.12 hi"
        assert echo(lab, "h2g1", "h1g1", 7100) == "10.77.2.11 hi"


def test_tcp_stream_survives_two_migrations_and_crosses_the_wire(
    lab: Lab, peers: Callable[..., Peer]
) -> None:
    """h1g1 streams both ways with its neighbour h1g2 while it moves to h2 and back."""
    server = peers(lab, "h1g2", "stream-server", "7200")
    assert server.read() == {"listening": 7200}
    client = peers(lab, "h1g1", "stream-client", lab.guest("h1g2").address, "7200")
    assert client.read() == {"connected": True}

    def phase() -> tuple[int, int]:
        """Stream a while; (bytes the two ends received meanwhile, bytes on the wires)."""
        wire0 = wire_bytes(lab)
        return stream_phase(client, server), wire_bytes(lab) - wire0

    assert abs(lab.wire_bytes() - wire_bytes(lab)) < 1 << 20  # the lab's view agrees
    got, wire = phase()  # neighbours: nothing of it on the wire
    assert got >= 2 << 20 and wire < got // 10, (got, wire)
    lab.migrate("h1g1", "h2")
    got, wire = phase()  # now every byte of the stream crosses the wire
    assert got >= 2 << 20 and wire >= got, (got, wire)
    lab.migrate("h1g1", "h1")
    got, wire = phase()
    assert got >= 2 << 20 and wire < got // 10, (got, wire)

    client.send(op="stop")  # both at once: each end finishes when the other's EOF arrives
    server.send(op="stop")
    c_end, s_end = client.read(timeout=90), server.read(timeout=90)
    for end in (c_end, s_end):
        assert end["error"] is None and not end["hung"], end
    assert c_end["sent"] == s_end["received"] and c_end["sent_sha"] == s_end["received_sha"]
    assert s_end["sent"] == c_end["received"] and s_end["sent_sha"] == c_end["received_sha"]
    assert c_end["sent"] > 3 << 20 and s_end["sent"] > 3 << 20


#### What processes inside the guests learn


def test_agent_client_follows_its_guest(lab: Lab, peers: Callable[..., Peer]) -> None:
    """Facts seen after ONE poll by processes started before the migration."""
    ip = {g.name: g.address for g in lab.guests}
    mover = peers(lab, "h1g1", "probe")  # will migrate to h2
    old = peers(lab, "h1g2", "probe")  # stays on h1
    new = peers(lab, "h2g1", "probe")  # h1g1's neighbour-to-be
    assert mover.ask(op="listen", port=9001) == {"listening": 9001}
    assert new.ask(op="listen", port=9002) == {"listening": 9002}
    query = {"owning": [ip["h1g2"], ip["h2g1"]], "lookup": [[ip["h2g1"], 9002]]}

    before = mover.ask(op="facts", **query)
    assert before["self"] == {"name": "h1g1", "host": "h1"}
    assert before["owning"] == {ip["h1g2"]: "h1g2", ip["h2g1"]: None}
    assert before["lookup"] == [[None, "not-coresident"]]
    assert old.ask(op="facts", owning=[ip["h1g1"]])["owning"] == {ip["h1g1"]: "h1g1"}

    lab.migrate("h1g1", "h2")
    after = mover.ask(op="facts", **query)
    assert after["self"] == {"name": "h1g1", "host": "h2"}, after
    assert after["owning"] == {ip["h1g2"]: None, ip["h2g1"]: "h2g1"}
    assert after["lookup"] == [["h2g1", ""]]
    assert after["relisten_error"] is None and after["version"] > before["version"]
    assert old.ask(op="facts", owning=[ip["h1g1"]])["owning"] == {ip["h1g1"]: None}
    # The listener h1g1 had before is now registered with h2's agent, under h1g1.
    h2_listeners = {
        (x["guest"], x["port"]) for x in status(lab.host("h2").agent_socket)["listeners"]
    }
    assert ("h1g1", 9001) in h2_listeners
    h1_listeners = {
        (x["guest"], x["port"]) for x in status(lab.host("h1").agent_socket)["listeners"]
    }
    assert ("h1g1", 9001) not in h1_listeners
    seen = new.ask(op="facts", owning=[ip["h1g1"]], lookup=[[ip["h1g1"], 9001]])
    assert seen["owning"] == {ip["h1g1"]: "h1g1"} and seen["lookup"] == [["h1g1", ""]]

    # Two migrations in a row, no poll in between: the process ends up where the guest is.
    lab.migrate("h1g1", "h1")
    lab.migrate("h1g1", "h2")
    lab.migrate("h1g1", "h1")
    deadline = time.monotonic() + 5  # a reconnect is at most 10 ms after the previous one
    while (again := mover.ask(op="facts", **query))["self"] is None:
        assert time.monotonic() < deadline, again
        time.sleep(0.02)
    assert again["self"] == {"name": "h1g1", "host": "h1"}
    assert again["owning"] == {ip["h1g2"]: "h1g2", ip["h2g1"]: None}
    assert again["lookup"] == [[None, "not-coresident"]]
    assert old.ask(op="facts", owning=[ip["h1g1"]])["owning"] == {ip["h1g1"]: "h1g1"}
    h1_listeners = {
        (x["guest"], x["port"]) for x in status(lab.host("h1").agent_socket)["listeners"]
    }
    assert ("h1g1", 9001) in h1_listeners


def test_sleepers_wake_on_a_migration(lab: Lab, peers: Callable[..., Peer]) -> None:
    """wait_fileno() becomes readable and version moves, on both sides of a migration."""
    mover, old = peers(lab, "h1g1", "probe"), peers(lab, "h1g2", "probe")
    for p in (mover, old):
        p.send(op="wait", timeout=60)
        assert p.read()["waiting"] is True
    lab.migrate("h1g1", "h2")
    for p in (mover, old):
        woke = p.read(timeout=30)
        assert woke["readable"] is True, woke
        assert woke["seen"] > woke["before"] and woke["after"] > woke["before"], woke
    assert mover.ask(op="facts")["self"] == {"name": "h1g1", "host": "h2"}
    # The same fd keeps working after the reconnect: the next migration wakes it again.
    mover.send(op="wait", timeout=60)
    assert mover.read()["waiting"] is True
    lab.migrate("h1g1", "h1")
    assert mover.read(timeout=30)["readable"] is True
    assert mover.ask(op="facts")["self"] == {"name": "h1g1", "host": "h1"}


def test_migrating_away_from_a_dead_agent(lab: Lab, peers: Callable[..., Peer]) -> None:
    """The old host's agent is gone: the migration still completes, and the guest's process
    finds the new agent once its back-off (1 s after the failed reconnect) has passed."""
    mover = peers(lab, "h1g1", "probe")
    assert mover.ask(op="listen", port=9003) == {"listening": 9003}
    os.kill(lab.host("h1").agent_pid, signal.SIGKILL)
    assert lab.migrate("h1g1", "h2").host == "h2"
    assert agent_guests(lab, "h2")["h1g1"] == "h2"
    deadline = time.monotonic() + 10
    while (facts := mover.ask(op="facts"))["self"] is None:
        assert time.monotonic() < deadline, facts
        time.sleep(0.1)
    assert facts["self"] == {"name": "h1g1", "host": "h2"}
    assert ("h1g1", 9003) in agent_listeners(lab, "h2")


#### Errors, delay, teardown


def test_migration_errors_change_nothing(lab: Lab) -> None:
    link = lab.link_of("h1g1")
    with pytest.raises(MigrationError, match="already lives on host 'h1'"):
        lab.migrate("h1g1", "h1")
    with pytest.raises(UnknownGuest, match="no guest 'h9g9'"):
        lab.migrate("h9g9", "h2")
    with pytest.raises(UnknownHost, match="no host 'h7'"):
        lab.migrate("h1g1", "h7")
    with pytest.raises(MigrationError, match="must be >= 0"):
        lab.migrate("h1g1", "h2", delay_ms=-1)
    assert Lab.load(lab.name).link_of("h1g1") == link
    assert port_is_on(lab, "h1g1", "h1")


def test_wire_delay(lab: Lab) -> None:
    """With tc netem, the wires get the delay; without, a clear error and nothing moves."""
    try:
        lab.migrate("h1g1", "h2", delay_ms=3)
    except NetemUnavailable as exc:
        assert "netem" in str(exc)
        assert Lab.load(lab.name).guest("h1g1").host == "h1" and port_is_on(lab, "h1g1", "h1")
        pytest.skip(f"no tc netem in this kernel: {exc}")
    assert Lab.load(lab.name).guest("h1g1").host == "h2"
    for ns, ifname in lab.wire_ends():
        with IPRoute(netns=ns, flags=0) as ipr:
            index = ipr.link_lookup(ifname=ifname)[0]
            kinds = [q.get("TCA_KIND") for q in ipr.get_qdiscs(index)]
        assert "netem" in kinds, (ns, ifname, kinds)
    lab.set_wire_delay(0)


def test_down_after_migrations_leaves_nothing(lab_factory: Callable[..., Lab]) -> None:
    """Three hosts (a star around h1): moves through the hub keep guests reachable."""
    lab = lab_factory(3, 1)
    name = lab.name
    with echo_server(lab, "h2g1", 7300):
        lab.migrate("h2g1", "h3")  # leaf to leaf, through the hub
        assert echo(lab, "h1g1", "h2g1", 7300) == "10.77.1.11 hi"
        lab.migrate("h1g1", "h2")
        assert echo(lab, "h1g1", "h2g1", 7300) == "10.77.1.11 hi"
        lab.migrate("h2g1", "h1")
        assert echo(lab, "h3g1", "h2g1", 7300) == "10.77.3.11 hi"
        assert echo(lab, "h1g1", "h2g1", 7300) == "10.77.1.11 hi"
    lab.down()
    assert lab_namespaces(name) == []
    assert not _state.state_path(name).exists() and not _state.lab_dir(name).exists()
    assert name not in _netns._lab_netlinks  # no netlink socket keeps a namespace alive
    with IPRoute() as ipr:
        names = {link.get("ifname") for link in ipr.get_links()}
    assert not names & {"vh1g1", "vh2g1", "vh3g1", "wh1", "wh2", "wh3"}


#### CLI


def _cosock(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cosock", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_migrate(lab: Lab) -> None:
    out = _cosock("migrate", "h2g2", "--to", "h1", "--lab", lab.name)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("guest h2g2 migrated from h2 to h1 in ")
    assert Lab.load(lab.name).guest("h2g2").host == "h1"
    out = _cosock("lab", "migrate", "h2g2", "--to", "h2", "--name", lab.name, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["guest"] == "h2g2" and data["from"] == "h1" and data["to"] == "h2"
    assert data["seconds"] > 0
    assert Lab.load(lab.name).guest("h2g2").host == "h2"
    assert agent_guests(lab, "h2")["h2g2"] == "h2"


CLI_ERRORS = [
    (["migrate", "h2g2", "--to", "h2"], "already lives on host 'h2'"),
    (["migrate", "h9g9", "--to", "h1"], "no guest 'h9g9'"),
    (["migrate", "h2g2", "--to", "h9"], "no host 'h9'"),
    (["migrate", "h2g2", "--to", "h1", "--delay-ms", "abc"], "invalid delay 'abc'"),
    (["lab", "migrate", "h2g2", "--to", "h9"], "no host 'h9'"),
]


def test_cli_migrate_errors_are_one_line(lab: Lab) -> None:
    for args, message in CLI_ERRORS:
        flag = "--lab" if args[0] == "migrate" else "--name"
        out = _cosock(*args, flag, lab.name)
        assert out.returncode == 1, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cosock"), out.stderr
        assert message in lines[0], out.stderr
    assert Lab.load(lab.name).guest("h2g2").host == "h2"
