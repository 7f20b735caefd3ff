"""cosock: TCP between co-resident guests through shared memory, transparently.

``cosock.enable()`` makes every new AF_INET/AF_INET6 stream socket of this process a
:class:`CoSocket`; ``cosock.disable()`` restores the originals exactly.
"""

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
from ._intercept import disable, enable, enabled, get_original
from ._socket import CoSocket, path_of

__all__ = [
    "AgentUnavailable",
    "CoSocket",
    "CosockError",
    "FallbackReason",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "RingCorrupted",
    "disable",
    "enable",
    "enabled",
    "get_original",
    "path_of",
]
__version__ = "0.1.0"
