"""Exceptions and fallback reasons shared by every layer.

Errors that reach applications are ``OSError`` subclasses with an errno, so code written
for plain sockets handles them unchanged (see STYLE.md, "typed errors").
"""

from __future__ import annotations

import enum


class CosockError(Exception):
    """Base of every cosock-specific error."""


class ProtocolError(CosockError):
    """A violation of the cosock control protocol (abstract: see Local/Remote)."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids in the current state."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids (garbage, wrong order, bad values)."""


class RingCorrupted(CosockError, ConnectionResetError):
    """A value the peer wrote into shared memory is out of range; the channel is unusable."""


class AgentUnavailable(CosockError, ConnectionError):
    """The host agent cannot be reached; connections fall back to plain TCP."""


class FallbackReason(enum.Enum):
    """Why a connection uses plain TCP instead of shared memory (like SMC's reason codes)."""

    # Members are singletons: identity hashing in C.  Enum.__hash__ is Python code, and
    # the transition tables hash states on every frame sent or parsed.
    __hash__ = object.__hash__

    #: Destination is not a cosock listener on a co-resident guest.
    NOT_CORESIDENT = "not-coresident"
    #: No agent socket, or the agent refused or dropped us.
    AGENT_UNREACHABLE = "agent-unreachable"
    #: Loopback acceleration switched off (COSOCK_LOOPBACK=0).
    LOOPBACK_DISABLED = "loopback-disabled"
    #: cosock is disabled for this socket (family/type not accelerated, or explicitly off).
    DISABLED = "disabled"
    #: The listener's rendezvous socket could not take the offer.
    OFFER_UNDELIVERED = "offer-undelivered"
    #: The server found no offer matching the accepted connection.
    NO_OFFER = "no-offer"
    #: The offer failed verification (nonce, credentials, fds, sizes).
    OFFER_INVALID = "offer-invalid"
    #: The peer rejected the channel in-band.
    PEER_REJECTED = "peer-rejected"
    #: Creating or mapping shared memory failed (fd limits, memory cap).
    RESOURCE = "resource"
    #: The in-band handshake did not complete (timeout, EOF, garbage).
    HANDSHAKE_FAILED = "handshake-failed"
    #: An accelerated connection was downgraded to plain TCP because its fd left cosock's
    #: control (``detach()``, handed to uvloop, passed to another process); either end.
    HANDED_OVER = "handed-over"
    #: In a VM: no shared-memory device to carve a channel from (no ivshmem pool).
    NO_SHM_DEVICE = "no-shm-device"
    #: Never a CoSocket: made by C code that bypasses Python sockets (uvloop, grpcio) or
    #: by a process not under ``cosock run``.  Only ``cosock status`` reports it (the
    #: agent reads the kernel's TCP table); no process ever sends it.
    NOT_INTERCEPTED = "not-intercepted"
