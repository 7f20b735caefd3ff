"""Tests for the sans-IO control protocol: ``cosock._protocol`` and ``cosock._events``.

Everything runs real ``Connection`` objects; ``ConnectionPair`` links a client and a
server through an in-memory byte stream, as h11's test helpers do.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cosock import FallbackReason, LocalProtocolError, RemoteProtocolError
from cosock._events import (
    MAX_DATA_FRAME,
    MAX_OFFSET,
    NEED_DATA,
    REASON_CODES,
    Accept,
    Bell,
    Data,
    Eof,
    Event,
    Fin,
    Hello,
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
from cosock._protocol import (
    FRAME_SIZES,
    HELLO_MAGIC,
    HELLO_SIZE,
    RECEIVE_TRANSITIONS,
    SEND_TRANSITIONS,
    Connection,
    Role,
    State,
)

NONCE = bytes(range(16))
OTHER_NONCE = bytes(range(100, 116))
HELLO = b"CSK\x01" + NONCE
CLIENT, SERVER = Role.CLIENT, Role.SERVER


def fin_frame(offset: int) -> bytes:
    return b"\x04" + offset.to_bytes(8, "little")


def drain(conn: Connection) -> list[Event]:
    """Every event ``next_event()`` has to give right now."""
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def normalise(events: Iterable[Event]) -> list[Event]:
    """Merge runs that chunking may split: wake-ups of one kind, and PlainData."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, Bell | Space) and type(last) is type(event):
            continue
        if isinstance(event, PlainData) and isinstance(last, PlainData):
            out[-1] = PlainData(last.data + event.data)
            continue
        out.append(event)
    return out


def snapshot(conn: Connection) -> tuple[Any, ...]:
    """Everything observable about a connection, to show that a refused call changed nothing."""
    return (
        conn.state,
        conn.sent_offset,
        conn.received_offset,
        conn.fin_sent,
        conn.fin_received_offset,
        conn.eof_reached,
        conn.fallback,
        conn.nonce_ok,
        conn.trailing_data,
    )


class ConnectionPair:
    """A client and a server ``Connection`` linked by an in-memory TCP stream."""

    def __init__(self, server_nonce: bytes = NONCE) -> None:
        self.client = Connection(CLIENT, NONCE)
        self.server = Connection(SERVER, server_nonce)

    def peer(self, conn: Connection) -> Connection:
        return self.server if conn is self.client else self.client

    def send(self, conn: Connection, *events: Event) -> list[Event]:
        """Send ``events`` from ``conn``; return what the peer's ``next_event()`` yields."""
        peer = self.peer(conn)
        for event in events:
            peer.receive_data(conn.send(event))
        return drain(peer)

    def close(self, conn: Connection) -> list[Event]:
        """``conn`` closes its TCP socket: deliver EOF to the peer."""
        peer = self.peer(conn)
        peer.receive_data(b"")
        return drain(peer)

    def accept(self) -> ConnectionPair:
        assert self.send(self.client, Hello(NONCE)) == [Hello(NONCE)]
        assert self.send(self.server, Accept()) == [Accept()]
        return self

    def switch(self) -> ConnectionPair:
        """Accept, then switch both directions to framed TCP (the client first)."""
        self.accept()
        assert self.send(self.client, Switch(self.client.received_offset)) == [
            Switch(self.client.received_offset)
        ]
        assert self.send(self.server, Switch(self.server.received_offset)) == [
            Switch(self.server.received_offset)
        ]
        assert self.client.state is self.server.state is State.FRAMED
        return self

    def reject(self, reason: FallbackReason = FallbackReason.OFFER_INVALID) -> ConnectionPair:
        assert self.send(self.client, Hello(NONCE)) == [Hello(NONCE)]
        assert self.send(self.server, Reject(reason)) == [Reject(reason)]
        return self


#### Wire format


def test_golden_bytes() -> None:
    pair = ConnectionPair()
    assert pair.client.send(Hello(NONCE)) == HELLO
    assert len(HELLO) == HELLO_SIZE == 20
    assert HELLO_MAGIC == b"CSK\x01"
    pair.server.receive_data(HELLO)
    assert drain(pair.server) == [Hello(NONCE)]
    assert pair.server.send(Accept()) == b"\x02"
    assert pair.server.send(Bell()) == b"\x01"
    assert pair.server.send(Space()) == b"\x05"
    pair.server.data_sent(0x0102030405060708)
    assert pair.server.send(Fin(0x0102030405060708)) == bytes.fromhex("040807060504030201")
    rejecting = ConnectionPair()
    rejecting.server.receive_data(HELLO)
    drain(rejecting.server)
    assert rejecting.server.send(Reject(FallbackReason.OFFER_INVALID)) == b"\x03\x07"
    assert FRAME_SIZES == {
        0x01: 1,
        0x02: 1,
        0x03: 2,
        0x04: 9,
        0x05: 1,
        0x06: 9,
        0x07: 5,
        0x08: 17,
        0x09: 1,
        0x0A: 10,
        0x0B: 1,
    }
    switched = ConnectionPair().accept()
    assert switched.client.send(Switch(0)) == bytes.fromhex("060000000000000000")
    switched.server.receive_data(b"\x06" + bytes(8))
    assert drain(switched.server) == [Switch(0)]
    assert switched.server.send(Switch(0)) == b"\x06" + bytes(8)
    assert switched.server.send(Data(b"ab")) == b"\x07\x02\x00\x00\x00ab"
    switched.client.receive_data(b"\x06" + bytes(8))
    assert drain(switched.client) == [Switch(0)]
    assert switched.client.send(Upgrade(OTHER_NONCE)) == b"\x08" + OTHER_NONCE
    downgraded = ConnectionPair().accept()
    downgraded.server.data_received(0)
    assert downgraded.server.send(Plain(0)) == bytes.fromhex("0a00000000000000000b")
    downgraded.client.receive_data(bytes.fromhex("0a00000000000000000b"))
    assert drain(downgraded.client) == [Plain(0, FallbackReason.HANDED_OVER)]
    resetting = ConnectionPair().accept()
    assert resetting.server.send(Reset()) == b"\x0b"
    resetting.client.receive_data(b"\x0b")
    assert drain(resetting.client) == [Reset()]
    assert resetting.client.state is resetting.server.state is State.CLOSED


def test_reason_codes_are_stable_and_complete() -> None:
    # Wire format: changing a number breaks peers running another version.
    assert dict(REASON_CODES) == {
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
        FallbackReason.NOT_INTERCEPTED: 13,
    }
    assert set(REASON_CODES) == set(FallbackReason)
    for reason, code in REASON_CODES.items():
        assert reason_from_code(code) is reason
    for code in set(range(256)) - set(REASON_CODES.values()):
        assert reason_from_code(code) is FallbackReason.PEER_REJECTED


@pytest.mark.parametrize("reason", list(FallbackReason))
def test_every_reason_travels(reason: FallbackReason) -> None:
    pair = ConnectionPair().reject(reason)
    assert pair.client.fallback is pair.server.fallback is reason
    assert pair.client.state is pair.server.state is State.TCP


@pytest.mark.parametrize("code", [0, 14, 0x7F, 0xFF])
def test_unknown_reject_code_means_peer_rejected(code: int) -> None:
    client = Connection(CLIENT, NONCE)
    client.send(Hello(NONCE))
    client.receive_data(bytes([0x03, code]) + b"app")
    assert drain(client) == [Reject(FallbackReason.PEER_REJECTED), PlainData(b"app")]
    assert client.fallback is FallbackReason.PEER_REJECTED


#### Events


@pytest.mark.parametrize(
    "make",
    [
        lambda: Hello(b"short"),
        lambda: Hello(NONCE + b"x"),
        lambda: Hello(bytearray(NONCE)),  # type: ignore[arg-type]
        lambda: Reject("no-offer"),  # type: ignore[arg-type]
        lambda: Fin(-1),
        lambda: Fin(MAX_OFFSET),
        lambda: Fin(True),
        lambda: Fin(1.0),  # type: ignore[arg-type]
        lambda: PlainData("text"),  # type: ignore[arg-type]
        lambda: Plain(-1),
        lambda: Plain(MAX_OFFSET),
        lambda: Plain(0, "handed-over"),  # type: ignore[arg-type]
        lambda: Connection(CLIENT, b"short"),
        lambda: Connection("client", NONCE),  # type: ignore[arg-type]
    ],
)
def test_invalid_values_are_refused_on_construction(make: Callable[[], object]) -> None:
    with pytest.raises(LocalProtocolError):
        make()


def test_events_are_frozen_and_slotted() -> None:
    fin = Fin(3)
    with pytest.raises(AttributeError):
        fin.offset = 4  # type: ignore[misc]
    assert not hasattr(fin, "__dict__")
    assert NONCE.hex() not in repr(Hello(NONCE))  # the nonce stays out of logs
    assert repr(NEED_DATA) == "NEED_DATA"


#### Handshake


def test_accept_path() -> None:
    pair = ConnectionPair()

    def states() -> tuple[State, State]:  # a call, so mypy does not narrow across steps
        return pair.client.state, pair.server.state

    assert states() == (State.IDLE, State.AWAIT_HELLO)
    assert pair.server.nonce_ok is None
    assert pair.client.nonce == NONCE
    assert pair.send(pair.client, Hello(NONCE)) == [Hello(NONCE)]
    assert states() == (State.HELLO_SENT, State.HELLO_RECEIVED)
    assert pair.server.nonce_ok is True
    assert pair.send(pair.server, Accept()) == [Accept()]
    assert states() == (State.SHM, State.SHM)
    assert pair.client.fallback is pair.server.fallback is None


def test_reject_path_then_plain_tcp_both_ways() -> None:
    pair = ConnectionPair().reject(FallbackReason.RESOURCE)
    assert (pair.client.state, pair.server.state) == (State.TCP, State.TCP)
    for sender in (pair.client, pair.server):
        receiver = pair.peer(sender)
        receiver.receive_data(b"\x01\x02\x04 GET / HTTP/1.1\r\n")  # frame bytes mean nothing now
        assert drain(receiver) == [PlainData(b"\x01\x02\x04 GET / HTTP/1.1\r\n")]
        with pytest.raises(LocalProtocolError):
            sender.send(Bell())  # no frames after a fallback
        with pytest.raises(LocalProtocolError):
            sender.data_sent(1)
    assert pair.close(pair.client) == [Eof()]
    assert pair.server.state is State.CLOSED
    assert pair.server.fallback is FallbackReason.RESOURCE


def _split_everywhere(data: bytes) -> Iterable[list[bytes]]:
    """Every split of ``data`` into one, two and three chunks, plus byte by byte."""
    yield [data]
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            yield [data[:i], data[i:j], data[j:]]
    yield [data[i : i + 1] for i in range(len(data))]


def _feed(
    conn: Connection, chunks: Iterable[bytes], answer: Event | None = None, eof: bool = False
) -> list[Event]:
    """Deliver ``chunks`` one at a time (then EOF if asked), draining after each.

    A server answers a Hello with ``answer`` and keeps draining.
    """
    events: list[Event] = []
    for chunk in [*(c for c in chunks if c), *([b""] if eof else [])]:
        conn.receive_data(chunk)
        for event in drain(conn):
            events.append(event)
            if isinstance(event, Hello) and answer is not None:
                conn.send(answer)
                events.extend(drain(conn))
    return events


TRAILER = b"\x01\x02\x03\x04\x05HELLO\x00app"


@pytest.mark.parametrize("chunks", list(_split_everywhere(b"\x03\x06" + TRAILER)))
def test_client_sees_bytes_after_reject_as_plain_data_exactly(chunks: list[bytes]) -> None:
    client = Connection(CLIENT, NONCE)
    client.send(Hello(NONCE))
    events = _feed(client, chunks)
    assert events[0] == Reject(FallbackReason.NO_OFFER)
    assert all(isinstance(e, PlainData) and e.data for e in events[1:])
    assert b"".join(e.data for e in events[1:] if isinstance(e, PlainData)) == TRAILER
    client.receive_data(b"")
    assert drain(client) == [Eof()]


@pytest.mark.parametrize("chunks", list(_split_everywhere(HELLO + TRAILER)))
def test_server_sees_bytes_after_hello_as_plain_data_once_rejected(chunks: list[bytes]) -> None:
    server = Connection(SERVER, NONCE)
    events = _feed(server, chunks, answer=Reject(FallbackReason.NO_OFFER))
    assert events[0] == Hello(NONCE)
    assert normalise(events[1:]) == [PlainData(TRAILER)]


def test_nonce_mismatch_refuses_accept_but_allows_reject() -> None:
    pair = ConnectionPair(server_nonce=OTHER_NONCE)
    assert pair.send(pair.client, Hello(NONCE)) == [Hello(NONCE)]
    assert pair.server.nonce_ok is False
    before = snapshot(pair.server)
    with pytest.raises(LocalProtocolError, match="nonce"):
        pair.server.send(Accept())
    assert snapshot(pair.server) == before  # not poisoned: a local error changes nothing
    reason = FallbackReason.OFFER_INVALID
    assert pair.send(pair.server, Reject(reason)) == [Reject(reason)]
    assert pair.client.fallback is pair.server.fallback is reason


def test_client_hello_must_carry_its_own_nonce() -> None:
    client = Connection(CLIENT, NONCE)
    with pytest.raises(LocalProtocolError, match="nonce"):
        client.send(Hello(OTHER_NONCE))
    assert client.state is State.IDLE


def test_server_waits_for_its_verdict_before_parsing_more() -> None:
    server = Connection(SERVER, NONCE)
    server.receive_data(HELLO + b"\x01\x05")
    assert drain(server) == [Hello(NONCE)]
    assert server.next_event() is NEED_DATA  # our turn: the bytes wait
    assert server.trailing_data == (b"\x01\x05", False)
    server.send(Accept())
    assert drain(server) == [Bell(), Space()]


@pytest.mark.parametrize("cut", range(1, 5))
def test_non_cosock_peer_is_found_at_its_first_bytes(cut: int) -> None:
    # A plain HTTP client must not hang the server until 20 bytes arrived.
    server = Connection(SERVER, NONCE)
    server.receive_data(b"GET / HTTP/1.1\r\n"[:cut])
    with pytest.raises(RemoteProtocolError, match="HELLO"):
        server.next_event()
    assert server.state is State.ERROR
    assert server.trailing_data == (b"GET / HTTP/1.1\r\n"[:cut], False)  # recoverable


@pytest.mark.parametrize("cut", range(1, HELLO_SIZE))
def test_hello_prefix_waits_for_more(cut: int) -> None:
    server = Connection(SERVER, NONCE)
    server.receive_data(HELLO[:cut])
    assert server.next_event() is NEED_DATA
    server.receive_data(HELLO[cut:])
    assert drain(server) == [Hello(NONCE)]


def test_unsupported_hello_version() -> None:
    server = Connection(SERVER, NONCE)
    server.receive_data(b"CSK\x02")
    with pytest.raises(RemoteProtocolError, match="version 2"):
        server.next_event()


@pytest.mark.parametrize(
    ("role", "sent"),
    [(SERVER, b""), (SERVER, HELLO[:7]), (CLIENT, b""), (CLIENT, b"\x03")],
)
def test_eof_during_handshake(role: Role, sent: bytes) -> None:
    conn = Connection(role, NONCE)
    if role is CLIENT:
        conn.send(Hello(NONCE))
    conn.receive_data(sent)
    conn.receive_data(b"")
    if sent:
        with pytest.raises(RemoteProtocolError, match="EOF"):
            conn.next_event()
        assert conn.state is State.ERROR
        assert conn.fallback is None
    else:
        assert drain(conn) == [Eof()]
        assert conn.state is State.CLOSED
        assert conn.fallback is FallbackReason.HANDSHAKE_FAILED
        with pytest.raises(LocalProtocolError):
            conn.data_sent(1)


#### Shared-memory phase: wake-ups, offsets, FIN, EOF


def test_wakeups_both_ways_and_collapsing() -> None:
    pair = ConnectionPair().accept()
    assert pair.send(pair.client, Bell(), Bell(), Space(), Bell()) == [Bell(), Space(), Bell()]
    assert pair.send(pair.server, Space(), Space()) == [Space()]
    assert pair.send(pair.server) == []


def test_fin_and_half_close() -> None:
    pair = ConnectionPair().accept()
    pair.client.data_sent(10)
    pair.client.data_sent(5)
    assert pair.client.sent_offset == 15
    assert pair.send(pair.client, Fin(15)) == [Fin(15)]
    assert pair.client.fin_sent
    assert pair.server.fin_received_offset == 15
    assert not pair.server.eof_reached
    pair.server.data_received(15)
    assert pair.server.eof_reached
    # Half-close: the server keeps writing, the client keeps reading and freeing space.
    pair.server.data_sent(100)
    assert pair.send(pair.server, Bell()) == [Bell()]
    pair.client.data_received(100)
    assert pair.send(pair.client, Space()) == [Space()]  # allowed after our own FIN
    with pytest.raises(LocalProtocolError, match="after FIN"):
        pair.client.data_sent(1)
    assert pair.send(pair.server, Fin(100)) == [Fin(100)]
    assert pair.client.eof_reached
    assert pair.close(pair.server) == [Eof()]
    assert pair.close(pair.client) == [Eof()]
    assert pair.client.state is pair.server.state is State.CLOSED
    assert pair.client.fallback is pair.server.fallback is None


def test_ring_can_be_drained_after_tcp_eof() -> None:
    pair = ConnectionPair().accept()
    pair.client.data_sent(7)
    pair.send(pair.client, Fin(7))
    assert pair.close(pair.client) == [Eof()]
    assert pair.server.state is State.CLOSED
    assert pair.server.next_event() is NEED_DATA  # Eof comes once
    pair.server.data_received(7)
    assert pair.server.eof_reached
    with pytest.raises(LocalProtocolError):
        pair.server.send(Bell())  # the peer is gone
    pair.server.receive_data(b"")  # repeating EOF is harmless
    with pytest.raises(LocalProtocolError, match="after TCP EOF"):
        pair.server.receive_data(b"x")


def test_data_written_ahead_during_handshake_is_counted() -> None:
    pair = ConnectionPair()
    pair.client.send(Hello(NONCE))
    pair.client.data_sent(3)  # writing ahead into the ring before the verdict
    with pytest.raises(LocalProtocolError):
        pair.client.send(Fin(3))  # but no frame before the verdict
    with pytest.raises(LocalProtocolError, match="channel"):
        pair.client.data_received(1)  # and nobody reads a ring not yet accepted
    pair.server.receive_data(HELLO)
    drain(pair.server)
    pair.server.data_sent(2)
    assert pair.send(pair.server, Accept()) == [Accept()]
    assert pair.send(pair.client, Fin(3)) == [Fin(3)]
    assert pair.client.sent_offset == 3 and pair.server.sent_offset == 2


@pytest.mark.parametrize(
    ("received", "frames", "match"),
    [
        (5, fin_frame(4), "already read"),
        (0, fin_frame(1) + fin_frame(1), "second FIN"),
        (0, fin_frame(MAX_OFFSET), "2\\*\\*63"),
        (0, fin_frame(2**64 - 1), "2\\*\\*63"),
        (0, b"\x02", "Accept"),
        (0, b"\x03\x01", "Reject"),
        (0, HELLO, "0x43"),
        (0, b"\x00", "0x00"),
        (0, b"\x0c", "0x0c"),
        (0, b"\xff", "0xff"),
        (0, b"\x0a" + (1).to_bytes(8, "little") + b"\x0b", "only 0 bytes"),
        (0, b"\x0a" + MAX_OFFSET.to_bytes(8, "little") + b"\x0b", "2\\*\\*63"),
        (0, b"\x06" + (1).to_bytes(8, "little"), "only 0 bytes"),
        (0, b"\x06" + MAX_OFFSET.to_bytes(8, "little"), "2\\*\\*63"),
        (0, b"\x07\x01\x00\x00\x00x", "Data"),
        (0, b"\x08" + NONCE, "Upgrade"),
        (0, b"\x09", "RingMark"),
    ],
)
def test_remote_violations_in_shm_poison(received: int, frames: bytes, match: str) -> None:
    server = ConnectionPair().accept().server
    server.data_received(received)
    server.receive_data(frames)
    with pytest.raises(RemoteProtocolError, match=match):
        drain(server)
    assert server.state is State.ERROR


def test_reading_past_the_peers_fin_poisons() -> None:
    pair = ConnectionPair().accept()
    pair.client.data_sent(4)
    pair.send(pair.client, Fin(4))
    pair.server.data_received(3)
    with pytest.raises(RemoteProtocolError, match="past its FIN"):
        pair.server.data_received(2)
    assert pair.server.state is State.ERROR


def test_received_offset_overflow_poisons() -> None:
    server = ConnectionPair().accept().server
    server.data_received(MAX_OFFSET - 1)
    with pytest.raises(RemoteProtocolError, match="overflow"):
        server.data_received(1)
    assert server.state is State.ERROR


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda c: c.data_sent(-1), "non-negative"),
        (lambda c: c.data_received(-1), "non-negative"),
        (lambda c: c.data_sent(True), "non-negative"),
        (lambda c: c.data_sent(MAX_OFFSET), "overflow"),
        (lambda c: c.send(Fin(1)), "does not match"),
        (lambda c: (c.send(Fin(0)), c.send(Fin(0))), "already sent"),
    ],
)
def test_local_mistakes_in_shm_change_nothing(
    call: Callable[[Connection], object], match: str
) -> None:
    client = ConnectionPair().accept().client
    with pytest.raises(LocalProtocolError, match=match):
        call(client)
    assert client.state is State.SHM
    assert client.sent_offset == client.received_offset == 0


def test_eof_inside_a_frame_and_without_fin() -> None:
    pair = ConnectionPair().accept()
    pair.server.receive_data(fin_frame(9)[:5])
    pair.server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="EOF inside a frame"):
        pair.server.next_event()
    # EOF without FIN is not a protocol error; the socket layer reports a reset.
    other = ConnectionPair().accept()
    assert other.close(other.server) == [Eof()]
    assert other.client.fin_received_offset is None
    assert not other.client.eof_reached


def test_error_state_refuses_everything() -> None:
    client = ConnectionPair().accept().client
    client.receive_data(b"\xee")
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    for call in (
        lambda: client.next_event(),
        lambda: client.receive_data(b"x"),
        lambda: client.receive_data(b""),
        lambda: client.send(Bell()),
        lambda: client.data_sent(1),
        lambda: client.data_received(1),
    ):
        with pytest.raises(LocalProtocolError, match="ERROR"):
            call()
    assert client.state is State.ERROR
    assert "ERROR" in repr(client)


#### The (state, event) matrix
#
# Written from the specification, independently of the module's tables; the module's
# tables must say the same, and the code must do what the tables say.

SHM = State.SHM
EXPECTED_SEND: dict[tuple[Role, State, type[Event]], State] = {
    (CLIENT, State.IDLE, Hello): State.HELLO_SENT,
    (SERVER, State.HELLO_RECEIVED, Accept): SHM,
    (SERVER, State.HELLO_RECEIVED, Reject): State.TCP,
    **{(role, SHM, kind): SHM for role in Role for kind in (Bell, Space, Fin)},
    **{(role, SHM, Switch): State.SWITCH_SENT for role in Role},
    **{(role, State.SWITCH_RECEIVED, Switch): State.FRAMED for role in Role},
    **{(role, State.FRAMED, kind): State.FRAMED for role in Role for kind in (Data, Fin)},
    (CLIENT, State.FRAMED, Upgrade): State.UPGRADE_SENT,
    (CLIENT, State.UPGRADE_SENT, Data): State.UPGRADE_SENT,
    (CLIENT, State.UPGRADE_SENT, Fin): State.UPGRADE_SENT,
    (CLIENT, State.UPGRADE_ACCEPTED, RingMark): SHM,
    (CLIENT, State.UPGRADE_ACCEPTED, Data): State.UPGRADE_ACCEPTED,
    (CLIENT, State.UPGRADE_ACCEPTED, Fin): State.UPGRADE_ACCEPTED,
    (SERVER, State.UPGRADE_RECEIVED, Accept): State.RING_AWAIT,
    (SERVER, State.UPGRADE_RECEIVED, Reject): State.FRAMED,
    (SERVER, State.UPGRADE_RECEIVED, Data): State.UPGRADE_RECEIVED,
    (SERVER, State.UPGRADE_RECEIVED, Fin): State.UPGRADE_RECEIVED,
    **{(SERVER, State.RING_AWAIT, kind): State.RING_AWAIT for kind in (Bell, Space, Fin)},
    **{(role, state, Plain): State.PLAIN_SENT for role in Role for state in (SHM, State.FRAMED)},
    **{(role, State.PLAIN_RECEIVED, Plain): State.TCP for role in Role},
    **{
        (role, State.PLAIN_RECEIVED, kind): State.PLAIN_RECEIVED
        for role in Role
        for kind in (Data, Fin)
    },
    # Rule 10: where the peer parses our frames.
    **{(role, state, Reset): State.CLOSED for role in Role for state in (SHM, State.FRAMED)},
    (CLIENT, State.UPGRADE_SENT, Reset): State.CLOSED,
    (SERVER, State.RING_AWAIT, Reset): State.CLOSED,
}

#: What each wire input (named by what it encodes) must produce, per (role, state):
#: an event and a new state; a missing entry is a RemoteProtocolError.
WIRE: dict[str, bytes] = {
    "HELLO": HELLO,
    "ACCEPT": b"\x02",
    "REJECT": b"\x03\x06",
    "BELL": b"\x01",
    "SPACE": b"\x05",
    "FIN": fin_frame(0),
    "SWITCH": b"\x06" + bytes(8),
    "DATA": b"\x07\x01\x00\x00\x00x",
    "UPGRADE": b"\x08" + OTHER_NONCE,
    "RINGMARK": b"\x09",
    "PLAIN": b"\x0a" + bytes(8) + b"\x0b",
    "RESET": b"\x0b",
    "GARBAGE": b"\xfe",
    "EOF": b"",
}
WIRE_EVENT: dict[str, Event] = {
    "HELLO": Hello(NONCE),
    "ACCEPT": Accept(),
    "REJECT": Reject(FallbackReason.NO_OFFER),
    "BELL": Bell(),
    "SPACE": Space(),
    "FIN": Fin(0),
    "SWITCH": Switch(0),
    "DATA": Data(b"x"),
    "UPGRADE": Upgrade(OTHER_NONCE),
    "RINGMARK": RingMark(),
    "PLAIN": Plain(0),
    "RESET": Reset(),
    "EOF": Eof(),
}
EXPECTED_RECEIVE: dict[tuple[Role, State, str], State] = {
    (SERVER, State.AWAIT_HELLO, "HELLO"): State.HELLO_RECEIVED,
    (SERVER, State.AWAIT_HELLO, "EOF"): State.CLOSED,
    (CLIENT, State.HELLO_SENT, "ACCEPT"): SHM,
    (CLIENT, State.HELLO_SENT, "REJECT"): State.TCP,
    (CLIENT, State.HELLO_SENT, "EOF"): State.CLOSED,
    **{(role, SHM, wire): SHM for role in Role for wire in ("BELL", "SPACE", "FIN")},
    **{(role, SHM, "EOF"): State.CLOSED for role in Role},
    **{(role, State.TCP, wire): State.TCP for role in Role for wire in WIRE if wire != "EOF"},
    **{(role, State.TCP, "EOF"): State.CLOSED for role in Role},
    **{(role, SHM, "SWITCH"): State.SWITCH_RECEIVED for role in Role},
    **{
        (role, State.SWITCH_SENT, wire): State.SWITCH_SENT
        for role in Role
        for wire in ("BELL", "SPACE", "FIN")
    },
    **{(role, State.SWITCH_SENT, "SWITCH"): State.FRAMED for role in Role},
    **{(role, State.SWITCH_SENT, "EOF"): State.CLOSED for role in Role},
    **{(role, State.FRAMED, wire): State.FRAMED for role in Role for wire in ("DATA", "FIN")},
    **{(role, State.FRAMED, "EOF"): State.CLOSED for role in Role},
    (SERVER, State.FRAMED, "UPGRADE"): State.UPGRADE_RECEIVED,
    (CLIENT, State.UPGRADE_SENT, "DATA"): State.UPGRADE_SENT,
    (CLIENT, State.UPGRADE_SENT, "FIN"): State.UPGRADE_SENT,
    (CLIENT, State.UPGRADE_SENT, "ACCEPT"): State.UPGRADE_ACCEPTED,
    (CLIENT, State.UPGRADE_SENT, "REJECT"): State.FRAMED,
    (CLIENT, State.UPGRADE_SENT, "EOF"): State.CLOSED,
    (SERVER, State.RING_AWAIT, "DATA"): State.RING_AWAIT,
    (SERVER, State.RING_AWAIT, "FIN"): State.RING_AWAIT,
    (SERVER, State.RING_AWAIT, "RINGMARK"): SHM,
    (SERVER, State.RING_AWAIT, "EOF"): State.CLOSED,
    # The downgrade (Rule 9).
    **{(role, SHM, "PLAIN"): State.PLAIN_RECEIVED for role in Role},
    **{(role, State.FRAMED, "PLAIN"): State.PLAIN_RECEIVED for role in Role},
    (CLIENT, State.UPGRADE_SENT, "PLAIN"): State.PLAIN_RECEIVED,
    **{(role, State.SWITCH_SENT, "PLAIN"): State.TCP for role in Role},
    **{
        (role, State.PLAIN_SENT, wire): State.PLAIN_SENT
        for role in Role
        for wire in ("BELL", "SPACE", "FIN", "DATA")
    },
    **{(role, State.PLAIN_SENT, wire): State.TCP for role in Role for wire in ("PLAIN", "SWITCH")},
    **{(role, State.PLAIN_SENT, "EOF"): State.CLOSED for role in Role},
    (SERVER, State.PLAIN_SENT, "UPGRADE"): State.PLAIN_SENT,
    # Rule 10: wherever the peer's data frames are parsed.
    **{
        (role, state, "RESET"): State.CLOSED
        for role in Role
        for state in (SHM, State.SWITCH_SENT, State.FRAMED, State.PLAIN_SENT)
    },
    (CLIENT, State.UPGRADE_SENT, "RESET"): State.CLOSED,
    (SERVER, State.RING_AWAIT, "RESET"): State.CLOSED,
}
#: States where nothing is parsed: the input waits (NEED_DATA), the state stays.
PAUSED = {
    (CLIENT, State.IDLE),
    (SERVER, State.HELLO_RECEIVED),
    (CLIENT, State.SWITCH_RECEIVED),
    (SERVER, State.SWITCH_RECEIVED),
    (CLIENT, State.UPGRADE_ACCEPTED),
    (SERVER, State.UPGRADE_RECEIVED),
    (CLIENT, State.CLOSED),
    (SERVER, State.CLOSED),
    (CLIENT, State.PLAIN_RECEIVED),
    (SERVER, State.PLAIN_RECEIVED),
}


def _bring(role: Role, state: State) -> Connection:
    """A real connection driven into ``state`` through the public API."""
    pair = ConnectionPair()
    conn = pair.client if role is CLIENT else pair.server
    if state is State.ERROR:
        if role is CLIENT:
            conn.send(Hello(NONCE))
        conn.receive_data(b"\xfe")
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
    elif state is State.HELLO_SENT:
        conn.send(Hello(NONCE))
    elif state is State.HELLO_RECEIVED:
        pair.send(pair.client, Hello(NONCE))
    elif state is SHM:
        pair.accept()
    elif state is State.TCP:
        pair.reject()
    elif state is State.CLOSED:
        pair.accept()
        pair.close(pair.peer(conn))
    elif state is State.SWITCH_SENT:
        pair.accept()
        conn.send(Switch(0))
    elif state is State.SWITCH_RECEIVED:
        pair.accept()
        pair.send(pair.peer(conn), Switch(0))
    elif state is State.PLAIN_SENT:
        pair.accept()
        conn.send(Plain(0))
    elif state is State.PLAIN_RECEIVED:
        pair.accept()
        pair.send(pair.peer(conn), Plain(0))
    elif state not in (State.IDLE, State.AWAIT_HELLO):
        pair.switch()
        if state is not State.FRAMED:
            pair.send(pair.client, Upgrade(OTHER_NONCE))
        if state in (State.UPGRADE_RECEIVED, State.RING_AWAIT, State.UPGRADE_ACCEPTED):
            assert pair.server.verify_upgrade(OTHER_NONCE)
        if state in (State.RING_AWAIT, State.UPGRADE_ACCEPTED):
            pair.send(pair.server, Accept())
    assert conn.state is state
    return conn


_SWITCHED = [
    State.SWITCH_SENT,
    State.SWITCH_RECEIVED,
    State.FRAMED,
    State.PLAIN_SENT,
    State.PLAIN_RECEIVED,
]
STATES = {
    CLIENT: [
        State.IDLE,
        State.HELLO_SENT,
        SHM,
        State.TCP,
        State.CLOSED,
        State.ERROR,
        *_SWITCHED,
        State.UPGRADE_SENT,
        State.UPGRADE_ACCEPTED,
    ],
    SERVER: [
        State.AWAIT_HELLO,
        State.HELLO_RECEIVED,
        SHM,
        State.TCP,
        State.CLOSED,
        State.ERROR,
        *_SWITCHED,
        State.UPGRADE_RECEIVED,
        State.RING_AWAIT,
    ],
}
SAMPLE_EVENTS: list[Event] = [
    Hello(NONCE),
    Accept(),
    Reject(FallbackReason.NO_OFFER),
    Bell(),
    Space(),
    Fin(0),
    PlainData(b"x"),
    Eof(),
    Switch(0),
    Data(b"x"),
    Upgrade(OTHER_NONCE),
    RingMark(),
    Plain(0),
    Reset(),
]


def test_module_tables_match_the_specification() -> None:
    table_send = {
        (role, state, kind): new
        for role, states in SEND_TRANSITIONS.items()
        for state, moves in states.items()
        for kind, new in moves.items()
    }
    assert table_send == EXPECTED_SEND
    table_receive = {
        (role, state, kind): new
        for role, states in RECEIVE_TRANSITIONS.items()
        for state, moves in states.items()
        for kind, new in moves.items()
    }
    wire_kinds = {name: type(event) for name, event in WIRE_EVENT.items()}
    expected = {
        (role, state, wire_kinds[wire]): new
        for (role, state, wire), new in EXPECTED_RECEIVE.items()
        if state is not State.TCP or wire == "EOF"
    } | {(role, State.TCP, PlainData): State.TCP for role in Role}
    assert table_receive == expected


@pytest.mark.parametrize(
    ("role", "state", "event"),
    [(r, s, e) for r in Role for s in STATES[r] for e in SAMPLE_EVENTS],
    ids=lambda v: getattr(v, "name", None) or type(v).__name__,
)
def test_send_matrix(role: Role, state: State, event: Event) -> None:
    conn = _bring(role, state)
    before = snapshot(conn)
    new_state = EXPECTED_SEND.get((role, state, type(event)))
    if new_state is None:
        with pytest.raises(LocalProtocolError):
            conn.send(event)
        assert snapshot(conn) == before
    else:
        assert conn.send(event)
        assert conn.state is new_state


@pytest.mark.parametrize(
    ("role", "state", "wire"),
    [(r, s, w) for r in Role for s in STATES[r] for w in WIRE],
    ids=lambda v: getattr(v, "name", None) or str(v),
)
def test_receive_matrix(role: Role, state: State, wire: str) -> None:
    conn = _bring(role, state)
    if state is State.ERROR or (state is State.CLOSED and wire != "EOF"):
        with pytest.raises(LocalProtocolError):
            conn.receive_data(WIRE[wire])  # poisoned, or bytes after TCP EOF
        return
    conn.receive_data(WIRE[wire])
    before = snapshot(conn)
    if (role, state) in PAUSED:
        assert conn.next_event() is NEED_DATA
        assert snapshot(conn) == before
        return
    new_state = EXPECTED_RECEIVE.get((role, state, wire))
    if new_state is None:
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
        # Poisoned, but otherwise untouched: the offending bytes were not consumed.
        assert snapshot(conn) == (State.ERROR, *before[1:])
        with pytest.raises(LocalProtocolError):
            conn.next_event()
        return
    plain = state is State.TCP and wire != "EOF"
    expected = PlainData(WIRE[wire]) if plain else WIRE_EVENT[wire]
    assert conn.next_event() == expected
    assert conn.state is new_state
    assert conn.next_event() is NEED_DATA


#### Property tests: operation scripts and arbitrary chunkings

SIDES = st.sampled_from([CLIENT, SERVER])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("bell"), SIDES, st.just(0)),
        st.tuples(st.just("space"), SIDES, st.just(0)),
        st.tuples(st.just("write"), SIDES, st.integers(0, 1 << 40)),
        st.tuples(st.just("fin"), SIDES, st.just(0)),
    ),
    max_size=40,
)


def _run_script(ops: Sequence[tuple[str, Role, int]]) -> tuple[dict[Role, bytes], dict[Role, Any]]:
    """Play ``ops`` on a live pair; return each side's TCP bytes and what its peer must see.

    The expectation is built from the operations alone (the model), and the live pair,
    delivering after every operation, must agree with it.
    """
    pair = ConnectionPair()
    conns = {CLIENT: pair.client, SERVER: pair.server}
    streams = {CLIENT: bytearray(HELLO), SERVER: bytearray(b"\x02")}
    model: dict[Role, list[Event]] = {CLIENT: [Hello(NONCE)], SERVER: [Accept()]}
    seen: dict[Role, list[Event]] = {CLIENT: [], SERVER: []}  # keyed by sender
    seen[CLIENT].extend(pair.send(pair.client, Hello(NONCE)))
    seen[SERVER].extend(pair.send(pair.server, Accept()))
    for kind, side, n in ops:
        conn = conns[side]
        peer = pair.peer(conn)
        if kind == "write":
            if conn.fin_sent or conn.sent_offset + n >= MAX_OFFSET:
                with pytest.raises(LocalProtocolError):
                    conn.data_sent(n)
                continue
            conn.data_sent(n)
            continue
        if kind == "fin" and conn.fin_sent:
            with pytest.raises(LocalProtocolError, match="already sent"):
                conn.send(Fin(conn.sent_offset))
            continue
        event: Event = (
            Bell() if kind == "bell" else Space() if kind == "space" else Fin(conn.sent_offset)
        )
        data = conn.send(event)
        streams[side] += data
        model[side].append(event)
        peer.receive_data(data)
        seen[side].extend(drain(peer))
    info = {
        side: {
            "events": [*normalise(model[side]), Eof()],
            "written": conns[side].sent_offset,
            "fin": conns[side].fin_sent,
        }
        for side in Role
    }
    for side in Role:
        assert normalise(seen[side]) == normalise(model[side])
    return {side: bytes(streams[side]) for side in Role}, info


def _receiver(sender: Role) -> Connection:
    """A fresh connection ready to read what ``sender`` wrote from its first byte."""
    if sender is CLIENT:
        return Connection(SERVER, NONCE)
    client = Connection(CLIENT, NONCE)
    client.send(Hello(NONCE))
    return client


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, data=st.data())
def test_chunking_never_changes_the_events(ops: list[tuple[str, Role, int]], data: Any) -> None:
    streams, info = _run_script(ops)
    for sender in Role:
        stream = streams[sender]
        expected = info[sender]["events"]
        # Unchunked: one receive_data, then EOF. Runs are collapsed, so no normalising.
        whole = _receiver(sender)
        whole.receive_data(stream)
        whole.receive_data(b"")
        events = drain(whole)
        if isinstance(events[0], Hello):
            whole.send(Accept())
            events += drain(whole)
        assert events == expected
        # Chunked at arbitrary points, draining after every chunk, reading the ring between.
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
        bounds = [0, *sorted(cuts), len(stream)]
        chunked = _receiver(sender)
        got: list[Event] = []
        for start, end in itertools.pairwise(bounds):
            got += _feed(chunked, [stream[start:end]], answer=Accept())
            if chunked.state in (State.SHM, State.CLOSED):
                left = info[sender]["written"] - chunked.received_offset
                chunked.data_received(data.draw(st.integers(0, left), label="read"))
        chunked.receive_data(b"")
        got += drain(chunked)
        assert normalise(got) == expected
        assert chunked.state is State.CLOSED
        assert chunked.next_event() is NEED_DATA
        chunked.data_received(info[sender]["written"] - chunked.received_offset)
        assert chunked.eof_reached is info[sender]["fin"]
        if info[sender]["fin"]:
            assert chunked.fin_received_offset == info[sender]["written"]


@given(
    reason=st.sampled_from(list(FallbackReason)),
    client_app=st.binary(max_size=64),
    server_app=st.binary(max_size=64),
    data=st.data(),
)
def test_reject_chunking_keeps_application_bytes_exact(
    reason: FallbackReason, client_app: bytes, server_app: bytes, data: Any
) -> None:
    for sender, stream, app in (
        (CLIENT, HELLO + client_app, client_app),
        (SERVER, bytes([0x03, REASON_CODES[reason]]) + server_app, server_app),
    ):
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
        bounds = [0, *sorted(cuts), len(stream)]
        receiver = _receiver(sender)
        chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
        events = normalise(_feed(receiver, chunks, answer=Reject(reason), eof=True))
        handshake = Hello(NONCE) if sender is CLIENT else Reject(reason)
        assert events == [handshake, *([PlainData(app)] if app else []), Eof()]
        assert receiver.fallback is reason


#### Fuzzing: garbage never raises anything but RemoteProtocolError

FRAGMENTS = [
    HELLO,
    HELLO[:5],
    b"CSK",
    b"\x01",
    b"\x02",
    b"\x03\x07",
    b"\x03\xff",
    b"\x04",
    fin_frame(0),
    fin_frame(3),
    fin_frame(2**63),
    b"\x05",
]
FUZZ = st.one_of(
    st.binary(max_size=64),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=3)), max_size=12).map(
        b"".join
    ),
)


def _fuzz(conn: Connection, payload: bytes, cuts: list[int], eof: bool, reads: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(payload)]
    reads = list(reads)
    try:
        for start, end in itertools.pairwise(bounds):
            if end > start:
                conn.receive_data(payload[start:end])
            for event in drain(conn):
                if isinstance(event, Hello):
                    conn.send(Accept() if conn.nonce_ok else Reject(FallbackReason.OFFER_INVALID))
            if reads and conn.state is State.SHM:
                conn.data_received(reads.pop())
        if eof:
            conn.receive_data(b"")
            drain(conn)
    except RemoteProtocolError:
        assert conn.state is State.ERROR
        with pytest.raises(LocalProtocolError):
            conn.next_event()


FUZZ_START: dict[str, Callable[[], Connection]] = {
    "server-AWAIT_HELLO": lambda: Connection(SERVER, NONCE),
    "client-HELLO_SENT": lambda: _bring(CLIENT, State.HELLO_SENT),
    "client-SHM": lambda: _bring(CLIENT, SHM),
    "server-SHM": lambda: _bring(SERVER, SHM),
}


@pytest.mark.parametrize("start", list(FUZZ_START))
@settings(max_examples=400)
@given(
    payload=FUZZ,
    cuts=st.lists(st.integers(0, 200), max_size=6),
    eof=st.booleans(),
    reads=st.lists(st.integers(0, 20), max_size=4),
)
def test_fuzz_only_remote_protocol_errors(
    start: str, payload: bytes, cuts: list[int], eof: bool, reads: list[int]
) -> None:
    cuts = [min(c, len(payload)) for c in cuts]
    _fuzz(FUZZ_START[start](), payload, cuts, eof, reads)


#### Efficiency


def test_bell_burst_is_one_event() -> None:
    server = _bring(SERVER, SHM)
    server.receive_data(b"\x01" * 10_000)
    assert drain(server) == [Bell()]


@pytest.mark.timeout(60)
def test_parsing_is_linear() -> None:
    # 20,000 small events in front of 20 MB of bells: copying the rest of the buffer per
    # event would move 400 GB; a linear parser takes milliseconds.
    server = _bring(SERVER, SHM)
    server.receive_data(b"\x01\x05" * 10_000 + b"\x01" * 20_000_000)
    started = time.perf_counter()
    events = drain(server)
    assert time.perf_counter() - started < 5
    assert len(events) == 20_001
    assert server.trailing_data == (b"", False)


def test_compaction_keeps_pending_bytes() -> None:
    client = _bring(CLIENT, SHM)
    assert client.role is CLIENT
    client.receive_data(b"\x01\x05" * 40_000 + fin_frame(12)[:3])
    assert len(drain(client)) == 80_000
    assert client.trailing_data == (fin_frame(12)[:3], False)
    client.receive_data(fin_frame(12)[3:] + b"\x01")
    assert drain(client) == [Fin(12), Bell()]
    assert client.trailing_data == (b"", False)


def test_tiny_chunks_are_linear() -> None:
    client = _bring(CLIENT, SHM)
    started = time.perf_counter()
    count = 0
    for _ in range(50_000):
        client.receive_data(b"\x01")
        client.receive_data(b"\x05")
        count += len(drain(client))
    assert count == 100_000
    assert time.perf_counter() - started < 10


#### Purity: no IO in the sans-IO core

FORBIDDEN = {
    "socket",
    "select",
    "selectors",
    "mmap",
    "os",
    "time",
    "threading",
    "_thread",
    "asyncio",
    "subprocess",
    "signal",
    "multiprocessing",
    "io",
}
#: cosock modules the core may import: errors, events, and _config for two constants.
ALLOWED_INTERNAL = {"_errors", "_events", "_config"}


@pytest.mark.parametrize("module", ["cosock._protocol", "cosock._events", "cosock._offer"])
def test_core_imports_no_io(module: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text(), spec.origin)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert node.module in ALLOWED_INTERNAL, f"{module} imports .{node.module}"
                continue
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "__import__", f"{module} calls __import__"
            continue
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN, f"{module} imports {name}"
            assert name.split(".")[0] != "importlib", f"{module} imports {name}"


#### Path switch (shm -> framed TCP) and upgrade (framed TCP -> shm)


def test_switch_resends_from_the_peers_consumed_offset() -> None:
    pair = ConnectionPair().accept()
    pair.client.data_sent(100)  # in the ring; the server takes 60 of it
    pair.server.data_received(60)
    pair.server.data_sent(7)
    assert pair.send(pair.server, Switch(60)) == [Switch(60)]
    assert pair.client.state is State.SWITCH_RECEIVED
    assert pair.client.resend_from == 60 and pair.client.tcp_next == 60
    with pytest.raises(LocalProtocolError, match="must carry the 0 bytes"):
        pair.client.send(Switch(7))  # it has read nothing of the server's 7
    assert pair.send(pair.client, Switch(0)) == [Switch(0)]
    assert pair.server.resend_from == 0
    assert pair.client.state is pair.server.state is State.FRAMED
    assert pair.client.tx_framed and pair.client.rx_framed
    # The resend: bytes 60..100 again, then new bytes; offsets keep counting one stream.
    assert pair.send(pair.client, Data(b"r" * 40), Data(b"n" * 5)) == [
        Data(b"r" * 40),
        Data(b"n" * 5),
    ]
    assert pair.client.sent_offset == 105 and pair.server.received_offset == 105
    assert pair.send(pair.server, Data(b"s" * 7)) == [Data(b"s" * 7)]
    assert pair.client.received_offset == 7 and pair.server.sent_offset == 7
    with pytest.raises(LocalProtocolError, match="after the switch"):
        pair.client.data_sent(1)
    with pytest.raises(LocalProtocolError, match="without an accepted channel"):
        pair.client.data_received(1)


def test_simultaneous_switch_from_both_sides() -> None:
    pair = ConnectionPair().accept()
    pair.client.data_sent(10)
    pair.server.data_received(10)
    to_server = pair.client.send(Switch(0))
    to_client = pair.server.send(Switch(10))
    pair.server.receive_data(to_server)
    pair.client.receive_data(to_client)
    assert drain(pair.server) == [Switch(0)] and drain(pair.client) == [Switch(10)]
    assert pair.client.state is pair.server.state is State.FRAMED
    assert pair.client.resend_from == 10 and pair.server.resend_from == 0


def test_switch_after_fin_resends_up_to_the_fin_only() -> None:
    pair = ConnectionPair().accept()
    pair.client.data_sent(50)
    assert pair.send(pair.client, Fin(50)) == [Fin(50)]
    pair.server.data_received(20)
    pair.send(pair.server, Switch(20))
    pair.send(pair.client, Switch(0))
    assert pair.send(pair.client, Data(b"x" * 30)) == [Data(b"x" * 30)]
    with pytest.raises(LocalProtocolError, match="beyond the FIN"):
        pair.client.send(Data(b"x"))
    assert pair.close(pair.client) == [Eof()]
    assert pair.server.eof_reached


def test_data_past_the_peers_fin_poisons_after_a_switch() -> None:
    pair = ConnectionPair().switch()
    assert pair.send(pair.client, Fin(0)) == [Fin(0)]  # nothing was ever sent
    pair.server.receive_data(b"\x07\x01\x00\x00\x00x")
    with pytest.raises(RemoteProtocolError, match="past its FIN"):
        pair.server.next_event()


@pytest.mark.parametrize("length", [0, MAX_DATA_FRAME + 1, 2**32 - 1])
def test_bad_data_frame_length_poisons(length: int) -> None:
    pair = ConnectionPair().switch()
    pair.server.receive_data(b"\x07" + length.to_bytes(4, "little"))
    with pytest.raises(RemoteProtocolError, match="DATA frame"):
        pair.server.next_event()
    assert pair.server.state is State.ERROR


def test_data_frames_survive_any_chunking() -> None:
    pair = ConnectionPair().switch()
    wire = pair.client.send(Data(b"hello")) + pair.client.send(Data(b"w" * 70000))
    for byte in wire[:-1]:
        pair.server.receive_data(bytes([byte]))
    events = drain(pair.server)
    assert events == [Data(b"hello")]
    pair.server.receive_data(wire[-1:])
    assert drain(pair.server) == [Data(b"w" * 70000)]


def test_upgrade_rejected_then_accepted() -> None:
    pair = ConnectionPair().switch()
    pair.send(pair.client, Data(b"abc"))
    assert pair.send(pair.client, Upgrade(OTHER_NONCE)) == [Upgrade(OTHER_NONCE)]
    assert pair.server.state is State.UPGRADE_RECEIVED
    assert not pair.server.verify_upgrade(NONCE)  # not the nonce of the new offer
    with pytest.raises(LocalProtocolError, match="not verified"):
        pair.server.send(Accept())
    assert pair.send(pair.server, Reject(FallbackReason.NO_OFFER)) == [
        Reject(FallbackReason.NO_OFFER)
    ]
    assert pair.client.state is pair.server.state is State.FRAMED
    assert pair.client.fallback is None  # still a cosock connection, just on TCP
    # Data keeps flowing both ways while an upgrade is pending.
    pair.send(pair.client, Upgrade(NONCE))
    assert pair.send(pair.client, Data(b"d")) == []  # parked: the server owes a verdict
    assert pair.server.verify_upgrade(NONCE)
    assert pair.send(pair.server, Accept()) == [Accept()]
    assert pair.client.state is State.UPGRADE_ACCEPTED and not pair.client.rx_framed
    assert pair.server.state is State.RING_AWAIT and not pair.server.tx_framed
    pair.server.data_sent(9)  # the server's data is in the new ring now
    pair.client.data_received(9)
    assert pair.send(pair.client, RingMark()) == [Data(b"d"), RingMark()]
    assert pair.client.state is pair.server.state is SHM
    pair.client.data_sent(4)
    pair.server.data_received(4)
    assert pair.client.sent_offset == 8 and pair.server.received_offset == 8
    assert pair.server.sent_offset == 9 and pair.client.received_offset == 9
    # ... and it can switch away again.
    assert pair.send(pair.server, Switch(8)) == [Switch(8)]
    assert pair.send(pair.client, Switch(9)) == [Switch(9)]
    assert pair.client.state is pair.server.state is State.FRAMED


def test_verify_upgrade_without_an_upgrade_is_a_local_error() -> None:
    pair = ConnectionPair().switch()
    with pytest.raises(LocalProtocolError, match="no Upgrade"):
        pair.server.verify_upgrade(NONCE)


#### Downgrade (shm or framed TCP -> plain, unframed TCP for good)


def test_downgrade_from_shm_resends_unframed_from_the_peers_consumed_offset() -> None:
    pair = ConnectionPair().accept()
    pair.client.data_sent(100)  # in the ring; the server took 60 of it
    pair.server.data_received(60)
    pair.server.data_sent(7)
    pair.client.data_received(7)
    assert pair.send(pair.client, Plain(7)) == [Plain(7)]
    assert pair.client.state is State.PLAIN_SENT and pair.server.state is State.PLAIN_RECEIVED
    assert pair.client.fallback is FallbackReason.HANDED_OVER and pair.server.fallback is None
    with pytest.raises(LocalProtocolError, match="after the fallback"):
        pair.client.data_sent(1)  # our ring is left for good
    with pytest.raises(LocalProtocolError, match="downgrade"):
        pair.client.data_received(0)
    for event in (Bell(), Fin(100), Data(b"x"), Switch(7)):
        with pytest.raises(LocalProtocolError):
            pair.client.send(event)  # nothing but the peer's marker until TCP
    pair.server.data_received(10)  # the server may still read before it answers
    with pytest.raises(LocalProtocolError, match="must carry the 70"):
        pair.server.send(Plain(60))
    wire = pair.server.send(Plain(70))
    assert pair.server.state is State.TCP and pair.server.resend_from == 7
    # The server's resend (nothing: the client read all 7), then new bytes, unframed;
    # frame-like bytes are data now.
    pair.client.receive_data(wire + b"\x01\x06new")
    assert normalise(drain(pair.client)) == [Plain(70), PlainData(b"\x01\x06new")]
    assert pair.client.state is State.TCP and pair.client.resend_from == 70
    pair.server.receive_data(b"r" * 30)
    assert drain(pair.server) == [PlainData(b"r" * 30)]
    assert pair.client.fallback is pair.server.fallback is FallbackReason.HANDED_OVER
    assert pair.close(pair.client) == [Eof()]


def test_downgrade_from_framed_never_resends_what_data_frames_carried() -> None:
    pair = ConnectionPair().switch()
    assert pair.send(pair.client, Data(b"abc")) == [Data(b"abc")]
    in_flight = pair.server.send(Data(b"xy"))  # crosses the client's Plain
    to_server = pair.client.send(Plain(0))
    pair.client.receive_data(in_flight)
    assert drain(pair.client) == [Data(b"xy")]
    assert pair.client.state is State.PLAIN_SENT
    pair.server.receive_data(to_server)
    assert drain(pair.server) == [Plain(0)]
    assert pair.server.resend_from == 2  # past its DATA frames, not the client's 0
    # A writer thread frames more before the server answers: the resend moves past it.
    framed = pair.server.send(Data(b"z"))
    assert pair.server.resend_from == 3
    pair.client.receive_data(framed + pair.server.send(Fin(3)))
    assert drain(pair.client) == [Data(b"z"), Fin(3)]
    pair.client.receive_data(pair.server.send(Plain(3)))
    assert drain(pair.client) == [Plain(3)]
    assert pair.client.resend_from == 3 and pair.server.resend_from == 3
    assert pair.client.state is pair.server.state is State.TCP


def test_downgrades_crossing_each_other() -> None:
    pair = ConnectionPair().accept()
    pair.client.data_sent(10)
    pair.server.data_received(4)
    to_server, to_client = pair.client.send(Plain(0)), pair.server.send(Plain(4))
    pair.server.receive_data(to_server)
    pair.client.receive_data(to_client)
    assert drain(pair.server) == [Plain(0)] and drain(pair.client) == [Plain(4)]
    assert pair.client.state is pair.server.state is State.TCP
    assert pair.client.resend_from == 4 and pair.server.resend_from == 0


def test_a_switch_crossing_a_downgrade_counts_as_its_answer() -> None:
    pair = ConnectionPair().accept()
    pair.server.data_sent(20)
    pair.client.data_received(5)
    to_server, to_client = pair.client.send(Plain(5)), pair.server.send(Switch(0))
    pair.server.receive_data(to_server)
    pair.client.receive_data(to_client)
    assert drain(pair.server) == [Plain(5)] and drain(pair.client) == [Switch(0)]
    assert pair.client.state is pair.server.state is State.TCP
    assert pair.server.resend_from == 5 and pair.client.resend_from == 0
    assert pair.client.fallback is pair.server.fallback is FallbackReason.HANDED_OVER


def test_an_upgrade_crossing_a_downgrade_is_dropped() -> None:
    pair = ConnectionPair().switch()
    to_server, to_client = pair.client.send(Upgrade(OTHER_NONCE)), pair.server.send(Plain(0))
    pair.server.receive_data(to_server)
    assert drain(pair.server) == [Upgrade(OTHER_NONCE)]
    assert pair.server.state is State.PLAIN_SENT
    with pytest.raises(LocalProtocolError):
        pair.server.verify_upgrade(OTHER_NONCE)  # nothing to answer: we are leaving
    pair.client.receive_data(to_client)
    assert drain(pair.client) == [Plain(0)]
    assert pair.client.state is State.PLAIN_RECEIVED
    assert pair.send(pair.client, Plain(0)) == [Plain(0)]
    assert pair.client.state is pair.server.state is State.TCP


def test_downgrade_after_fin_resends_up_to_the_fin() -> None:
    pair = ConnectionPair().accept()
    pair.client.data_sent(50)
    assert pair.send(pair.client, Fin(50)) == [Fin(50)]
    pair.server.data_received(20)
    pair.send(pair.server, Plain(20))
    assert pair.send(pair.client, Plain(0)) == [Plain(0)]
    assert pair.client.resend_from == 20 and pair.server.fin_received_offset == 50
    assert pair.close(pair.client) == [Eof()]


def test_peer_closing_mid_downgrade_and_lying_offsets() -> None:
    pair = ConnectionPair().accept()
    pair.client.send(Plain(0))
    assert pair.close(pair.server) == [Eof()]  # the socket layer reports the peer gone
    assert pair.client.state is State.CLOSED
    lying = ConnectionPair().accept()
    lying.client.send(Plain(0))
    lying.client.receive_data(b"\x0a" + (5).to_bytes(8, "little") + b"\x0b")
    with pytest.raises(RemoteProtocolError, match="only 0 bytes"):
        lying.client.next_event()


#### Property: any interleaving of data, SWITCH and upgrade keeps both streams exact

NONCE2 = bytes(range(200, 216))
RING_STATES = {State.SHM, State.RING_AWAIT, State.UPGRADE_ACCEPTED}


class _Side:
    """One end driven like the socket layer: writes go to the ring or into DATA frames,
    reads come from the peer's ring or from DATA frames, a SWITCH is answered with ours,
    an upgrade is verified and accepted.  The 'ring' is the peer's stream between the
    offsets its current ring started at and has reached."""

    def __init__(self, conn: Connection, stream: bytes) -> None:
        self.conn = conn
        self.stream = stream
        self.wire = bytearray()  # sent, not yet delivered to the peer
        self.ring_start = self.ring_head = 0  # our current ring, in our stream's offsets
        self.got = bytearray()  # what the application read
        self.plain_next: int | None = None  # after a downgrade: our next unframed byte
        self.refuse = False  # server: answer the next Upgrade with Reject

    def send(self, event: Event) -> None:
        self.wire += self.conn.send(event)

    def write(self, n: int) -> None:
        c = self.conn
        if self.plain_next is not None:
            chunk = self.stream[self.plain_next : self.plain_next + n]
            self.wire += chunk
            self.plain_next += len(chunk)
        elif c.state in RING_STATES and not c.tx_framed and not c.fin_sent:
            n = min(n, len(self.stream) - c.sent_offset)
            c.data_sent(n)
            self.ring_head = c.sent_offset
        elif c.tx_framed and c.state in (State.FRAMED, State.UPGRADE_SENT):
            chunk = self.stream[c.tcp_next : c.tcp_next + n]
            if chunk:
                self.send(Data(chunk))

    def read(self, peer: _Side, n: int) -> None:
        c = self.conn
        if c.rx_framed or c.state not in (
            *RING_STATES,
            State.SWITCH_RECEIVED,
            State.PLAIN_RECEIVED,
        ):
            return
        start = c.received_offset
        assert start >= peer.ring_start
        n = min(n, peer.ring_head - start)
        if n > 0:
            c.data_received(n)
            self.got += peer.stream[start : start + n]

    def _resend_owed(self) -> None:
        """Before our data moves into a ring, a resend still owed goes out framed."""
        c = self.conn
        if c.tcp_next < c.sent_offset:
            self.send(Data(self.stream[c.tcp_next : c.sent_offset]))

    def react(self, peer: _Side) -> None:
        # One event at a time, as the socket layer does: an answer we send changes the
        # state the next event is judged in (draining first judged an Upgrade that crossed
        # our downgrade in the state the peer's Plain answer had already moved us to).
        while (event := self.conn.next_event()) is not NEED_DATA:
            if isinstance(event, Data | PlainData):
                self.got += event.data
            elif isinstance(event, Switch) and self.conn.state is State.SWITCH_RECEIVED:
                self.send(Switch(self.conn.received_offset))
            elif isinstance(event, Plain) and self.conn.state is State.PLAIN_RECEIVED:
                self.send(Plain(self.conn.received_offset, event.reason))
            elif isinstance(event, Upgrade) and self.conn.state is State.PLAIN_SENT:
                pass  # crossed our downgrade: the client drops it
            elif isinstance(event, Upgrade) and self.refuse:
                self.refuse = False  # as when the offer is missing: the next one is taken
                self.send(Reject(FallbackReason.NO_OFFER))
            elif isinstance(event, Upgrade):
                assert self.conn.verify_upgrade(NONCE2)
                self._resend_owed()
                self.send(Accept())
                self.ring_start = self.ring_head = self.conn.sent_offset
            elif isinstance(event, Accept) and self.conn.state is State.UPGRADE_ACCEPTED:
                self._resend_owed()
                self.send(RingMark())
                self.ring_start = self.ring_head = self.conn.sent_offset
            if self.conn.state is State.TCP and self.plain_next is None:
                resend = self.conn.resend_from
                assert resend is not None
                self.plain_next = resend  # both markers are out: unframed from here
        if self.conn.state is State.TCP and self.plain_next is None:
            # (our answer was the last event's reaction, or the state moved on a marker)
            resend = self.conn.resend_from
            assert resend is not None
            self.plain_next = resend


STEPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "read", "deliver", "switch", "upgrade", "downgrade", "refuse"]),
        st.sampled_from([CLIENT, SERVER]),
        st.integers(1, 300),
    ),
    max_size=60,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(steps=STEPS)
@example(  # an Upgrade that crossed the server's downgrade, parsed with the Plain answer
    steps=[
        ("switch", SERVER, 1),
        ("deliver", SERVER, 9),
        ("deliver", CLIENT, 9),
        ("upgrade", CLIENT, 1),
        ("downgrade", SERVER, 1),
        ("deliver", SERVER, 10),
    ]
)
def test_switch_and_upgrade_interleavings_keep_both_streams_exact(
    steps: list[tuple[str, Role, int]],
) -> None:
    pair = _play(steps)
    hypothesis.event(f"final state {pair.client.state.value}/{pair.server.state.value}")


def _play(steps: Sequence[tuple[str, Role, int]]) -> ConnectionPair:
    """Run ``steps`` on a fresh accepted pair, settle, and check both streams are exact."""
    pair = ConnectionPair().accept()
    sides = {
        CLIENT: _Side(pair.client, bytes(i % 251 for i in range(5000))),
        SERVER: _Side(pair.server, bytes((i * 7) % 253 for i in range(5000))),
    }

    def other(role: Role) -> Role:
        return SERVER if role is CLIENT else CLIENT

    def deliver(role: Role, k: int) -> None:
        src, dst = sides[role], sides[other(role)]
        chunk, src.wire[:] = bytes(src.wire[:k]), src.wire[k:]
        if chunk:
            dst.conn.receive_data(chunk)
            dst.react(src)

    for op, role, n in steps:
        me, peer = sides[role], sides[other(role)]
        if op == "write":
            me.write(n)
        elif op == "read":
            me.read(peer, n)
        elif op == "deliver":
            deliver(role, n)
        elif op == "switch" and me.conn.state is State.SHM:
            me.send(Switch(me.conn.received_offset))
        elif op == "upgrade" and role is CLIENT and me.conn.state is State.FRAMED:
            me.send(Upgrade(NONCE2))
        elif op == "downgrade" and me.conn.state in (State.SHM, State.FRAMED):
            me.send(Plain(me.conn.received_offset))
        elif op == "refuse" and role is SERVER:
            me.refuse = True
    # Let everything settle: deliver, read and write until nothing moves.
    for _ in range(200):
        for role in Role:
            sides[role].write(10_000)
            sides[role].read(sides[other(role)], 10_000)
            deliver(role, len(sides[role].wire))
    for role in Role:
        side, peer = sides[role], sides[other(role)]
        assert bytes(side.got) == peer.stream, (role, side.conn.state, len(side.got))
    return pair


def test_the_interleaving_property_reaches_every_path() -> None:
    """The property's driver really goes through a switch and an upgrade."""
    script = [
        ("write", CLIENT, 300),
        ("write", SERVER, 200),
        ("read", SERVER, 100),
        ("switch", SERVER, 0),
        ("write", CLIENT, 50),
        ("deliver", SERVER, 50),
        ("deliver", CLIENT, 50),
        ("deliver", SERVER, 50),
        ("upgrade", CLIENT, 0),
        ("deliver", CLIENT, 100),
        ("deliver", SERVER, 100),
        ("write", SERVER, 100),
        ("deliver", CLIENT, 100),
        ("switch", CLIENT, 0),
    ]
    pair = _play(script)
    # Switched, then upgraded back (the last switch came while the upgrade was pending).
    assert pair.client.state is pair.server.state is SHM
    assert pair.client.sent_offset == pair.server.received_offset == 5000


@pytest.mark.parametrize(
    "script",
    [
        # From shm, with unread ring bytes both ways.
        [
            ("write", CLIENT, 300),
            ("write", SERVER, 200),
            ("read", SERVER, 100),
            ("downgrade", SERVER, 0),
        ],
        # From framed TCP, with DATA frames in flight both ways.
        [
            ("write", CLIENT, 300),
            ("switch", CLIENT, 0),
            ("deliver", CLIENT, 100),
            ("deliver", SERVER, 100),
            ("write", CLIENT, 50),
            ("write", SERVER, 70),
            ("downgrade", CLIENT, 0),
            ("deliver", CLIENT, 100),
        ],
        # Crossing a switch, and crossing a pending upgrade.
        [("write", SERVER, 100), ("switch", SERVER, 0), ("downgrade", CLIENT, 0)],
        [
            ("switch", CLIENT, 0),
            ("deliver", CLIENT, 50),
            ("deliver", SERVER, 50),
            ("upgrade", CLIENT, 0),
            ("downgrade", SERVER, 0),
            ("write", CLIENT, 40),
        ],
    ],
    ids=["from-shm", "from-framed", "crossing-switch", "crossing-upgrade"],
)
def test_the_interleaving_property_reaches_every_downgrade(
    script: list[tuple[str, Role, int]],
) -> None:
    pair = _play(script)
    assert pair.client.state is pair.server.state is State.TCP
    assert pair.client.fallback is pair.server.fallback is FallbackReason.HANDED_OVER
