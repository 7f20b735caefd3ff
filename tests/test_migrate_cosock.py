"""Live migration of cosock connections in the lab (root): the path switch end to end,
away (shm -> TCP) and back (TCP -> a fresh shared-memory channel).

Two co-resident guests stream both ways through shared memory; one guest migrates to
another host mid-stream. Both ends must leave the rings on their own (the agents publish
the residency change, each process's residency watch switches its connections), every
byte must arrive exactly once and in order, and garbage written over the old rings after
both ends left them must never be delivered.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import BACKENDS, backend_lab, requires_root, skip_on_qemu
from cosock.lab import Lab
from labpeers import Peer, in_flight, stream_phase

pytestmark = [requires_root, pytest.mark.timeout(240)]


@pytest.fixture(params=BACKENDS)
def lab(request: pytest.FixtureRequest) -> Lab:
    """2 hosts x 2 guests: network namespaces, or QEMU VMs (marked ``vm``; one shared lab,
    every guest moved back home before each test; waits scaled by ``lab.timeout_factor``)."""
    result: Lab = backend_lab(request)
    return result


def _until(
    lab: Lab, check: Callable[[], bool], what: str, timeout: float = 30.0, *ends: Peer
) -> None:
    timeout *= lab.timeout_factor
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            state = [end.ask(op="info") for end in ends]
            raise AssertionError(f"timed out waiting for {what}: {state}")
        time.sleep(0.05)


def _finish(client: Peer, server: Peer) -> tuple[dict[str, Any], dict[str, Any]]:
    client.send(op="stop")
    server.send(op="stop")
    c_end, s_end = client.read(timeout=90), server.read(timeout=90)
    for end in (c_end, s_end):
        assert end["error"] is None and not end["hung"], end
    assert c_end["sent"] == s_end["received"] and c_end["sent_sha"] == s_end["received_sha"]
    assert s_end["sent"] == c_end["received"] and s_end["sent_sha"] == c_end["received_sha"]
    return c_end, s_end


@pytest.mark.parametrize("mover", ["h1g1", "h1g2"])
def test_cosock_stream_survives_migration_byte_exact(
    lab: Lab, peers: Callable[..., Peer], mover: str
) -> None:
    server = peers(lab, "h1g2", "stream-server", "7300", "--cosock")
    assert server.read() == {"listening": 7300}
    client = peers(lab, "h1g1", "stream-client", lab.guest("h1g2").address, "7300", "--cosock")
    assert client.read() == {"connected": True}

    got = stream_phase(client, server)
    assert got >= 2 << 20
    infos = client.ask(op="info"), server.ask(op="info")
    assert infos[0]["path"] == infos[1]["path"] == "shm", infos

    lab.migrate(mover, "h2")
    # Each end learns from its own agent and leaves the rings by itself.
    _until(
        lab,
        lambda: client.ask(op="info")["path"] == server.ask(op="info")["path"] == "tcp",
        "both ends to switch to TCP",
    )
    # Both ends have left the rings: from now on the shared memory must never be read.
    assert client.ask(op="scribble")["scribbled"] > 0
    wire0 = lab.wire_bytes()
    # The stream really crosses the wire now (on shm it adds almost nothing: below): every
    # byte the phase reads except those already in flight when the count began, which may
    # have crossed before it (under TCG a slow reader's kernel buffers held ~2 of 4 MB; some
    # even crossed inside h1: the lab switches to TCP before it migrates). In flight is read
    # after wire0 and before the phase starts, so it bounds them from above.
    before = in_flight(client, server)
    got = stream_phase(client, server, want=before + (2 << 20))
    assert got >= 2 << 20
    assert lab.wire_bytes() - wire0 >= got - before, (got, before)
    c_info, s_info = client.ask(op="info"), server.ask(op="info")
    assert c_info["switches"] == s_info["switches"] == 1

    lab.migrate(mover, "h1")  # back next to its peer: upgraded to a fresh channel
    _until(
        lab,
        lambda: client.ask(op="info")["path"] == server.ask(op="info")["path"] == "shm",
        "both ends to return to shared memory",
        30.0,
        client,
        server,
    )
    wire0 = lab.wire_bytes()
    got = stream_phase(client, server)
    assert lab.wire_bytes() - wire0 < got // 10  # off the wire again
    c_info, s_info = client.ask(op="info"), server.ask(op="info")
    assert c_info["upgrades"] == s_info["upgrades"] == 1
    c_end, s_end = _finish(client, server)
    assert c_end["sent"] > 4 << 20 and s_end["sent"] > 4 << 20


def test_idle_connection_switches_without_the_application(
    lab: Lab, peers: Callable[..., Peer]
) -> None:
    """Neither application touches its socket during the migration, and bytes sit
    unread in both rings: the residency watch threads switch, exchange the consumed
    offsets and hand the resend to the kernel on their own."""
    server = peers(lab, "h1g2", "idle-server", "7301", "--cosock")
    assert server.read() == {"listening": 7301}
    client = peers(lab, "h1g1", "idle-client", lab.guest("h1g2").address, "7301", "--cosock")
    assert client.read() == {"connected": True}
    c_sent = client.ask(op="send", n=300_000, seed=1)
    s_sent = server.ask(op="send", n=200_000, seed=2)
    # The idle client reads the server's ACCEPT only through its residency watch (its
    # application sends into the ring before the verdict): under load that takes a moment.
    _until(lab, lambda: client.ask(op="info")["path"] == "shm", "the verdict", 30, client, server)
    lab.migrate("h1g1", "h2")
    _until(
        lab,
        lambda: client.ask(op="info")["path"] == server.ask(op="info")["path"] == "tcp",
        "both ends to switch to TCP",
    )
    assert client.ask(op="scribble")["scribbled"] > 0
    assert server.ask(op="read", n=300_000) == {"read": 300_000, "sha": c_sent["sha"]}
    assert client.ask(op="read", n=200_000) == {"read": 200_000, "sha": s_sent["sha"]}


def test_idle_connection_returns_to_shm_without_the_application(
    lab: Lab, peers: Callable[..., Peer]
) -> None:
    """Away and back while neither application touches its socket (nothing queued either
    way): the residency watches alone complete the upgrade -- the server's answers the
    UPGRADE, the client's acts on the ACCEPT.  They used to leave it pending for good."""
    server = peers(lab, "h1g2", "idle-server", "7302", "--cosock")
    assert server.read() == {"listening": 7302}
    client = peers(lab, "h1g1", "idle-client", lab.guest("h1g2").address, "7302", "--cosock")
    assert client.read() == {"connected": True}
    _until(lab, lambda: client.ask(op="info")["path"] == "shm", "the verdict", 30, client, server)
    lab.migrate("h1g1", "h2")
    _until(
        lab,
        lambda: _paths(client, server) == ("tcp", "tcp"),
        "both ends to switch to TCP",
        30.0,
        client,
        server,
    )
    lab.migrate("h1g1", "h1")
    _until(
        lab,
        lambda: _paths(client, server) == ("shm", "shm"),
        "both ends to return to shared memory",
        30.0,
        client,
        server,
    )
    c_sent = client.ask(op="send", n=300_000, seed=5)
    s_sent = server.ask(op="send", n=200_000, seed=6)
    assert server.ask(op="read", n=300_000) == {"read": 300_000, "sha": c_sent["sha"]}
    assert client.ask(op="read", n=200_000) == {"read": 200_000, "sha": s_sent["sha"]}
    for end in (client, server):
        info = end.ask(op="info")
        assert (info["path"], info["switches"], info["upgrades"]) == ("shm", 1, 1), info


#### Many migrations, and faults during a switch


def _pair(
    lab: Lab, peers: Callable[..., Peer], port: int, role: str = "stream"
) -> tuple[Peer, Peer]:
    server = peers(lab, "h1g2", f"{role}-server", str(port), "--cosock")
    assert server.read() == {"listening": port}
    client = peers(lab, "h1g1", f"{role}-client", lab.guest("h1g2").address, str(port), "--cosock")
    assert client.read() == {"connected": True}
    return client, server


def _paths(client: Peer, server: Peer) -> tuple[str, str]:
    return client.ask(op="info")["path"], server.ask(op="info")["path"]


def test_twenty_migrations_back_and_forth_byte_exact(lab: Lab, peers: Callable[..., Peer]) -> None:
    client, server = _pair(lab, peers, 7310)
    stream_phase(client, server, want=1 << 20)
    for i in range(20):
        away = i % 2 == 0
        lab.migrate("h1g1", "h2" if away else "h1")
        want = "tcp" if away else "shm"
        _until(
            lab,
            lambda w=want: _paths(client, server) == (w, w),
            f"paths {want} after #{i + 1}",
            30.0,
            client,
            server,
        )
        assert stream_phase(client, server, want=256 << 10) >= 256 << 10
    c_end, s_end = _finish(client, server)
    assert c_end["sent"] > 5 << 20 and s_end["sent"] > 5 << 20


def test_two_migrations_in_quick_succession(lab: Lab, peers: Callable[..., Peer]) -> None:
    """Away and straight back, twice, without waiting for any switch to finish."""
    client, server = _pair(lab, peers, 7311)
    stream_phase(client, server, want=1 << 20)
    for _ in range(2):
        lab.migrate("h1g1", "h2")
        lab.migrate("h1g1", "h1")
    stream_phase(client, server, want=1 << 20)
    _finish(client, server)


def test_both_guests_move_and_meet_again_on_the_new_host(
    lab: Lab, peers: Callable[..., Peer]
) -> None:
    """The peer migrates at (nearly) the same moment: first apart, then together on h2."""
    client, server = _pair(lab, peers, 7312)
    stream_phase(client, server, want=1 << 20)
    lab.migrate("h1g1", "h2")
    lab.migrate("h1g2", "h2")
    _until(
        lab,
        lambda: _paths(client, server) == ("shm", "shm"),
        "the pair to share memory on h2",
        30.0,
        client,
        server,
    )
    stream_phase(client, server, want=1 << 20)
    _finish(client, server)


def test_half_close_in_flight_during_migration(lab: Lab, peers: Callable[..., Peer]) -> None:
    """All of the client's bytes and its FIN sit in the ring, unread, when it migrates."""
    client, server = _pair(lab, peers, 7313, role="idle")
    sent = client.ask(op="send", n=700_000, seed=3)
    assert client.ask(op="shutdown") == {"shutdown": True}
    lab.migrate("h1g1", "h2")
    assert server.ask(op="readall", timeout=60) == {"read": 700_000, "sha": sent["sha"]}
    reply = server.ask(op="send", n=50_000, seed=4)
    assert client.ask(op="read", n=50_000) == {"read": 50_000, "sha": reply["sha"]}


def test_migration_with_the_old_agent_dead(lab: Lab, peers: Callable[..., Peer]) -> None:
    """h1's agent is gone: only the mover learns of the move (from its new agent); its
    SWITCH alone must take the peer along."""
    skip_on_qemu(
        lab,
        "h1's agent is also its VM gateway, which hands out and takes back the pool slots; a"
        " QEMU migration first waits until that gateway says the guest holds no slot (only"
        " then may the pool be unplugged, else QEMU copies it over h2's), so with it dead the"
        " lab refuses the migration (MigrationError) by design",
    )
    client, server = _pair(lab, peers, 7314)
    stream_phase(client, server, want=1 << 20)
    os.kill(lab.host("h1").agent_pid, signal.SIGKILL)
    lab.migrate("h1g1", "h2")
    _until(
        lab,
        lambda: _paths(client, server) == ("tcp", "tcp"),
        "both ends on TCP",
        40.0,
        client,
        server,
    )
    stream_phase(client, server, want=1 << 20)
    _finish(client, server)


def test_asyncio_echo_and_numbered_requests_while_the_client_migrates(
    lab: Lab, peers: Callable[..., Peer]
) -> None:
    """An unmodified asyncio echo server under constant request/response load; every
    answer must be the numbered request just sent, across four migrations."""
    server = peers(lab, "h1g2", "asyncio-echo-server", "7315", "--cosock")
    assert server.read() == {"listening": 7315}
    client = peers(lab, "h1g1", "rr-client", lab.guest("h1g2").address, "7315", "--cosock")
    assert client.read() == {"connected": True}

    def advance(by: int) -> None:
        start = client.ask(op="progress")["done"]
        _until(
            lab,
            lambda: client.ask(op="progress")["done"] >= start + by,
            f"{by} more answers",
            30.0,
            client,
        )

    advance(200)
    assert client.ask(op="info")["path"] == "shm"
    for i in range(4):
        away = i % 2 == 0
        lab.migrate("h1g1", "h2" if away else "h1")
        want = "tcp" if away else "shm"
        _until(lab, lambda w=want: client.ask(op="info")["path"] == w, f"client on {want}")
        advance(200)
    end = client.ask(op="stop", timeout=90)
    assert end["error"] is None and not end["hung"] and end["bad"] == 0, end
    assert end["done"] >= 1000


def test_repeated_agent_news_changes_nothing_more(lab: Lab, peers: Callable[..., Peer]) -> None:
    """Agent pushes that repeat what is known (a listener appearing elsewhere, a guest
    re-registered) neither switch again nor upgrade a pair that is apart."""
    skip_on_qemu(
        lab,
        "the probe makes the agent push news by publishing listeners with AgentClient (the"
        " host agent's Unix socket); a VM has no such agent (its library publishes listeners"
        " through the VM gateway and polls it for news, docs/vm-backend.md)",
    )
    client, server = _pair(lab, peers, 7316)
    stream_phase(client, server, want=1 << 20)
    lab.migrate("h1g1", "h2")
    _until(lab, lambda: _paths(client, server) == ("tcp", "tcp"), "both ends on TCP")
    other = peers(lab, "h2g1", "probe")
    for port in (9101, 9102, 9103):  # three more pushes from h2's agent, to the mover too
        assert other.ask(op="listen", port=port) == {"listening": port}
    time.sleep(1.0 * lab.timeout_factor)  # several residency re-judgements
    stream_phase(client, server, want=1 << 20)
    for end in (client, server):
        info = end.ask(op="info")
        assert (info["path"], info["switches"], info["upgrades"]) == ("tcp", 1, 0), info
    _finish(client, server)
