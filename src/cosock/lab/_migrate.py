"""Live migration of a lab guest: what a migrated VM's peers see, done with namespaces.

A guest's processes, sockets and addresses never move; only the wire behind its ``eth0``
is re-plugged from the old host's bridge into the new host's bridge, so its traffic with
guests on the old host now crosses the inter-host wire. Then the agents learn it, in an
order chosen so that no process is ever left without a home:

1. the port moves (and the bridges forget where the guest's MAC was);
2. the state file records the new host; the guest's agent path is re-pointed there;
3. the new agent registers the guest (its subscribers see it arrive);
4. the old agent unregisters it and hangs up on the guest's processes, which reconnect
   through the re-pointed path to the new agent and re-register their listeners.

An old agent that is dead at step 4 is no failure: its connections are gone already.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from .._errors import AgentUnavailable
from . import _netns, _state
from ._model import (
    BRIDGE,
    GUEST_IFNAME,
    MigrationError,
    UnknownGuest,
    UnknownHost,
    netns_name,
)

#: How long the moved port may take to pass packets (see _netns.wait_operational).
LINK_TIMEOUT = 5.0


def _find(records: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in records if r.get("name") == name), None)


def check(state: _state.State, guest: str, to_host: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The guest's and the target host's records, or a one-line error.

    Raises:
        UnknownGuest, UnknownHost, MigrationError (already there).
    """
    lab = state.get("name", "?")
    g = _find(state.get("guests", []), guest)
    if g is None:
        known = ", ".join(r["name"] for r in state.get("guests", []))
        raise UnknownGuest(f"lab {lab!r} has no guest {guest!r} (guests: {known})")
    h = _find(state.get("hosts", []), to_host)
    if h is None:
        known = ", ".join(r["name"] for r in state.get("hosts", []))
        raise UnknownHost(f"lab {lab!r} has no host {to_host!r} (hosts: {known})")
    if g["host"] == h["name"]:
        raise MigrationError(f"guest {guest!r} already lives on host {to_host!r}")
    return g, h


def wire_ends(state: _state.State) -> list[tuple[str, str]]:
    """(namespace, ifname) of both ends of every inter-host wire."""
    lab = state["name"]
    ends = []
    for w in state.get("wires", []):
        ends.append((netns_name(lab, w["a"]), w["a_ifname"]))
        ends.append((netns_name(lab, w["b"]), w["b_ifname"]))
    return ends


def set_wire_delay(state: _state.State, delay_ms: float) -> None:
    """Delay every packet on every inter-host wire by ``delay_ms`` each way (0: no delay).

    Raises:
        NetemUnavailable: no tc netem in this kernel (nothing was changed).
    """
    if delay_ms < 0:
        raise MigrationError(f"invalid delay {delay_ms!r} ms: must be >= 0")
    nl = _netns.lab_netlinks(state["name"])
    for ns, ifname in wire_ends(state):
        _netns.set_delay(nl, ns, ifname, delay_ms)
    state["wire_delay_ms"] = delay_ms


def replug(state: _state.State, g: dict[str, Any], h: dict[str, Any]) -> None:
    """Steps 1 and 2: move the port, wait until it passes packets, record it."""
    lab = state["name"]
    link = g["link"]
    old_ns, new_ns = link["netns"], h["netns"]
    nl = _netns.lab_netlinks(lab)
    mac = g.get("mac") or _netns.mac_of(nl, g["netns"], GUEST_IFNAME)
    _netns.move_port(nl, link["ifname"], old_ns, new_ns)
    for host in state["hosts"]:
        if host["netns"] != old_ns:  # there the port took its entries with it
            _netns.forget_mac(nl, host["netns"], mac)
    deadline = time.monotonic() + LINK_TIMEOUT
    _netns.wait_operational(nl, new_ns, [BRIDGE, link["ifname"]], deadline)
    # The guest's eth0 lost its carrier while its peer moved: it drops packets until up.
    _netns.wait_operational(nl, g["netns"], [GUEST_IFNAME], deadline)
    g["host"] = h["name"]
    link["netns"] = new_ns
    _state.point_guest(lab, g["name"], h["name"])
    g["agent_link"] = str(_state.guest_agent_socket(lab, g["name"]))


def hand_over(state: _state.State, g: dict[str, Any], old: dict[str, Any]) -> None:
    """Steps 3 and 4: the new agent takes the guest, the old one lets it go.

    Raises:
        AgentUnavailable / AgentRejected: the *new* agent cannot register the guest.
    """
    from ..agent import client  # the agent layer is below us, loaded only when needed

    new = _find(state["hosts"], g["host"])
    assert new is not None
    inode = _netns.netns_key(g["netns"])
    if inode is None:
        raise MigrationError(f"namespace {g['netns']} of guest {g['name']!r} is gone")
    client.register_guest(
        _state.agent_socket_path(state["name"], new["name"]),
        g["name"],
        inode[1],
        list(g["addresses"]),
        new["name"],
    )
    with contextlib.suppress(AgentUnavailable):  # a dead old agent has let go already
        client.unregister_guest(
            _state.agent_socket_path(state["name"], old["name"]), g["name"], disconnect=True
        )
