"""The lab: hosts and guests made of network namespaces on one Linux machine.

A host is a namespace with a bridge and a cosock agent; a guest is a namespace whose ``eth0`` is
a port of its host's bridge. See ``_lab.py`` for the layout and DESIGN.md ("lab").
"""

from __future__ import annotations

from ._lab import ENV_GUEST, ENV_LAB, Lab, down, load_any
from ._model import (
    DEFAULT_NAME,
    MAX_GUESTS,
    MAX_HOSTS,
    AgentStartError,
    Guest,
    Host,
    InvalidLabSpec,
    LabError,
    LabExists,
    LabNotFound,
    MigrationError,
    NeedsRoot,
    NetemUnavailable,
    UnknownGuest,
    UnknownHost,
)

__all__ = [
    "DEFAULT_NAME",
    "ENV_GUEST",
    "ENV_LAB",
    "MAX_GUESTS",
    "MAX_HOSTS",
    "AgentStartError",
    "Guest",
    "Host",
    "InvalidLabSpec",
    "Lab",
    "LabError",
    "LabExists",
    "LabNotFound",
    "MigrationError",
    "NeedsRoot",
    "NetemUnavailable",
    "UnknownGuest",
    "UnknownHost",
    "down",
    "load_any",
]
