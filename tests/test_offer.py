"""Tests for the offer datagram payload: ``cosock._offer``."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosock import LocalProtocolError, RemoteProtocolError
from cosock._config import MAX_RING_SIZE, MIN_RING_SIZE
from cosock._offer import OFFER_MAGIC, OFFER_SIZE, OFFER_VERSION, Offer, normalise_host

NONCE = bytes(range(16))
LAYOUT = struct.Struct("<4sBB16sH16sH16sQI")


def mapped(v4: str) -> bytes:
    return ipaddress.IPv6Address(f"::ffff:{v4}").packed


def v6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


DEFAULTS: dict[str, Any] = {
    "magic": b"CSKO",
    "version": 1,
    "family": 4,
    "client_ip": mapped("10.0.0.2"),
    "client_port": 40000,
    "server_ip": mapped("10.0.0.3"),
    "server_port": 8080,
    "nonce": NONCE,
    "capacity": 1 << 20,
    "flags": 0,
}


def raw(**fields: Any) -> bytes:
    """A payload built field by field (independently of the code under test)."""
    values = {**DEFAULTS, **fields}
    return LAYOUT.pack(*(values[name] for name in DEFAULTS))


def sample() -> Offer:
    return Offer(
        client=("10.0.0.2", 40000),
        server=("10.0.0.3", 8080),
        nonce=NONCE,
        capacity=1 << 20,
        family=4,
    )


#### Encoding


def test_golden_layout() -> None:
    data = sample().encode()
    assert len(data) == OFFER_SIZE == 70
    assert data == raw()
    assert data == (
        b"CSKO\x01\x04"
        + b"\x00" * 10
        + b"\xff\xff\x0a\x00\x00\x02"
        + (40000).to_bytes(2, "little")
        + b"\x00" * 10
        + b"\xff\xff\x0a\x00\x00\x03"
        + (8080).to_bytes(2, "little")
        + NONCE
        + (1 << 20).to_bytes(8, "little")
        + b"\x00\x00\x00\x00"
    )
    assert (OFFER_MAGIC, OFFER_VERSION) == (b"CSKO", 1)


def test_decode_of_golden_bytes() -> None:
    offer = Offer.decode(raw())
    assert offer == sample()
    assert offer.key == ("10.0.0.2", 40000, "10.0.0.3", 8080)
    assert Offer.decode(bytearray(raw())) == Offer.decode(memoryview(raw())) == offer


def test_nonce_is_not_in_repr() -> None:
    assert NONCE.hex() not in repr(sample()) and repr(NONCE) not in repr(sample())


@pytest.mark.parametrize(
    ("family", "client", "server", "key"),
    [
        (4, "::ffff:10.0.0.2", "10.0.0.3", ("10.0.0.2", 1, "10.0.0.3", 2)),
        (6, "::ffff:127.0.0.1", "127.0.0.1", ("127.0.0.1", 1, "127.0.0.1", 2)),
        (
            6,
            "2001:0db8:0000:0000:0000:0000:0000:0001",
            "2001:DB8::2",
            ("2001:db8::1", 1, "2001:db8::2", 2),
        ),
        (6, "fe80::1%eth0", "fe80::2%2", ("fe80::1", 1, "fe80::2", 2)),
        (6, "::1", "::1", ("::1", 1, "::1", 2)),
    ],
)
def test_key_is_normalised(family: int, client: str, server: str, key: tuple[Any, ...]) -> None:
    offer = Offer((client, 1), (server, 2), NONCE, MIN_RING_SIZE, family)
    assert offer.key == key
    assert Offer.decode(offer.encode()) == offer
    assert (normalise_host(client), normalise_host(server)) == (key[0], key[2])


def test_normalise_host_refuses_names() -> None:
    with pytest.raises(ValueError):
        normalise_host("localhost")


#### Round trips


def _usable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """An address a TCP endpoint can have, not written v4-mapped."""
    if address.is_unspecified or address.is_multicast:
        return False
    return not (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped)


V4 = st.ip_addresses(v=4).filter(_usable)
V6 = st.ip_addresses(v=6).filter(_usable)
PORTS = st.integers(1, 65535)
CAPACITIES = st.integers(MIN_RING_SIZE.bit_length() - 1, MAX_RING_SIZE.bit_length() - 1).map(
    lambda e: 1 << e
)
NONCES = st.binary(min_size=16, max_size=16)


@st.composite
def offers(draw: st.DrawFn) -> Offer:
    kind = draw(st.sampled_from(["v4", "v4-mapped", "dual-stack", "v6"]))
    if kind == "v6":
        client, server, family = draw(V6), draw(V6), 6
        texts = [str(client), str(server)]
    else:
        client, server = draw(V4), draw(V4)
        family = 6 if kind == "dual-stack" else 4
        mapped_text = kind != "v4" and draw(st.booleans())
        texts = [f"::ffff:{a}" if mapped_text else str(a) for a in (client, server)]
    return Offer(
        client=(texts[0], draw(PORTS)),
        server=(texts[1], draw(PORTS)),
        nonce=draw(NONCES),
        capacity=draw(CAPACITIES),
        family=family,
    )


@given(offers())
def test_round_trip(offer: Offer) -> None:
    data = offer.encode()
    assert len(data) == OFFER_SIZE
    decoded = Offer.decode(data)
    assert decoded == offer
    assert decoded.encode() == data
    client_ip, client_port, server_ip, server_port = decoded.key
    assert (client_port, server_port) == (offer.client[1], offer.server[1])
    for text in (client_ip, server_ip):
        assert normalise_host(text) == text  # already canonical
        assert ipaddress.ip_address(text).version == (4 if "." in text else 6)


#### Malformations: each rejected with a precise RemoteProtocolError

MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "not a cosock offer"),
    ("three bytes", b"CSK", "not a cosock offer"),
    ("magic only", b"CSKO", "no version byte"),
    ("bad magic", b"XSKO" + raw()[4:], "not a cosock offer"),
    ("bad version", raw(version=2), "unsupported offer version 2"),
    ("version 0", raw(version=0), "unsupported offer version 0"),
    ("short", raw()[:-1], "too short: 69 bytes"),
    ("header only", raw()[:6], "too short: 6 bytes"),
    ("long", raw() + b"\x00", "too long: 71 bytes"),
    ("flags", raw(flags=1), "unknown offer flags 0x00000001"),
    ("high flags", raw(flags=0x80000000), "unknown offer flags 0x80000000"),
    ("family 0", raw(family=0), "family must be 4 or 6, not 0"),
    ("family AF_INET", raw(family=2), "family must be 4 or 6, not 2"),
    ("family AF_INET6", raw(family=10), "family must be 4 or 6, not 10"),
    ("v4 client not mapped", raw(client_ip=v6("2001:db8::1")), "client address 2001:db8::1"),
    ("v4 server not mapped", raw(server_ip=v6("2001:db8::1")), "server address 2001:db8::1"),
    ("v4-compatible is not mapped", raw(client_ip=v6("::10.0.0.2")), "not v4-mapped"),
    (
        "v6 family, mixed versions",
        raw(family=6, server_ip=v6("2001:db8::1")),
        "not the same IP version",
    ),
    ("client port 0", raw(client_port=0), "client port must be in 1..65535, not 0"),
    ("server port 0", raw(server_port=0), "server port must be in 1..65535, not 0"),
    ("client unspecified", raw(client_ip=mapped("0.0.0.0")), "client address 0.0.0.0 is unspec"),
    ("server unspecified v6", raw(family=6, client_ip=v6("::1"), server_ip=v6("::")), "unspec"),
    ("multicast", raw(server_ip=mapped("224.0.0.1")), "server address 224.0.0.1 is multicast"),
    ("capacity 0", raw(capacity=0), "capacity 0 is not a power of two"),
    ("capacity 3 pages", raw(capacity=3 * 4096), "capacity 12288 is not a power of two"),
    ("capacity huge", raw(capacity=2**64 - 1), "is not a power of two"),
    ("capacity too small", raw(capacity=MIN_RING_SIZE // 2), f"outside {MIN_RING_SIZE}"),
    ("capacity too big", raw(capacity=MAX_RING_SIZE * 2), f"..{MAX_RING_SIZE}"),
    ("capacity 2**63", raw(capacity=2**63), "outside"),
]


@pytest.mark.parametrize(
    ("data", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_offers_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        Offer.decode(data)
    assert message in str(info.value)


def test_boundaries_are_accepted() -> None:
    for capacity in (MIN_RING_SIZE, MAX_RING_SIZE):
        assert Offer.decode(raw(capacity=capacity)).capacity == capacity
    assert Offer.decode(raw(client_port=65535, server_port=1)).key[1::2] == (65535, 1)


#### Local construction: the same checks, as LocalProtocolError


@pytest.mark.parametrize(
    "fields",
    [
        {"family": 5},
        {"family": True},
        {"client": ("10.0.0.2",)},
        {"client": ["10.0.0.2", 1]},
        {"client": (b"10.0.0.2", 1)},
        {"client": ("example.com", 1)},
        {"client": ("10.0.0.2", 0)},
        {"client": ("10.0.0.2", 65536)},
        {"client": ("10.0.0.2", True)},
        {"server": ("0.0.0.0", 1)},
        {"server": ("2001:db8::1", 1)},
        {"family": 6, "server": ("2001:db8::1", 1)},
        {"client": ("2001:db8::1", 1), "server": ("2001:db8::2", 1)},
        {"nonce": NONCE[:15]},
        {"nonce": bytearray(NONCE)},
        {"capacity": 5000},
        {"capacity": MIN_RING_SIZE // 2},
        {"capacity": MAX_RING_SIZE * 2},
        {"capacity": float(MIN_RING_SIZE)},
    ],
)
def test_invalid_offers_cannot_be_built(fields: dict[str, Any]) -> None:
    values: dict[str, Any] = {
        "client": ("10.0.0.2", 40000),
        "server": ("10.0.0.3", 8080),
        "nonce": NONCE,
        "capacity": 1 << 20,
        "family": 4,
        **fields,
    }
    with pytest.raises(LocalProtocolError):
        Offer(**values)


def test_offer_is_frozen() -> None:
    offer = sample()
    with pytest.raises(AttributeError):
        offer.capacity = 1  # type: ignore[misc]


#### Fuzzing: RemoteProtocolError, or an offer that re-encodes to the same bytes


def _decode_or_reject(data: bytes) -> None:
    try:
        offer = Offer.decode(data)
    except RemoteProtocolError:
        return
    assert offer.encode() == data  # anything accepted is canonical


@settings(max_examples=500)
@given(st.binary(max_size=100))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _decode_or_reject(data)


@settings(max_examples=500)
@given(st.binary(min_size=OFFER_SIZE - 5, max_size=OFFER_SIZE - 5))
def test_fuzz_well_framed_bytes(body: bytes) -> None:
    _decode_or_reject(b"CSKO\x01" + body)


@settings(max_examples=500)
@given(
    offers(),
    st.lists(st.tuples(st.integers(0, OFFER_SIZE - 1), st.integers(0, 255)), max_size=4),
)
def test_fuzz_mutated_offers(offer: Offer, edits: list[tuple[int, int]]) -> None:
    data = bytearray(offer.encode())
    for index, value in edits:
        data[index] = value
    _decode_or_reject(bytes(data))
