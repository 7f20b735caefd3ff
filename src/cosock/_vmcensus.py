"""Inside a QEMU guest: send this process's census to the host's VM gateway.

No agent runs in a VM and the host agent cannot read the VM's files, so the census thread
(``cosock._census``) also sends its document to the gateway over the process's existing
gateway connection (``agent/_vmcensus.py`` keeps it, marked with the VM the token names, and
the host's ``cosock status`` lists it). Sent only when the document changed or the gateway
connection is a new one (a reconnect, a migration's redirect), so at most once a second and
usually never while nothing moves; ``null`` when the thread retires. Bounded before sending:
at most ``MAX_CONNECTIONS`` rows (the rest counted in ``truncated``), errors cut short.
"""

from __future__ import annotations

import logging
from typing import Any

from . import _vmchannel
from ._errors import AgentUnavailable
from ._vmagent import SlotRefused, VmAgent
from .agent._vmcensus import MAX_COMM, MAX_CONNECTIONS, MAX_ERROR, MAX_LISTENERS

log = logging.getLogger("cosock.census")

#: What was last sent, on which gateway connection (not sent again while both are the same).
_last: tuple[VmAgent | None, str] | None = None


def report(doc: dict[str, Any], key: str) -> None:
    """Send ``doc`` (``_census.snapshot()``; ``key`` its canonical JSON) unless this
    gateway connection already has it. Never raises: the status must not break a process."""
    global _last
    directory = _vmchannel.directory()
    if directory is None:
        return
    if _last is not None and _last == (directory.connection, key):
        return
    try:
        directory._call("census", bounded(doc))
    except AgentUnavailable:
        return  # tried again next second (the gateway is retried once a second anyway)
    except SlotRefused as exc:  # not sent again until it changes: the answer would be the same
        log.warning("the VM gateway refused this process's census: %s", exc)
    _last = (directory.connection, key)


def clear() -> None:
    """Nothing left to list: drop this process's report at the gateway (if it has one)."""
    global _last
    directory = _vmchannel.directory()
    if _last is None or directory is None or directory.connection is None:
        _last = None
        return
    _last = None
    try:
        directory._call("census", None)
    except (AgentUnavailable, SlotRefused):
        pass  # dropped with the connection anyway


def bounded(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` within the gateway's limits: rows cut at the maximum and counted."""
    conns = doc["connections"]
    rows = [
        c if c["error"] is None or len(c["error"]) <= MAX_ERROR else {**c, "error": _cut(c)}
        for c in conns[:MAX_CONNECTIONS]
    ]
    return {
        "pid": doc["pid"],
        "comm": str(doc["comm"])[:MAX_COMM],
        "connections": rows,
        "listeners": doc["listeners"][:MAX_LISTENERS],
        "fallbacks": doc["fallbacks"],
        "truncated": max(0, len(conns) - MAX_CONNECTIONS),
    }


def _cut(row: dict[str, Any]) -> str:
    return str(row["error"])[: MAX_ERROR - 3] + "..."


def _after_fork_in_child() -> None:
    global _last
    _last = None


__all__ = ["bounded", "clear", "report"]
