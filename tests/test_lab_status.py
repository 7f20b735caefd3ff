"""``cosock status`` in a lab (root): connections between two guests, listed by each host's
agent under the right guest, and after a live migration on both hosts' agents."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cosock.agent.client import connections
from cosock.lab import Lab
from labpeers import Peer, stream_phase


def _by_guest(lab: Lab, host: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for proc in connections(lab.host(host).agent_socket)["processes"]:
        out.setdefault(proc["guest"], []).extend(proc["connections"])
    return out


def _until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_status_lists_guests_connections_and_follows_a_migration(
    lab: Lab, peers: Callable[..., Peer]
) -> None:
    server = peers(lab, "h1g2", "stream-server", "7400", "--cosock")
    assert server.read() == {"listening": 7400}
    client = peers(lab, "h1g1", "stream-client", lab.guest("h1g2").address, "7400", "--cosock")
    assert client.read() == {"connected": True}
    assert stream_phase(client, server) >= 1 << 20
    c_addr, s_addr = lab.guest("h1g1").address, lab.guest("h1g2").address

    def listed(host: str, guest: str, **want: Any) -> Any:
        rows = _by_guest(lab, host).get(guest, [])
        return [r for r in rows if all(r[k] == v for k, v in want.items())]

    def moved(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
        return [r for r in rows if r[key] > 0]

    # A process rewrites its census file at most once a second: a row may predate the
    # bytes of the stream phase for that long, so wait for rows that have seen them.
    (c_row,) = _until(
        lambda: moved(listed("h1", "h1g1", path="shm"), "bytes_sent"), "client on shm, sent"
    )
    (s_row,) = _until(
        lambda: moved(listed("h1", "h1g2", path="shm"), "bytes_received"), "server on shm, got"
    )
    assert (c_row["local_addr"], c_row["peer_addr"], c_row["peer_port"]) == (c_addr, s_addr, 7400)
    assert (s_row["local_addr"], s_row["local_port"]) == (s_addr, 7400)
    assert s_row["peer_port"] == c_row["local_port"]
    assert c_row["bytes_sent"] > 0 and s_row["bytes_received"] > 0

    lab.migrate("h1g1", "h2")
    # The moved guest's process now publishes to h2's agent; its peer stays on h1's.
    _until(lambda: listed("h2", "h1g1", path="tcp", switches=1), "client on h2, switched")
    _until(lambda: listed("h1", "h1g2", path="tcp", switches=1), "server switched")
    assert not _by_guest(lab, "h1").get("h1g1")
    stream_phase(client, server)
