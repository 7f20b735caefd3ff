"""Sans-IO state machine for the TCP control stream of one cosock connection (layer 3).

Every cosock connection is a real TCP connection first. On it the client sends HELLO,
the server answers ACCEPT (data then flows through shared-memory rings and TCP carries
only small control frames) or REJECT (both sides speak plain TCP from then on). Later a
path switch (SWITCH) moves data into DATA frames on TCP and an upgrade moves it back; a
downgrade (PLAIN) leaves cosock for good, both directions continuing as plain TCP. This
module turns bytes into events and events into bytes, and checks the per-direction byte
offsets the socket layer reports. It does no IO, keeps no clocks and starts no threads:
the caller does the reading, writing, waiting and timing (like h11).

Contents:

* Wire format — HELLO and the frame types.
* ``Role``, ``State`` and the transition tables ``SEND_TRANSITIONS`` /
  ``RECEIVE_TRANSITIONS`` — every legal move, in one place.
* ``Connection`` — ``send()``, ``receive_data()``, ``next_event()``, ``data_sent()``,
  ``data_received()`` and read-only properties.

Error rule (one rule, tested): a mistake of the local side (an event illegal in this
state, a bad argument, data_sent() after FIN, Accept after a wrong nonce) raises
``LocalProtocolError`` and changes nothing, so the caller can still do the right thing
(e.g. answer with ``Reject(OFFER_INVALID)`` after a refused ``Accept``). A mistake of the
peer (garbage, wrong order, inconsistent offsets), found by ``next_event()`` or
``data_received()``, raises ``RemoteProtocolError`` and poisons the connection: the state
becomes ``ERROR`` and from then on every method raises ``LocalProtocolError``. Any other
exception escaping ``next_event()`` poisons it too.
"""

from __future__ import annotations

import enum
import re
from hmac import compare_digest
from typing import Final, TypeAlias

from ._errors import FallbackReason, LocalProtocolError, RemoteProtocolError
from ._events import (
    MAX_DATA_FRAME,
    MAX_OFFSET,
    NEED_DATA,
    NONCE_SIZE,
    REASON_CODES,
    Accept,
    Bell,
    Data,
    Eof,
    Event,
    Fin,
    Hello,
    NeedData,
    Plain,
    PlainData,
    Reject,
    Reset,
    RingMark,
    Space,
    Switch,
    Upgrade,
    reason_from_code,
)

__all__ = [
    "FRAME_SIZES",
    "HELLO_MAGIC",
    "HELLO_SIZE",
    "RECEIVE_TRANSITIONS",
    "SEND_TRANSITIONS",
    "Connection",
    "Role",
    "State",
]

#### Wire format
#
# Client's first bytes: HELLO = b"CSK\x01" + nonce(16). Then frames, both directions:
# one type byte, a fixed length per type, integers little-endian.

#: HELLO magic; the last byte is the protocol version.
HELLO_MAGIC: Final = b"CSK\x01"
HELLO_SIZE: Final = len(HELLO_MAGIC) + NONCE_SIZE

T_BELL: Final = 0x01  #: 1 byte: recheck your rings.
T_ACCEPT: Final = 0x02  #: 1 byte: server → client, first frame: channel accepted.
T_REJECT: Final = 0x03  #: 2 bytes (+ reason u8): server → client, first frame: plain TCP.
T_FIN: Final = 0x04  #: 9 bytes (+ offset u64): my stream to you ends at offset N.
T_SPACE: Final = 0x05  #: 1 byte: I freed space in the ring you write.
T_SWITCH: Final = 0x06  #: 9 bytes (+ consumed u64): I left the rings; resend from N on TCP.
T_DATA: Final = 0x07  #: 5 bytes (+ length u32) + payload: application bytes on TCP.
T_UPGRADE: Final = 0x08  #: 17 bytes (+ nonce): client → server: a fresh channel is offered.
T_RINGMARK: Final = 0x09  #: 1 byte: client → server: my data continues in the ring.
T_PLAIN: Final = 0x0A  #: 10 bytes (+ consumed u64 + reason u8): downgrade to plain TCP.
T_RESET: Final = 0x0B  #: 1 byte: I closed with your bytes unread (TCP's RST).

#: Frame length by type byte, type byte included (for DATA: its header; the payload
#: follows). Any other type byte is a protocol error.
FRAME_SIZES: Final = {
    T_BELL: 1,
    T_ACCEPT: 1,
    T_REJECT: 2,
    T_FIN: 9,
    T_SPACE: 1,
    T_SWITCH: 9,
    T_DATA: 5,
    T_UPGRADE: 1 + NONCE_SIZE,
    T_RINGMARK: 1,
    T_PLAIN: 10,
    T_RESET: 1,
}

_BELL_FRAME: Final = bytes([T_BELL])
_SPACE_FRAME: Final = bytes([T_SPACE])
_ACCEPT_FRAME: Final = bytes([T_ACCEPT])
_RINGMARK_FRAME: Final = bytes([T_RINGMARK])
_RESET_FRAME: Final = bytes([T_RESET])
#: Runs of wake-up bytes are parsed in one step (C speed), so a burst costs one event.
_BELL_RUN: Final = re.compile(re.escape(_BELL_FRAME) + b"+")
_SPACE_RUN: Final = re.compile(re.escape(_SPACE_FRAME) + b"+")
#: Compact the receive buffer once this many consumed bytes sit at its front.
_COMPACT_AT: Final = 1 << 16


class Role(enum.Enum):
    """Which end of the TCP connection: the connect()ing client or the accept()ing server."""

    # Members are singletons: identity hashing in C.  Enum.__hash__ is Python code, and
    # the transition tables hash states on every frame sent or parsed.
    __hash__ = object.__hash__

    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Overall state of a connection (both directions together)."""

    # Members are singletons: identity hashing in C.  Enum.__hash__ is Python code, and
    # the transition tables hash states on every frame sent or parsed.
    __hash__ = object.__hash__

    #: Client, before sending HELLO. Nothing received is parsed yet (our turn to speak).
    IDLE = "IDLE"
    #: Client, HELLO sent, waiting for ACCEPT or REJECT. The client sends nothing meanwhile:
    #: after a REJECT the server reads every byte after the HELLO as application data.
    HELLO_SENT = "HELLO_SENT"
    #: Server, waiting for the client's HELLO.
    AWAIT_HELLO = "AWAIT_HELLO"
    #: Server, HELLO received; it must answer Accept or Reject before anything further is
    #: parsed (``next_event()`` returns NEED_DATA until then).
    HELLO_RECEIVED = "HELLO_RECEIVED"
    #: Channel accepted: data flows through the rings, TCP carries BELL/SPACE/FIN frames.
    SHM = "SHM"
    #: We sent Switch (left the rings) and wait for the peer's Switch, which says where
    #: our resend starts. We send nothing meanwhile; the peer's frames are still parsed.
    SWITCH_SENT = "SWITCH_SENT"
    #: The peer sent Switch first: our turn to answer with ours (nothing more is parsed).
    SWITCH_RECEIVED = "SWITCH_RECEIVED"
    #: Switched: data flows both ways in DATA frames on TCP, which can still carry FIN and
    #: (client → server) an Upgrade back to shared memory.
    FRAMED = "FRAMED"
    #: Client, Upgrade sent: its data still goes in DATA frames until Accept or Reject.
    UPGRADE_SENT = "UPGRADE_SENT"
    #: Client, the Upgrade was accepted (the server's data now comes through the new ring):
    #: our turn to send RingMark, after which our data goes into the ring too.
    UPGRADE_ACCEPTED = "UPGRADE_ACCEPTED"
    #: Server, Upgrade received: our turn to answer Accept or Reject.
    UPGRADE_RECEIVED = "UPGRADE_RECEIVED"
    #: Server, Accept sent (our data goes into the ring): the client's data still comes in
    #: DATA frames until its RingMark.
    RING_AWAIT = "RING_AWAIT"
    #: We sent Plain (downgrade: leave cosock for good) and wait for the peer's Plain or
    #: Switch, which says where our unframed resend starts. We send nothing meanwhile; the
    #: peer's frames up to its marker are still parsed.
    PLAIN_SENT = "PLAIN_SENT"
    #: The peer sent Plain first: our turn to answer with ours (nothing more is parsed).
    PLAIN_RECEIVED = "PLAIN_RECEIVED"
    #: Fallback (after Reject) or downgrade (after both Plain markers): plain TCP both
    #: ways; received bytes come out as PlainData, nothing is sent.
    TCP = "TCP"
    #: TCP EOF received and reported (one Eof event), or a Reset sent or received. Nothing
    #: more arrives (next_event() returns NEED_DATA) and nothing is sent; if the channel was
    #: accepted, data_received() still works (drain the ring up to the FIN) and so does
    #: data_sent().
    CLOSED = "CLOSED"
    #: Poisoned by a peer's protocol violation; every method raises LocalProtocolError.
    ERROR = "ERROR"


#### State tables
#
# Invariants (h11 `_state.py` style):
#
# Rule 1: every transition lives here. Connection looks the (role, state, event type)
#         up and moves only to what it finds; ERROR (poisoning) is the only other move.
# Rule 2: a missing entry is illegal. Sending it raises LocalProtocolError and changes
#         nothing; receiving it raises RemoteProtocolError and poisons to ERROR.
# Rule 3: value guards (nonce, offsets, FIN once per direction) live in Connection; they
#         can refuse a listed transition but never cause one.
# Rule 4: each direction carries the handshake exactly once, first: HELLO client →
#         server, then ACCEPT or REJECT server → client. No frame precedes it; no
#         handshake frame follows it.
# Rule 5: once TCP, frames are never parsed or sent again, so no application byte can be
#         mistaken for a frame.
# Rule 6: IDLE and HELLO_RECEIVED are "our turn" states: received bytes wait in the
#         buffer unparsed, so they are read under the rules of the state we move to.
# Rule 7: every event is returned once, for the bytes (or the EOF) it consumed; so Eof
#         comes once, and CLOSED receives nothing (next_event() returns NEED_DATA).
# Rule 8: offsets are accounting, not events. data_sent() is allowed until a fallback
#         (a writer may fill the ring ahead of the verdict, and must resend those bytes
#         on TCP if the connection is rejected); data_received() only once the channel
#         was accepted (nobody reads a ring that may yet be rejected).
# Rule 9: a downgrade (Plain) is for good: it is sent only from SHM or FRAMED (a side
#         in the middle of a handshake, switch or upgrade finishes that first), answered
#         with a Plain (or crossed by a Switch, which then counts as the answer), and
#         ends in TCP; after the two markers no frame is sent or parsed again (Rule 5).
# Rule 10: Reset ends the connection (CLOSED): it is sent where data frames may be sent
#         and the peer parses them (SHM, FRAMED, UPGRADE_SENT, RING_AWAIT), received
#         wherever the peer's data frames are parsed, and nothing follows it.

_Table: TypeAlias = dict[Role, dict[State, dict[type[Event], State]]]

_SHM_SEND: Final[dict[type[Event], State]] = {
    Bell: State.SHM,
    Space: State.SHM,
    Fin: State.SHM,
    Switch: State.SWITCH_SENT,
    Plain: State.PLAIN_SENT,
    Reset: State.CLOSED,
}
_SHM_RECEIVE: Final[dict[type[Event], State]] = {
    Bell: State.SHM,
    Space: State.SHM,
    Fin: State.SHM,
    Switch: State.SWITCH_RECEIVED,
    Plain: State.PLAIN_RECEIVED,
    Reset: State.CLOSED,
    Eof: State.CLOSED,
}
_TCP_RECEIVE: Final[dict[type[Event], State]] = {PlainData: State.TCP, Eof: State.CLOSED}
_SWITCH_SENT_RECEIVE: Final[dict[type[Event], State]] = {
    Bell: State.SWITCH_SENT,
    Space: State.SWITCH_SENT,
    Fin: State.SWITCH_SENT,
    Switch: State.FRAMED,
    Plain: State.TCP,  # the peer downgrades: our Switch counts as our answer
    Reset: State.CLOSED,
    Eof: State.CLOSED,
}
_FRAMED: Final[dict[type[Event], State]] = {
    Data: State.FRAMED,
    Fin: State.FRAMED,
    Reset: State.CLOSED,
}
_FRAMED_SEND: Final[dict[type[Event], State]] = {**_FRAMED, Plain: State.PLAIN_SENT}
_FRAMED_RECEIVE: Final[dict[type[Event], State]] = {
    **_FRAMED,
    Plain: State.PLAIN_RECEIVED,
    Eof: State.CLOSED,
}
#: Plain sent: the peer's frames until its marker (DATA: what it framed before it).
_PLAIN_SENT_RECEIVE: Final[dict[type[Event], State]] = {
    Bell: State.PLAIN_SENT,
    Space: State.PLAIN_SENT,
    Fin: State.PLAIN_SENT,
    Data: State.PLAIN_SENT,
    Plain: State.TCP,
    Switch: State.TCP,
    Reset: State.CLOSED,
    Eof: State.CLOSED,
}
_PLAIN_RECEIVED_SEND: Final[dict[type[Event], State]] = {
    Plain: State.TCP,
    # A writer thread's frames (after a switch) or FIN, made before we answer: the peer
    # parses them before our marker, so our resend starts after them.
    Data: State.PLAIN_RECEIVED,
    Fin: State.PLAIN_RECEIVED,
}

SEND_TRANSITIONS: Final[_Table] = {
    Role.CLIENT: {
        State.IDLE: {Hello: State.HELLO_SENT},
        State.SHM: _SHM_SEND,
        State.SWITCH_RECEIVED: {Switch: State.FRAMED},
        State.FRAMED: {**_FRAMED_SEND, Upgrade: State.UPGRADE_SENT},
        State.UPGRADE_SENT: {
            Data: State.UPGRADE_SENT,
            Fin: State.UPGRADE_SENT,
            Reset: State.CLOSED,
        },
        State.UPGRADE_ACCEPTED: {
            RingMark: State.SHM,
            Data: State.UPGRADE_ACCEPTED,  # what was queued goes out before the mark
            Fin: State.UPGRADE_ACCEPTED,
        },
        State.PLAIN_RECEIVED: _PLAIN_RECEIVED_SEND,
    },
    Role.SERVER: {
        State.HELLO_RECEIVED: {Accept: State.SHM, Reject: State.TCP},
        State.SHM: _SHM_SEND,
        State.SWITCH_RECEIVED: {Switch: State.FRAMED},
        State.FRAMED: _FRAMED_SEND,
        State.UPGRADE_RECEIVED: {
            Accept: State.RING_AWAIT,
            Reject: State.FRAMED,
            Data: State.UPGRADE_RECEIVED,  # a writer thread's frames before the answer
            Fin: State.UPGRADE_RECEIVED,
        },
        State.RING_AWAIT: {
            Bell: State.RING_AWAIT,
            Space: State.RING_AWAIT,
            Fin: State.RING_AWAIT,
            Reset: State.CLOSED,
        },
        State.PLAIN_RECEIVED: _PLAIN_RECEIVED_SEND,
    },
}

RECEIVE_TRANSITIONS: Final[_Table] = {
    Role.CLIENT: {
        State.HELLO_SENT: {Accept: State.SHM, Reject: State.TCP, Eof: State.CLOSED},
        State.SHM: _SHM_RECEIVE,
        State.TCP: _TCP_RECEIVE,
        State.SWITCH_SENT: _SWITCH_SENT_RECEIVE,
        State.FRAMED: _FRAMED_RECEIVE,
        State.UPGRADE_SENT: {
            Data: State.UPGRADE_SENT,
            Fin: State.UPGRADE_SENT,
            Accept: State.UPGRADE_ACCEPTED,
            Reject: State.FRAMED,
            Plain: State.PLAIN_RECEIVED,  # the server downgrades instead of answering
            Reset: State.CLOSED,
            Eof: State.CLOSED,
        },
        State.PLAIN_SENT: _PLAIN_SENT_RECEIVE,
    },
    Role.SERVER: {
        State.AWAIT_HELLO: {Hello: State.HELLO_RECEIVED, Eof: State.CLOSED},
        State.SHM: _SHM_RECEIVE,
        State.TCP: _TCP_RECEIVE,
        State.SWITCH_SENT: _SWITCH_SENT_RECEIVE,
        State.FRAMED: {**_FRAMED_RECEIVE, Upgrade: State.UPGRADE_RECEIVED},
        State.RING_AWAIT: {
            Data: State.RING_AWAIT,
            Fin: State.RING_AWAIT,
            RingMark: State.SHM,
            Reset: State.CLOSED,
            Eof: State.CLOSED,
        },
        # An Upgrade that crossed our Plain: the client drops it when our Plain arrives.
        State.PLAIN_SENT: {**_PLAIN_SENT_RECEIVE, Upgrade: State.PLAIN_SENT},
    },
}

#: States in which next_event() parses nothing (Rules 6 and 7).
_PAUSED: Final = frozenset(
    {
        State.IDLE,
        State.HELLO_RECEIVED,
        State.CLOSED,
        State.SWITCH_RECEIVED,
        State.UPGRADE_ACCEPTED,
        State.UPGRADE_RECEIVED,
        State.PLAIN_RECEIVED,
    }
)
#: States in which TCP EOF means the handshake never completed.
_HANDSHAKE: Final = frozenset({State.HELLO_SENT, State.AWAIT_HELLO})


class Connection:
    """One end of a cosock connection's TCP control stream, without the IO.

    Args:
        role: CLIENT (sent the offer, sends HELLO) or SERVER (accepted the TCP connection).
        nonce: the offer's 16-byte nonce. The client sends it in HELLO; the server compares
            the HELLO's nonce with it and refuses ``Accept`` when they differ.

    Raises:
        LocalProtocolError: the nonce is not 16 bytes.

    Use it like h11: ``send(event)`` returns the bytes to write on TCP;
    ``receive_data(data)`` (``b""`` for TCP EOF) then ``next_event()`` until it returns
    ``NEED_DATA``. Report ring traffic with ``data_sent(n)`` / ``data_received(n)``.
    Not thread-safe: the socket layer serialises calls.
    """

    __slots__ = (
        "_bells",
        "_buffer",
        "_channel",
        "_eof",
        "_fallback",
        "_fin_received",
        "_fin_sent",
        "_nonce",
        "_nonce_ok",
        "_pos",
        "_received",
        "_resend_from",
        "_role",
        "_rx_framed",
        "_sent",
        "_state",
        "_tcp_next",
        "_tx_framed",
        "_upgrade_nonce",
        "_upgrade_ok",
    )

    def __init__(self, role: Role, nonce: bytes) -> None:
        if not isinstance(role, Role):
            raise LocalProtocolError(f"role must be a Role, not {role!r}")
        if type(nonce) is not bytes or len(nonce) != NONCE_SIZE:
            raise LocalProtocolError(f"nonce must be {NONCE_SIZE} bytes")
        self._role = role
        self._nonce = nonce
        self._state = State.IDLE if role is Role.CLIENT else State.AWAIT_HELLO
        # Received bytes live in _buffer[_pos:]; consuming only moves _pos, so parsing a
        # long burst never copies the rest of the buffer once per frame.
        self._buffer = bytearray()
        self._bells = 0  # BELL frames parsed (a run of them is one Bell event)
        self._pos = 0
        self._eof = False
        self._sent = 0
        self._received = 0
        self._fin_sent = False
        self._fin_received: int | None = None
        self._fallback: FallbackReason | None = None
        self._nonce_ok: bool | None = None
        self._channel = False  # True once the channel was accepted (SHM, and CLOSED after it)
        # After a Switch each direction travels in DATA frames until an upgrade moves it
        # back into a ring; offsets keep counting the one stream across every path.
        self._tx_framed = False
        self._rx_framed = False
        self._tcp_next = 0  # offset of our next DATA byte (starts at the peer's consumed)
        self._resend_from: int | None = None
        self._upgrade_nonce: bytes | None = None
        self._upgrade_ok: bool | None = None

    def __repr__(self) -> str:
        return (
            f"<Connection {self._role.value} {self._state.value} "
            f"sent={self._sent} received={self._received}>"
        )

    #### Read-only state

    @property
    def role(self) -> Role:
        return self._role

    @property
    def nonce(self) -> bytes:
        """The offer's nonce this connection was made with (what a client's Hello carries)."""
        return self._nonce

    @property
    def state(self) -> State:
        return self._state

    @property
    def sent_offset(self) -> int:
        """Data bytes written to the peer's ring so far (what FIN must carry)."""
        return self._sent

    @property
    def received_offset(self) -> int:
        """Data bytes read from our ring so far."""
        return self._received

    @property
    def fin_sent(self) -> bool:
        return self._fin_sent

    @property
    def fin_received_offset(self) -> int | None:
        """Where the peer's stream ends, once its FIN arrived; None before."""
        return self._fin_received

    @property
    def eof_reached(self) -> bool:
        """True when the peer's FIN arrived and every byte before it was read: recv() → b""."""
        return self._fin_received is not None and self._received == self._fin_received

    @property
    def fallback(self) -> FallbackReason | None:
        """Why the connection uses plain TCP (Reject sent or received, EOF during the
        handshake, or a downgrade: set once our Plain is out, or the peer's crossed our
        Switch); None while the handshake runs, on the shared-memory path, and in ERROR.
        """
        return self._fallback

    @property
    def bells_received(self) -> int:
        """How many BELL frames were parsed, counting each frame of a collapsed run."""
        return self._bells

    @property
    def tx_framed(self) -> bool:
        """Our data goes in DATA frames on TCP (after a Switch, until an upgrade)."""
        return self._tx_framed

    @property
    def rx_framed(self) -> bool:
        """The peer's data comes in DATA frames on TCP (after a Switch, until an upgrade)."""
        return self._rx_framed

    @property
    def resend_from(self) -> int | None:
        """Where the peer's Switch said its consumption stopped: our DATA frames start
        there (bytes we had put in the ring beyond it are resent); None before it."""
        return self._resend_from

    @property
    def tcp_next(self) -> int:
        """Stream offset of the next byte a Data frame of ours will carry."""
        return self._tcp_next

    @property
    def nonce_ok(self) -> bool | None:
        """Server: whether the received HELLO carried the offer's nonce; None before HELLO."""
        return self._nonce_ok

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Received bytes not consumed yet, and whether TCP EOF was received (as h11's).

        Lets a server recover the bytes of a peer that turned out not to speak cosock.
        """
        return bytes(self._buffer[self._pos :]), self._eof

    #### Sending

    def send(self, event: Event) -> bytes:
        """Return the bytes that put ``event`` on the TCP connection, and move the state on.

        Raises:
            LocalProtocolError: the event is illegal now (nothing changes), or the
                connection is poisoned.
        """
        self._check_usable("send")
        new_state = SEND_TRANSITIONS[self._role].get(self._state, {}).get(type(event))
        if new_state is None:
            raise LocalProtocolError(
                f"{type(event).__name__} cannot be sent by the {self._role.value} "
                f"in state {self._state.value}"
            )
        # Guards first, side effects after: a refused event must change nothing.
        match event:
            case Bell():  # the frame sent most: matched first
                data = _BELL_FRAME
            case Space():
                data = _SPACE_FRAME
            case Hello(nonce=nonce):
                if not compare_digest(nonce, self._nonce):
                    raise LocalProtocolError("Hello must carry this connection's nonce")
                data = HELLO_MAGIC + nonce
            case Accept() if self._state is State.UPGRADE_RECEIVED:
                if not self._upgrade_ok:
                    raise LocalProtocolError(
                        "cannot Accept the Upgrade: its nonce was not verified against the "
                        "new offer (verify_upgrade(), else send Reject)"
                    )
                data = _ACCEPT_FRAME
                self._tx_framed = False
            case Accept():
                if not self._nonce_ok:
                    raise LocalProtocolError(
                        "cannot Accept: the HELLO's nonce does not match the offer "
                        "(send Reject(OFFER_INVALID))"
                    )
                data = _ACCEPT_FRAME
                self._channel = True
            case Reject(reason=reason) if self._state is State.UPGRADE_RECEIVED:
                data = bytes([T_REJECT, REASON_CODES[reason]])
                self._upgrade_nonce = self._upgrade_ok = None
            case Reject(reason=reason):
                data = bytes([T_REJECT, REASON_CODES[reason]])
                self._fallback = reason
            case Plain(consumed=consumed, reason=reason):
                if consumed != self._received:
                    raise LocalProtocolError(
                        f"Plain({consumed}) must carry the {self._received} bytes read"
                    )
                data = (
                    bytes([T_PLAIN])
                    + consumed.to_bytes(8, "little")
                    + bytes([REASON_CODES[reason]])
                )
                self._fallback = reason
            case Switch(consumed=consumed):
                if consumed != self._received:
                    raise LocalProtocolError(
                        f"Switch({consumed}) must carry the {self._received} bytes read"
                    )
                data = bytes([T_SWITCH]) + consumed.to_bytes(8, "little")
                self._tx_framed = self._rx_framed = True
            case Data(data=payload):
                end = self._tcp_next + len(payload)
                if self._fin_sent and end > self._sent:
                    raise LocalProtocolError(f"Data beyond the FIN at offset {self._sent}")
                if end >= MAX_OFFSET:
                    raise LocalProtocolError("sent offset would overflow 2**63")
                data = bytes([T_DATA]) + len(payload).to_bytes(4, "little") + payload
                self._tcp_next = end
                self._sent = max(self._sent, end)
                if self._state is State.PLAIN_RECEIVED:
                    self._resend_from = end  # the peer reads this frame before our Plain
            case Upgrade(nonce=nonce):
                data = bytes([T_UPGRADE]) + nonce
                self._nonce = nonce
            case Reset():
                data = _RESET_FRAME
            case RingMark():
                if self._tcp_next != self._sent:
                    raise LocalProtocolError(
                        f"RingMark before the resend is done ({self._tcp_next} of "
                        f"{self._sent} bytes sent on TCP)"
                    )
                data = _RINGMARK_FRAME
                self._tx_framed = False
            case Fin(offset=offset):
                if self._fin_sent:
                    raise LocalProtocolError("FIN was already sent")
                if offset != self._sent:
                    raise LocalProtocolError(
                        f"Fin({offset}) does not match the {self._sent} bytes sent"
                    )
                if self._tx_framed and self._tcp_next != self._sent:
                    raise LocalProtocolError(
                        f"Fin({offset}) before the resend is done ({self._tcp_next} sent on TCP)"
                    )
                data = bytes([T_FIN]) + offset.to_bytes(8, "little")
                self._fin_sent = True
            case _:  # pragma: no cover - the table admits no other type
                raise LocalProtocolError(f"{type(event).__name__} cannot be sent")
        self._state = new_state
        return data

    def verify_upgrade(self, nonce: bytes) -> bool:
        """Server: does the received Upgrade carry ``nonce`` (the new offer's)?  Only a
        verified Upgrade may be accepted; the new nonce becomes this connection's.

        Raises:
            LocalProtocolError: no Upgrade is waiting for an answer.
        """
        self._check_usable("verify_upgrade")
        if self._state is not State.UPGRADE_RECEIVED or self._upgrade_nonce is None:
            raise LocalProtocolError(f"no Upgrade to verify in state {self._state.value}")
        ok = type(nonce) is bytes and compare_digest(nonce, self._upgrade_nonce)
        self._upgrade_ok = ok
        if ok:
            self._nonce = nonce
        return ok

    def data_sent(self, n: int) -> None:
        """Record ``n`` data bytes written into the peer's ring.

        Allowed from the start until a fallback, so a writer may fill the ring ahead of the
        verdict; if the connection is then rejected those bytes must be resent on TCP.

        Raises:
            LocalProtocolError: after a fallback, after FIN, or a bad ``n``.
        """
        self._check_usable("data_sent")
        self._check_count(n)
        if self._fallback is not None:
            raise LocalProtocolError(
                f"data_sent() after the fallback to TCP ({self._fallback.value})"
            )
        if self._fin_sent:
            raise LocalProtocolError(f"data_sent({n}) after FIN at offset {self._sent}")
        if self._tx_framed:
            raise LocalProtocolError(f"data_sent({n}) after the switch to TCP: send Data")
        if self._sent + n >= MAX_OFFSET:
            raise LocalProtocolError("sent offset would overflow 2**63")
        self._sent += n

    #### Receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes read from TCP; ``b""`` means TCP EOF (repeating it is harmless).

        Raises:
            LocalProtocolError: bytes after EOF, or the connection is poisoned.
        """
        self._check_usable("receive_data")
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() with bytes after TCP EOF")
        if self._pos and self._pos * 2 >= len(self._buffer):
            # Moving the rest costs at most what was consumed: amortised O(1) per byte.
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    def next_event(self) -> Event | NeedData:
        """Parse the next event, or return NEED_DATA when no complete one is buffered.

        Consecutive BELL bytes come out as one Bell, consecutive SPACE bytes as one Space;
        in TCP state everything buffered comes out as one PlainData. After TCP EOF and the
        last buffered byte comes one Eof; from then on (state CLOSED) NEED_DATA. In IDLE and
        HELLO_RECEIVED nothing is parsed (NEED_DATA): it is our turn to send.

        Raises:
            RemoteProtocolError: the peer broke the protocol; the connection is poisoned.
            LocalProtocolError: the connection was already poisoned.
        """
        self._check_usable("next_event")
        try:
            return self._next_event()
        except BaseException:
            self._state = State.ERROR
            raise

    def data_received(self, n: int) -> None:
        """Record ``n`` data bytes read from our ring, checked against the peer's FIN.

        Raises:
            RemoteProtocolError: the peer wrote past its own FIN (poisons the connection).
            LocalProtocolError: no accepted channel, or a bad ``n``.
        """
        self._check_usable("data_received")
        self._check_count(n)
        if not self._channel or self._rx_framed:
            raise LocalProtocolError(
                f"data_received() without an accepted channel ({self._state.value})"
            )
        if self._fallback is not None:
            raise LocalProtocolError(f"data_received({n}) after the downgrade to plain TCP")
        self._count_received(n)

    def _count_received(self, n: int) -> None:
        received = self._received + n
        if self._fin_received is not None and received > self._fin_received:
            self._state = State.ERROR
            raise RemoteProtocolError(
                f"peer wrote past its FIN: {received} bytes read, stream ends at "
                f"{self._fin_received}"
            )
        if received >= MAX_OFFSET:
            self._state = State.ERROR
            raise RemoteProtocolError("received offset would overflow 2**63")
        self._received = received

    #### Internals

    def _check_usable(self, what: str) -> None:
        if self._state is State.ERROR:
            raise LocalProtocolError(f"{what}(): connection is in ERROR after a protocol error")

    @staticmethod
    def _check_count(n: int) -> None:
        if type(n) is not int or n < 0:
            raise LocalProtocolError(f"byte count must be a non-negative int, not {n!r}")

    def _next_event(self) -> Event | NeedData:
        state = self._state
        if state in _PAUSED:
            return NEED_DATA
        parsed = self._parse(state)
        if parsed is None:
            if not self._eof:
                return NEED_DATA
            if self._pos < len(self._buffer):
                raise RemoteProtocolError(
                    f"TCP EOF inside a frame: {len(self._buffer) - self._pos} bytes of an "
                    f"incomplete {'HELLO' if state is State.AWAIT_HELLO else 'frame'}"
                )
            parsed = Eof(), 0
        event, size = parsed
        new_state = RECEIVE_TRANSITIONS[self._role].get(state, {}).get(type(event))
        if new_state is None:
            raise RemoteProtocolError(
                f"peer sent {type(event).__name__}, which the {self._role.value} "
                f"cannot receive in state {state.value}"
            )
        match event:
            case Hello(nonce=nonce):
                self._nonce_ok = compare_digest(nonce, self._nonce)
            case Accept() if state is State.UPGRADE_SENT:
                self._rx_framed = False
            case Accept():
                self._channel = True
            case Reject() if state is State.UPGRADE_SENT:
                pass  # stay framed
            case Reject(reason=reason):
                self._fallback = reason
            case Switch(consumed=consumed) if state is State.PLAIN_SENT:
                self._downgrade_resend(consumed, "Switch")
            case Switch(consumed=consumed):
                if consumed > self._sent:
                    raise RemoteProtocolError(
                        f"Switch({consumed}): only {self._sent} bytes were ever sent"
                    )
                self._resend_from = self._tcp_next = consumed
            case Plain(consumed=consumed, reason=reason):
                self._downgrade_resend(consumed, "Plain")
                if self._fallback is None and new_state is State.TCP:
                    self._fallback = reason  # we crossed it with a Switch
            case Upgrade() if state is State.PLAIN_SENT:
                pass  # crossed our Plain: the client drops its offer when it reads ours
            case Data(data=payload):
                self._count_received(len(payload))
            case Upgrade(nonce=nonce):
                self._upgrade_nonce, self._upgrade_ok = nonce, None
            case RingMark():
                self._rx_framed = False
            case Fin(offset=offset):
                if self._fin_received is not None:
                    raise RemoteProtocolError(f"second FIN (after FIN at {self._fin_received})")
                if offset < self._received:
                    raise RemoteProtocolError(
                        f"FIN at {offset}, but {self._received} bytes were already read"
                    )
                self._fin_received = offset
            case Eof():
                if state in _HANDSHAKE:
                    self._fallback = FallbackReason.HANDSHAKE_FAILED
        self._consume(size)
        self._state = new_state
        return event

    def _downgrade_resend(self, consumed: int, name: str) -> None:
        """Where our unframed resend starts after the peer's downgrade marker: its
        ``consumed`` for bytes that went into its ring; bytes already sent in DATA frames
        before our marker reach it anyway (it parses them first), so never before those."""
        if consumed > self._sent:
            raise RemoteProtocolError(f"{name}({consumed}): only {self._sent} bytes were ever sent")
        self._resend_from = self._tcp_next = max(consumed, self._tcp_next)

    def _parse(self, state: State) -> tuple[Event, int] | None:
        """The next event in the buffer and its size in bytes, or None if incomplete."""
        buffer, pos = self._buffer, self._pos
        available = len(buffer) - pos
        if not available:
            return None
        if state is State.TCP:
            return PlainData(bytes(buffer[pos:])), available
        if state is State.AWAIT_HELLO:
            return self._parse_hello(buffer, pos, available)
        kind = buffer[pos]
        if kind == T_BELL:
            match = _BELL_RUN.match(buffer, pos)
            assert match is not None
            self._bells += match.end() - pos
            return Bell(), match.end() - pos
        if kind == T_SPACE:
            match = _SPACE_RUN.match(buffer, pos)
            assert match is not None
            return Space(), match.end() - pos
        size = FRAME_SIZES.get(kind)
        if size is None:
            raise RemoteProtocolError(f"unknown frame type 0x{kind:02x}")
        if available < size:
            return None
        if kind == T_ACCEPT:
            return Accept(), size
        if kind == T_REJECT:
            return Reject(reason_from_code(buffer[pos + 1])), size
        if kind == T_RINGMARK:
            return RingMark(), size
        if kind == T_RESET:
            return Reset(), size
        if kind == T_UPGRADE:
            return Upgrade(bytes(buffer[pos + 1 : pos + size])), size
        if kind == T_PLAIN:
            consumed = int.from_bytes(buffer[pos + 1 : pos + 9], "little")
            if consumed >= MAX_OFFSET:
                raise RemoteProtocolError(f"PLAIN offset {consumed} is not below 2**63")
            return Plain(consumed, reason_from_code(buffer[pos + 9])), size
        if kind == T_DATA:
            length = int.from_bytes(buffer[pos + 1 : pos + size], "little")
            if not 0 < length <= MAX_DATA_FRAME:
                raise RemoteProtocolError(f"DATA frame of {length} bytes")
            if available < size + length:
                return None
            return Data(bytes(buffer[pos + size : pos + size + length])), size + length
        offset = int.from_bytes(buffer[pos + 1 : pos + size], "little")
        name = "FIN" if kind == T_FIN else "SWITCH"
        if offset >= MAX_OFFSET:
            raise RemoteProtocolError(f"{name} offset {offset} is not below 2**63")
        return (Fin(offset) if kind == T_FIN else Switch(offset)), size

    @staticmethod
    def _parse_hello(buffer: bytearray, pos: int, available: int) -> tuple[Event, int] | None:
        # Check the magic byte by byte as it arrives, so a peer that is not a cosock client
        # is found out at its first byte rather than after 20 (it may never send 20).
        head = bytes(buffer[pos : pos + min(available, len(HELLO_MAGIC))])
        if not HELLO_MAGIC.startswith(head):
            if head[:3] == HELLO_MAGIC[:3]:
                raise RemoteProtocolError(f"unsupported HELLO version {head[3]}")
            raise RemoteProtocolError(f"expected a cosock HELLO, got {head!r}")
        if available < HELLO_SIZE:
            return None
        return Hello(bytes(buffer[pos + len(HELLO_MAGIC) : pos + HELLO_SIZE])), HELLO_SIZE

    def _consume(self, size: int) -> None:
        self._pos += size
        if self._pos == len(self._buffer):
            self._buffer.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_AT and self._pos * 2 >= len(self._buffer):
            del self._buffer[: self._pos]
            self._pos = 0
