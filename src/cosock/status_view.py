"""What ``cosock status`` shows: one agent's state plus the connections of its host's
processes, fetched in two requests and drawn as rich tables (like ``ss`` / ``smcss``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .agent.client import AgentRejected, connections, status


def gather(path: Path) -> dict[str, Any]:
    """The agent's status with ``processes`` (each with its connections) added.

    Raises:
        AgentUnavailable: no agent answers on ``path``.
    """
    from . import _vmchannel

    if _vmchannel.active():  # inside a lab VM: the gateway and this VM's census files
        return _vmchannel.status()
    state = status(path)
    try:
        reply = connections(path)
    except AgentRejected as exc:  # an agent from before the census: say so, show the rest
        state["processes"] = []
        state["processes_error"] = str(exc)
        return state
    state["processes"] = reply["processes"]
    # TCP connections no census lists (C code bypassing Python sockets, processes not
    # under ``cosock run``); absent from an agent older than this field.
    state["unmanaged"] = reply.get("unmanaged", [])
    state["unmanaged_truncated"] = reply.get("unmanaged_truncated", 0)
    return state


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


_PATH_STYLE = {"shm": "green", "tcp": "yellow", "switching": "magenta", "handshake": "cyan"}


def render(state: dict[str, Any], path: Path) -> RenderableType:
    """Tables for guests, listeners, connections and fallbacks of one ``gather`` result."""
    parts: list[RenderableType] = []
    guests = Table(title=f"agent {path} (host {state.get('host')}, pid {state.get('pid')})")
    for col in ("guest", "netns", "addresses"):
        guests.add_column(col)
    for g in state.get("guests", []):
        guests.add_row(g["name"], str(g["netns"]), ", ".join(g["addresses"]))
    for g in state.get("vm_guests", []):  # QEMU guests of this agent's VM gateway
        guests.add_row(g["name"], "vm (leaving)" if g["leaving"] else "vm", g["address"])
    parts.append(guests)
    listeners = Table(title="listeners")
    for col in ("guest", "address", "port", "pid"):
        listeners.add_column(col)
    for item in state.get("listeners", []):
        listeners.add_row(item["guest"], item["addr"], str(item["port"]), str(item["pid"]))
    for item in state.get("vm_listeners", []):  # a VM's pids are its own: not shown here
        listeners.add_row(item["guest"], item["addr"], str(item["port"]), "vm")
    parts.append(listeners)

    procs = state.get("processes", [])
    conns = Table(title="connections")
    numbers = ("sent", "received", "sw", "up")
    for col in ("pid", "guest", "local", "peer", "path", *numbers):
        conns.add_column(col, justify="right" if col in numbers else "left")
    conns.add_column("fallback / error")
    plain_listeners: list[tuple[Any, ...]] = []
    for proc in procs:
        who = f"{proc['pid']} {proc['comm']}".strip()
        for c in proc["connections"]:
            note = c["error"] or c["fallback_reason"] or ""
            conns.add_row(
                who,
                proc.get("guest") or "-",
                _endpoint(c["local_addr"], c["local_port"]),
                _endpoint(c["peer_addr"], c["peer_port"]),
                Text(c["path"], style=_PATH_STYLE.get(c["path"], "")),
                _bytes(c["bytes_sent"]),
                _bytes(c["bytes_received"]),
                str(c["switches"]),
                str(c["upgrades"]),
                note,
            )
        for x in proc["listeners"]:
            plain_listeners.append((who, x))
    for c in state.get("unmanaged", []):
        conns.add_row(
            f"{c['pid']} {c['comm'] or ''}".strip() if c["pid"] is not None else "?",
            c["guest"] or "-",
            _endpoint(c["local_addr"], c["local_port"]),
            _endpoint(c["peer_addr"], c["peer_port"]),
            Text(c["path"], style=_PATH_STYLE["tcp"]),
            "-",
            "-",
            "-",
            "-",
            c["fallback_reason"],
        )
    parts.append(conns)
    cut = sum(proc.get("truncated", 0) for proc in procs)
    if cut:
        parts.append(Text(f"{cut} more connections inside VMs not listed"))
    if state.get("unmanaged_truncated"):
        parts.append(Text(f"{state['unmanaged_truncated']} more plain TCP connections not listed"))
    if plain_listeners:
        table = Table(title="listeners on plain TCP")
        for col in ("pid", "address", "port", "fallback reason"):
            table.add_column(col)
        for who, x in plain_listeners:
            table.add_row(who, x["addr"], str(x["port"]), x["fallback_reason"] or "")
        parts.append(table)
    fallbacks: dict[str, int] = {}
    for proc in procs:
        for reason, n in proc["fallbacks"].items():
            fallbacks[reason] = fallbacks.get(reason, 0) + n
    if fallbacks:
        summary = ", ".join(f"{r} {n}" for r, n in sorted(fallbacks.items()))
        parts.append(Text(f"fallbacks since the processes started: {summary}"))
    rejected = state.get("vm_census_rejected") or {}
    if rejected:
        summary = ", ".join(f"{g} {n}" for g, n in sorted(rejected.items()))
        parts.append(Text(f"census reports refused by the VM gateway: {summary}", style="red"))
    if "processes_error" in state:
        parts.append(Text(f"connections unavailable: {state['processes_error']}", style="red"))
    return Group(*parts)
