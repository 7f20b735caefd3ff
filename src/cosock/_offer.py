"""The offer datagram: what a client sends to a listener's rendezvous Unix socket.

The offer says "the TCP connection with this 4-tuple, which I am about to open, may use
the shared-memory channel in the memfd that comes with this datagram (SCM_RIGHTS)". This
module only encodes and decodes the payload; the socket layer does the IO and passes the
fd. The receiver does not trust the sender: ``Offer.decode`` checks every field and raises
``RemoteProtocolError`` with a precise message for every malformation.

Layout (70 bytes, integers little-endian like the control frames):

====== ==== ===============================================================
offset size field
====== ==== ===============================================================
0      4    magic ``b"CSKO"``
4      1    version, 1
5      1    family: 4 or 6 (the client socket's; 6 may carry v4-mapped addresses)
6      16   client IP (IPv4 as v4-mapped ``::ffff:a.b.c.d``)
22     2    client port (1..65535)
24     16   server IP
40     2    server port
42     16   nonce (also sent in-band in HELLO)
58     8    ring capacity per direction: a power of two, MIN_RING_SIZE..MAX_RING_SIZE
66     4    flags, 0 (reserved)
====== ==== ===============================================================
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Final

from ._config import MAX_RING_SIZE, MIN_RING_SIZE
from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._events import NONCE_SIZE

__all__ = ["OFFER_MAGIC", "OFFER_SIZE", "OFFER_VERSION", "Offer", "normalise_host"]

OFFER_MAGIC: Final = b"CSKO"
OFFER_VERSION: Final = 1
_LAYOUT: Final = struct.Struct("<4sBB16sH16sH16sQI")
#: Size of a version-1 offer payload in bytes.
OFFER_SIZE: Final = _LAYOUT.size

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def normalise_host(host: str) -> str:
    """The canonical text of an IP address, as ``Offer.key`` uses it.

    IPv4-mapped IPv6 becomes plain IPv4 (a dual-stack socket's ``getpeername()`` says
    ``::ffff:10.0.0.1`` where the other end says ``10.0.0.1``), IPv6 is compressed and a
    scope id (``fe80::1%eth0``) is dropped, since the offer has no room for it. Apply it to
    ``getpeername()[0]``/``getsockname()[0]`` before comparing them with ``Offer.key``.
    Cached: every connection set-up normalises the same few addresses several times.

    Raises:
        ValueError: ``host`` is not an IP address.
    """
    return str(_address(host))


@functools.lru_cache(maxsize=4096)
def _address(host: str) -> _IPAddress:
    """Parsed, unmapped address; cached because ``ipaddress`` costs ~20 µs a parse here
    and connection set-up parses the same few addresses over and over."""
    return _unmap(ipaddress.ip_address(host.partition("%")[0]))


def _unmap(address: _IPAddress) -> _IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _packed(address: _IPAddress) -> bytes:
    if isinstance(address, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + address.packed
    return address.packed


def _check_endpoint(
    name: str, endpoint: object, error: type[ProtocolError]
) -> tuple[_IPAddress, str, int]:
    """Parse and check one (host, port) pair: the address, its normalised text and the port;
    raise ``error`` with a precise message."""
    if not (isinstance(endpoint, tuple) and len(endpoint) == 2):
        raise error(f"{name} must be a (host, port) tuple, not {endpoint!r}")
    host, port = endpoint
    if not isinstance(host, str):
        raise error(f"{name} host must be a str, not {host!r}")
    try:
        address, text, unfit = _endpoint_facts(host)
    except ValueError:
        raise error(f"{name} host {host!r} is not an IP address") from None
    if unfit:
        raise error(f"{name} address {address} is {unfit}")
    if type(port) is not int or not 0 < port < 65536:
        raise error(f"{name} port must be in 1..65535, not {port!r}")
    return address, text, port


@functools.lru_cache(maxsize=4096)
def _endpoint_facts(host: str) -> tuple[_IPAddress, str, str]:
    """Parsed address, its normalised text, and why it cannot be an endpoint ("" if it
    can); cached, since ``ipaddress``'s network-membership properties cost microseconds.

    Raises:
        ValueError: ``host`` is not an IP address (not cached).
    """
    address = _address(host)
    unfit = "unspecified" if address.is_unspecified else ""
    if not unfit and address.is_multicast:
        unfit = "multicast"
    return address, str(address), unfit


def _check(
    client: object,
    server: object,
    nonce: object,
    capacity: object,
    family: object,
    error: type[ProtocolError],
) -> tuple[tuple[str, int], tuple[str, int]]:
    """Check every field of an offer; return the normalised endpoints."""
    if type(family) is not int or family not in (4, 6):
        raise error(f"offer family must be 4 or 6, not {family!r}")
    client_address, client_text, client_port = _check_endpoint("client", client, error)
    server_address, server_text, server_port = _check_endpoint("server", server, error)
    if client_address.version != server_address.version:
        raise error(
            f"client {client_address} and server {server_address} are not the same IP version"
        )
    if family == 4 and client_address.version != 4:
        raise error(f"family 4 offer with IPv6 addresses ({client_address}, {server_address})")
    if type(nonce) is not bytes or len(nonce) != NONCE_SIZE:
        raise error(f"offer nonce must be {NONCE_SIZE} bytes")
    if type(capacity) is not int or capacity <= 0 or capacity & (capacity - 1):
        raise error(f"ring capacity {capacity!r} is not a power of two")
    if not MIN_RING_SIZE <= capacity <= MAX_RING_SIZE:
        raise error(f"ring capacity {capacity} is outside {MIN_RING_SIZE}..{MAX_RING_SIZE}")
    return (client_text, client_port), (server_text, server_port)


@dataclass(frozen=True, slots=True)
class Offer:
    """A shared-memory channel offered for one TCP connection.

    Addresses are normalised on construction (see ``normalise_host``), so equal offers
    compare equal and ``decode(encode(o)) == o``.

    Raises:
        LocalProtocolError: a field is invalid (the same checks ``decode`` makes).
    """

    client: tuple[str, int]
    server: tuple[str, int]
    nonce: bytes = field(repr=False)
    capacity: int
    family: int

    def __post_init__(self) -> None:
        client, server = _check(
            self.client, self.server, self.nonce, self.capacity, self.family, LocalProtocolError
        )
        object.__setattr__(self, "client", client)
        object.__setattr__(self, "server", server)

    @property
    def key(self) -> tuple[str, int, str, int]:
        """``(client_ip, client_port, server_ip, server_port)``, normalised for matching."""
        return (*self.client, *self.server)

    def encode(self) -> bytes:
        """The datagram payload (OFFER_SIZE bytes)."""
        return _LAYOUT.pack(
            OFFER_MAGIC,
            OFFER_VERSION,
            self.family,
            _packed(_address(self.client[0])),
            self.client[1],
            _packed(_address(self.server[0])),
            self.server[1],
            self.nonce,
            self.capacity,
            0,
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Offer:
        """Parse and validate a received payload.

        Raises:
            RemoteProtocolError: the payload is malformed in any way.
        """
        data = bytes(data)
        if len(data) < len(OFFER_MAGIC) or not data.startswith(OFFER_MAGIC):
            raise RemoteProtocolError(
                f"not a cosock offer: starts with {data[: len(OFFER_MAGIC)]!r}, "
                f"expected {OFFER_MAGIC!r}"
            )
        if len(data) == len(OFFER_MAGIC):
            raise RemoteProtocolError("offer too short: no version byte")
        if data[4] != OFFER_VERSION:
            raise RemoteProtocolError(
                f"unsupported offer version {data[4]} (expected {OFFER_VERSION})"
            )
        if len(data) != OFFER_SIZE:
            raise RemoteProtocolError(
                f"offer too {'short' if len(data) < OFFER_SIZE else 'long'}: "
                f"{len(data)} bytes, version {OFFER_VERSION} has {OFFER_SIZE}"
            )
        (_, _, family, client_ip, client_port, server_ip, server_port, nonce, capacity, flags) = (
            _LAYOUT.unpack(data)
        )
        if flags:
            raise RemoteProtocolError(f"unknown offer flags 0x{flags:08x}")
        if family not in (4, 6):
            raise RemoteProtocolError(f"offer family must be 4 or 6, not {family}")
        hosts = []
        for name, raw in (("client", client_ip), ("server", server_ip)):
            text, v4_mapped = _unpacked(raw)
            if family == 4 and not v4_mapped:
                raise RemoteProtocolError(
                    f"family 4 offer with {name} address {text}, which is not v4-mapped"
                )
            hosts.append(text)
        try:  # __post_init__ makes every other check, once
            return cls(
                client=(hosts[0], client_port),
                server=(hosts[1], server_port),
                nonce=nonce,
                capacity=capacity,
                family=family,
            )
        except LocalProtocolError as exc:
            raise RemoteProtocolError(str(exc)) from None


@functools.lru_cache(maxsize=4096)
def _unpacked(raw: bytes) -> tuple[str, bool]:
    """Text of a 16-byte address field and whether it is v4-mapped; cached, since parsing
    with ``ipaddress`` is most of the cost of decoding an offer."""
    address = ipaddress.IPv6Address(raw)
    return str(address), address.ipv4_mapped is not None
