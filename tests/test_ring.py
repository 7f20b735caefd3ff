"""Rings in a real memfd mapping: wrap-around, full, empty, and a hostile peer's headers."""

from __future__ import annotations

import fcntl
import mmap
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosock import RingCorrupted
from cosock._ring import (
    _CAPACITY,
    _HEAD,
    _MAGIC,
    _TAIL,
    HEADER_SIZE,
    RingReader,
    RingWriter,
    channel_size,
    create_channel_fd,
    map_channel_fd,
)

CAP = 4096


@pytest.fixture
def channel():
    fd = create_channel_fd(CAP)
    mm = map_channel_fd(fd, CAP)
    os.close(fd)
    ends = [RingWriter(mm, 0, CAP), RingReader(mm, 0, CAP)]
    yield ends[0], ends[1], mm
    for end in ends:
        end.release()
    mm.close()


def header(mm: mmap.mmap, index: int = 0) -> memoryview:
    base = index * (HEADER_SIZE + CAP)
    return memoryview(mm)[base : base + HEADER_SIZE].cast("Q")


def drain(reader: RingReader, n: int) -> bytes:
    buf = bytearray(n)
    reader.read_into(memoryview(buf), n)
    return bytes(buf)


def test_empty_ring_has_nothing(channel):
    writer, reader, _ = channel
    assert reader.available() == 0
    assert writer.free() == CAP


def test_full_ring_takes_no_more(channel):
    writer, reader, _ = channel
    assert writer.write(memoryview(b"a" * (CAP + 100)), writer.free()) == CAP
    assert writer.free() == 0
    assert writer.write(memoryview(b"b"), writer.free()) == 0
    assert reader.available() == CAP
    assert drain(reader, CAP) == b"a" * CAP
    assert writer.free() == CAP


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=3 * CAP), min_size=1, max_size=40))
def test_bytes_come_out_in_order_across_wraps(sizes):
    fd = create_channel_fd(CAP)
    mm = map_channel_fd(fd, CAP)
    os.close(fd)
    writer, reader = RingWriter(mm, 0, CAP), RingReader(mm, 0, CAP)
    sent, received = bytearray(), bytearray()
    for i, size in enumerate(sizes):
        chunk = bytes((i + j) % 251 for j in range(size))
        n = writer.write(memoryview(chunk), writer.free())
        sent += chunk[:n]
        take = min(reader.available(), max(1, size // 2))
        received += drain(reader, take)
    received += drain(reader, reader.available())
    assert received == sent
    writer.release()
    reader.release()
    mm.close()


def test_peek_does_not_consume(channel):
    writer, reader, _ = channel
    writer.write(memoryview(b"hello"), writer.free())
    buf = bytearray(5)
    reader.read_into(memoryview(buf), 5, peek=True)
    assert bytes(buf) == b"hello"
    assert reader.available() == 5


def test_unsent_bytes_are_retained_for_resend(channel):
    writer, _, _ = channel
    writer.write(memoryview(b"x" * 3000), writer.free())
    assert writer.unsent_bytes(0) == b"x" * 3000


@pytest.mark.parametrize(
    "bad_head",
    [CAP + 1, 2**64 - 1, 2**63],
    ids=["past-capacity", "huge", "sign-bit"],
)
def test_hostile_head_is_rejected(channel, bad_head):
    _, reader, mm = channel
    header(mm)[_HEAD] = bad_head
    with pytest.raises(RingCorrupted, match="head"):
        reader.available()


def test_head_going_backwards_is_rejected(channel):
    writer, reader, mm = channel
    writer.write(memoryview(b"abc"), writer.free())
    assert reader.available() == 3
    header(mm)[_HEAD] = 1
    with pytest.raises(RingCorrupted):
        reader.available()


@pytest.mark.parametrize("bad_tail", [10, 2**64 - 1])
def test_hostile_tail_is_rejected(channel, bad_tail):
    writer, _, mm = channel
    writer.write(memoryview(b"abc"), writer.free())
    header(mm)[_TAIL] = bad_tail  # beyond what we ever wrote
    with pytest.raises(RingCorrupted, match="tail"):
        writer.free()


def test_tail_going_backwards_is_rejected(channel):
    writer, reader, mm = channel
    writer.write(memoryview(b"abcdef"), writer.free())
    drain(reader, 4)
    assert writer.free() == CAP - 2
    header(mm)[_TAIL] = 1
    with pytest.raises(RingCorrupted):
        writer.free()


def test_map_rejects_unsealed_fd():
    fd = os.memfd_create("x", os.MFD_CLOEXEC)  # no sealing allowed
    os.ftruncate(fd, channel_size(CAP))
    with pytest.raises(RingCorrupted, match="seal"):
        map_channel_fd(fd, CAP)
    os.close(fd)


def test_map_rejects_non_memfd(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"\0" * channel_size(CAP))
    fd = os.open(path, os.O_RDWR)
    with pytest.raises(RingCorrupted):
        map_channel_fd(fd, CAP)
    os.close(fd)


def test_map_rejects_wrong_size_claim():
    fd = create_channel_fd(CAP)
    with pytest.raises(RingCorrupted, match="size"):
        map_channel_fd(fd, CAP * 2)
    os.close(fd)


def test_sealed_memfd_cannot_shrink_under_us():
    fd = create_channel_fd(CAP)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 4096)
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    os.close(fd)


@pytest.mark.parametrize("slot,value", [(_MAGIC, 0xDEADBEEF), (_CAPACITY, 8192)])
def test_map_rejects_bad_header(slot, value):
    fd = create_channel_fd(CAP)
    with mmap.mmap(fd, channel_size(CAP)) as mm:
        view = memoryview(mm)[:HEADER_SIZE].cast("Q")
        view[slot] = value
        view.release()
    with pytest.raises(RingCorrupted, match="header"):
        map_channel_fd(fd, CAP)
    os.close(fd)


@pytest.mark.parametrize("capacity", [0, 1000, 4097])
def test_capacity_must_be_power_of_two(capacity):
    with pytest.raises(ValueError):
        create_channel_fd(capacity)


def test_a_spin_yields_at_every_turn_only_while_its_cpu_is_shared() -> None:
    """A yield that let another task run briefly (the peer, on our CPU) makes the spinner
    yield at every turn; a yield nobody wanted restores the normal cadence."""
    from cosock._ring import CONTENDED_NS, SHARED_NS, YIELD_MASK, spin_yield_mask, yield_cpu

    assert yield_cpu() >= 0
    assert spin_yield_mask(800) == YIELD_MASK  # ~1 µs: the CPU was ours alone
    assert spin_yield_mask(SHARED_NS + 1) == 0
    assert spin_yield_mask(CONTENDED_NS - 1) == 0
