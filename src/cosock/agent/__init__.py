"""Host agent (the Dom0/XenStore role) and its client library.

``client`` is what every guest process loads; ``server`` (the daemon, and ``ensure_agent``)
is imported only when one of its names is used, keeping the intercepted start-up light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import (
    AgentClient,
    AgentRejected,
    GuestInfo,
    ListenerInfo,
    register_guest,
    status,
    unregister_guest,
)

if TYPE_CHECKING:
    from .server import AgentAlreadyRunning, AgentServer, agent_answers, ensure_agent, serve

__all__ = [
    "AgentAlreadyRunning",
    "AgentClient",
    "AgentRejected",
    "AgentServer",
    "GuestInfo",
    "ListenerInfo",
    "agent_answers",
    "ensure_agent",
    "register_guest",
    "serve",
    "status",
    "unregister_guest",
]

_SERVER_NAMES = frozenset(
    {"AgentAlreadyRunning", "AgentServer", "agent_answers", "ensure_agent", "serve"}
)


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
