"""cosock: TCP between co-resident guests through shared memory, transparently."""

from __future__ import annotations

from ._errors import (
    AgentUnavailable,
    CosockError,
    FallbackReason,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    RingCorrupted,
)

__all__ = [
    "AgentUnavailable",
    "CosockError",
    "FallbackReason",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "RingCorrupted",
]
__version__ = "0.1.0"
