"""Events of the cosock control protocol (layer 3) and the REJECT reason codes.

An event is what travels on a cosock connection's TCP stream, seen as a value: the
socket layer hands events to ``Connection.send()`` and gets events back from
``Connection.next_event()`` (see ``_protocol.py``). Events are frozen, slotted and
validated on construction, so a malformed one can never reach the wire; a bad value
raises ``LocalProtocolError`` (as h11's events do).

Contents:

* ``Hello``, ``Accept``, ``Reject`` — the in-band handshake.
* ``Bell``, ``Space`` — wake-ups for a reader / a writer blocked on a full ring.
* ``Fin`` — "my stream to you ends at byte offset N".
* ``Reset`` — "I closed with bytes of yours unread": TCP's RST, in-band.
* ``PlainData``, ``Eof`` — receive-only: application bytes after a fallback, TCP EOF.
* ``Switch``, ``Data`` — the path switch shm → TCP at an exact offset, and the framed
  data that follows it on TCP (framed, so that a later ``Upgrade`` can be found in-band).
* ``Upgrade``, ``RingMark`` — the way back TCP → shm with a fresh, verified channel.
* ``Plain`` — the downgrade: leave cosock for good, both directions continue as plain,
  unframed TCP at exact offsets (the fd is about to leave our control).
* ``NEED_DATA`` — not an event: ``next_event()`` needs more bytes first.
* ``REASON_CODES`` / ``reason_from_code`` — the stable ``FallbackReason`` ↔ u8 map.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal, TypeAlias

from ._errors import FallbackReason, LocalProtocolError

__all__ = [
    "MAX_DATA_FRAME",
    "MAX_OFFSET",
    "NEED_DATA",
    "NONCE_SIZE",
    "REASON_CODES",
    "Accept",
    "Bell",
    "Data",
    "Eof",
    "Event",
    "Fin",
    "Hello",
    "NeedData",
    "Plain",
    "PlainData",
    "Reject",
    "Reset",
    "RingMark",
    "Sentinel",
    "Space",
    "Switch",
    "Upgrade",
    "reason_from_code",
]

#: Length of the per-connection nonce (in the offer and in HELLO).
NONCE_SIZE: Final = 16
#: Exclusive upper bound of a stream offset. The wire field is a u64, but keeping offsets
#: below 2**63 leaves room for signed arithmetic on the other side and cannot bind in
#: practice (it is 292 years of 1 GB/s).
MAX_OFFSET: Final = 1 << 63
#: Largest payload of one DATA frame (a peer announcing more is a protocol error): bounds
#: what a receiver must buffer before it can hand a frame's bytes on.
MAX_DATA_FRAME: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class Hello:
    """Client → server, the first 20 bytes on TCP: "I am the client of the offer with this nonce".

    Ties the TCP connection to the shared-memory offer that arrived out of band.
    """

    nonce: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if type(self.nonce) is not bytes or len(self.nonce) != NONCE_SIZE:
            raise LocalProtocolError(f"Hello nonce must be {NONCE_SIZE} bytes")


@dataclass(frozen=True, slots=True)
class Accept:
    """Server → client, the server's first frame: the channel is accepted, data uses the rings."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Server → client, the server's first frame instead of Accept: fall back to plain TCP.

    Every byte after it (and, client → server, after the HELLO) is application data.
    """

    reason: FallbackReason

    def __post_init__(self) -> None:
        if not isinstance(self.reason, FallbackReason):
            raise LocalProtocolError(f"Reject reason must be a FallbackReason, not {self.reason!r}")


@dataclass(frozen=True, slots=True)
class Bell:
    """A wake-up for a reader: "recheck your rings", with no meaning beyond that.

    Received bells are collapsed: a run of consecutive BELL bytes is one ``Bell`` event.
    """


@dataclass(frozen=True, slots=True)
class Space:
    """A wake-up for a writer blocked on a full ring: "I freed space in the ring you write".

    Separate from Bell so that a woken writer knows why. Runs are collapsed like bells.
    """


@dataclass(frozen=True, slots=True)
class Fin:
    """End of stream: "my stream to you ends at byte offset N". Once per direction.

    Sent on shutdown(SHUT_WR) or close(); the offset lets the reader drain the ring exactly.
    """

    offset: int

    def __post_init__(self) -> None:
        if type(self.offset) is not int or not 0 <= self.offset < MAX_OFFSET:
            raise LocalProtocolError(
                f"Fin offset must be an int in [0, 2**63), not {self.offset!r}"
            )


@dataclass(frozen=True, slots=True)
class Reset:
    """ "I closed with bytes of yours unread": the connection is reset, as TCP's close()
    with unread data sends RST.  The last frame its sender sends (it closes right after).

    In-band because the receiver cannot read an RST's meaning from TCP alone: a closed
    peer's kernel also answers a late doorbell with one, which must stay plain EOF.
    """


@dataclass(frozen=True, slots=True)
class PlainData:
    """Receive-only: bytes that belong to the application, after a fallback to TCP."""

    data: bytes

    def __post_init__(self) -> None:
        if type(self.data) is not bytes:
            raise LocalProtocolError("PlainData.data must be bytes")


@dataclass(frozen=True, slots=True)
class Eof:
    """Receive-only: TCP EOF, reported once, after every buffered byte was consumed.

    On the shared-memory path the peer only closes TCP on close(), after its Fin; an Eof with
    no Fin before it means the peer vanished and the socket layer should treat it as a reset.
    """


@dataclass(frozen=True, slots=True)
class Switch:
    """ "I left the rings": sent when the path switches from shared memory to TCP.

    ``consumed`` is how many bytes of the *peer's* stream the sender has taken from its
    ring, exactly. The sender never reads that ring again, so the peer resends everything
    from ``consumed`` on in ``Data`` frames, out of the bytes it still retains: shared
    memory is never trusted after a residency change (a migrated guest sees a stale copy).
    Each side sends one; a side that receives one first answers with its own.
    """

    consumed: int

    def __post_init__(self) -> None:
        if type(self.consumed) is not int or not 0 <= self.consumed < MAX_OFFSET:
            raise LocalProtocolError(
                f"Switch offset must be an int in [0, 2**63), not {self.consumed!r}"
            )


@dataclass(frozen=True, slots=True)
class Data:
    """Application bytes in a DATA frame on TCP, after a path switch.

    Framed (unlike the plain bytes after a Reject) so that control frames -- an Upgrade
    back to shared memory, a FIN -- can still be found in the stream.
    """

    data: bytes

    def __post_init__(self) -> None:
        if type(self.data) is not bytes or not 0 < len(self.data) <= MAX_DATA_FRAME:
            raise LocalProtocolError(
                f"Data.data must be 1..{MAX_DATA_FRAME} bytes (got {type(self.data).__name__})"
            )


@dataclass(frozen=True, slots=True)
class Upgrade:
    """Client → server on a switched (framed TCP) connection: "a fresh channel is offered
    to you with this nonce" -- the in-band proof that ties the new offer to this connection.

    Answered with Accept (the server's data continues in the new rings) or Reject (stay on
    TCP; the reason says why).
    """

    nonce: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if type(self.nonce) is not bytes or len(self.nonce) != NONCE_SIZE:
            raise LocalProtocolError(f"Upgrade nonce must be {NONCE_SIZE} bytes")


@dataclass(frozen=True, slots=True)
class RingMark:
    """Client → server after an upgrade's Accept: "my data continues in the ring from here"."""


@dataclass(frozen=True, slots=True)
class Plain:
    """ "I leave cosock": a downgrade to plain, unframed TCP, for good (either side, on the
    shared-memory path or after a switch).

    Like ``Switch``, ``consumed`` is how much of the *peer's* stream the sender took, and
    each side sends one (a side that receives one first answers with its own; a ``Switch``
    crossing it counts as the answer).  After the second marker every byte on TCP is
    application data: each side resends its stream, unframed, from where the peer stopped
    (its ``consumed``, or past what already went out in DATA frames), then carries on.
    ``reason`` says why (``cosock status`` shows it at both ends).
    """

    consumed: int
    reason: FallbackReason = FallbackReason.HANDED_OVER

    def __post_init__(self) -> None:
        if type(self.consumed) is not int or not 0 <= self.consumed < MAX_OFFSET:
            raise LocalProtocolError(
                f"Plain offset must be an int in [0, 2**63), not {self.consumed!r}"
            )
        if not isinstance(self.reason, FallbackReason):
            raise LocalProtocolError(f"Plain reason must be a FallbackReason, not {self.reason!r}")


#: Everything ``Connection.send()`` takes and ``Connection.next_event()`` returns.
Event: TypeAlias = (Hello | Accept | Reject | Bell | Space | Fin | PlainData | Eof) | (
    Switch | Data | Upgrade | RingMark | Plain | Reset
)


class Sentinel(enum.Enum):
    """Non-event results of ``next_event()`` (an enum so that mypy narrows ``is`` checks)."""

    #: No complete event is buffered: call ``receive_data()`` and try again.
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = Sentinel.NEED_DATA
NeedData: TypeAlias = Literal[Sentinel.NEED_DATA]


#### REJECT reason codes
#
# The u8 after a REJECT frame. The numbers are wire format: never renumber or reuse one;
# add new reasons with new numbers. 0 is reserved (never sent). A receiver maps a code it
# does not know to PEER_REJECTED instead of failing, so that newer servers can add reasons.

REASON_CODES: Final[Mapping[FallbackReason, int]] = MappingProxyType(
    {
        FallbackReason.NOT_CORESIDENT: 1,
        FallbackReason.AGENT_UNREACHABLE: 2,
        FallbackReason.LOOPBACK_DISABLED: 3,
        FallbackReason.DISABLED: 4,
        FallbackReason.OFFER_UNDELIVERED: 5,
        FallbackReason.NO_OFFER: 6,
        FallbackReason.OFFER_INVALID: 7,
        FallbackReason.PEER_REJECTED: 8,
        FallbackReason.RESOURCE: 9,
        FallbackReason.HANDSHAKE_FAILED: 10,
        FallbackReason.HANDED_OVER: 11,
        FallbackReason.NO_SHM_DEVICE: 12,
        FallbackReason.NOT_INTERCEPTED: 13,  # status only; mapped for completeness
    }
)
_REASONS_BY_CODE: Final[Mapping[int, FallbackReason]] = MappingProxyType(
    {code: reason for reason, code in REASON_CODES.items()}
)


def reason_from_code(code: int) -> FallbackReason:
    """The reason for a received code; unknown codes mean PEER_REJECTED (forward compatible)."""
    return _REASONS_BY_CODE.get(code, FallbackReason.PEER_REJECTED)
