"""The ivshmem pool library on the host side: the pool file is the same memory a guest maps as
BAR2, so layout, validation, slot mappings and rings are all checked here without a VM (the
VM side is in test_lab_qemu.py)."""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from cosock._errors import RingCorrupted
from cosock._ivshmem import (
    POOL_HEADER_SIZE,
    Pool,
    PoolError,
    SlotTable,
    find_device,
    plan,
)
from cosock._ring import RingReader, RingWriter, channel_size

CAP = 64 << 10


@pytest.fixture
def pool_file(tmp_path: Path) -> Iterator[Path]:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    path = base / f"cosock-test-{os.getpid()}-{id(tmp_path)}.ivshmem"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    yield path
    path.unlink()


def test_plan_fits_slots_after_the_header() -> None:
    layout = plan(1 << 20, CAP)
    assert layout.slot_size == channel_size(CAP)
    assert layout.data_offset == POOL_HEADER_SIZE
    assert layout.data_offset + layout.slot_count * layout.slot_size <= 1 << 20
    assert layout.data_offset + (layout.slot_count + 1) * layout.slot_size > 1 << 20
    with pytest.raises(PoolError, match="holds no channel"):
        plan(8192, CAP)


def test_format_then_layout_round_trips(pool_file: Path) -> None:
    with Pool(pool_file) as pool:
        with pytest.raises(PoolError, match="not a formatted cosock pool"):
            pool.layout()
        written = pool.format(CAP)
        assert pool.layout() == written


@pytest.mark.parametrize(
    "field,value",
    [(2, 3000), (3, 4096), (4, 10_000), (5, 100)],
    ids=["capacity-not-power-of-two", "slot-size", "too-many-slots", "unaligned-offset"],
)
def test_a_forged_header_is_refused(pool_file: Path, field: int, value: int) -> None:
    with Pool(pool_file) as pool:
        pool.format(CAP)
        with open(pool_file, "r+b") as f:
            f.seek(field * 8)
            f.write(struct.pack("<Q", value))
        with pytest.raises(PoolError):
            pool.layout()


def test_a_slot_is_a_channel_for_the_projects_rings(pool_file: Path) -> None:
    """Two independent mappings of one slot (as two guests would have) carry bytes through
    RingWriter/RingReader; the neighbouring slot is untouched."""
    with Pool(pool_file) as a, Pool(pool_file) as b:
        layout = a.format(CAP)
        a.format_slot(layout, 1)
        assert b.slot_ok(layout, 1) and not b.slot_ok(layout, 2)
        mw, mr = a.map_slot(layout, 1), b.map_slot(layout, 1)
        tx, rx = RingWriter(mw, 0, CAP), RingReader(mr, 0, CAP)
        data = os.urandom(5 * CAP + 123)
        out = bytearray()
        buf = memoryview(bytearray(CAP))
        sent = 0
        while len(out) < len(data):
            sent += tx.write(memoryview(data)[sent:], tx.free())
            n = rx.available()
            rx.read_into(buf, n)
            out += buf[:n]
        assert hashlib.sha256(out).digest() == hashlib.sha256(data).digest()
        with open(pool_file, "rb") as f:  # slot 2 still zero: the mapping stayed in its slot
            f.seek(layout.offset(2))
            assert f.read(layout.slot_size) == bytes(layout.slot_size)
        # A peer that writes nonsense into the shared counters resets only this channel.
        hdr = memoryview(mw)[:4096].cast("Q")
        hdr[8] = 1 << 62
        with pytest.raises(RingCorrupted):
            rx.available()
        hdr.release()
        for ring in (tx, rx):
            ring.release()
        mw.close()
        mr.close()


def test_slots_outside_the_pool_are_refused(pool_file: Path) -> None:
    with Pool(pool_file) as pool:
        layout = pool.format(CAP)
        for bad in (-1, layout.slot_count):
            with pytest.raises(PoolError, match="outside the pool"):
                pool.map_slot(layout, bad)
    assert mmap.ALLOCATIONGRANULARITY <= POOL_HEADER_SIZE


def test_find_device_in_a_sysfs_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COSOCK_IVSHMEM", raising=False)
    for bdf, ids in {
        "0000:00:02.0": ("0x1af4", "0x1000"),
        "0000:00:04.0": ("0x1af4", "0x1110"),
    }.items():
        dev = tmp_path / bdf
        dev.mkdir()
        (dev / "vendor").write_text(ids[0] + "\n")
        (dev / "device").write_text(ids[1] + "\n")
    assert find_device(tmp_path) == tmp_path / "0000:00:04.0" / "resource2"
    monkeypatch.setenv("COSOCK_IVSHMEM", "0000:00:02.0")
    assert find_device(tmp_path) == tmp_path / "0000:00:02.0" / "resource2"
    monkeypatch.delenv("COSOCK_IVSHMEM")
    with pytest.raises(PoolError, match="no ivshmem device"):
        find_device(tmp_path / "0000:00:02.0")


def test_slot_table_grants_each_slot_to_one_connection() -> None:
    key = ("10.77.1.11", 40000, "10.77.1.12", 8000)
    table = SlotTable(2)
    slot, gen = table.alloc("h1g1", "h1g2", key)
    assert not table.claim(slot, gen, "h1g3", key)  # not the peer it was granted to
    assert not table.claim(slot, gen + 1, "h1g2", key)  # stale generation
    assert not table.claim(slot, gen, "h1g2", (*key[:3], 8001))  # another connection
    assert table.claim(slot, gen, "h1g2", key)
    assert not table.claim(slot, gen, "h1g2", key)  # once only
    other, other_gen = table.alloc("h1g1", "h1g2", key)
    with pytest.raises(PoolError, match="no free slot"):
        table.alloc("h1g1", "h1g2", key)
    assert table.free(slot, gen, "h1g1") and table.free_count == 0  # peer still uses it
    assert not table.free(slot, gen, "h1g3")
    assert table.free(slot, gen, "h1g2") and table.free_count == 1
    assert not table.free(slot, gen, "h1g2")  # stale now
    # The peer left before claiming: the client still maps the slot until it frees it.
    assert table.drop_guest("h1g2") == [other] and table.free_count == 1
    assert table.free(other, other_gen, "h1g1") and table.free_count == 2


def test_a_guest_that_leaves_frees_only_its_own_side() -> None:
    """A guest that left the host is done with its slots, but the other party's process may
    not have noticed yet and still use the rings: the slot is not handed out again until it
    frees it too (or its gateway connection drops)."""
    key = ("10.77.1.11", 40000, "10.77.1.12", 8000)
    table = SlotTable(2)
    slot, gen = table.alloc("h1g1", "h1g2", key)
    assert table.claim(slot, gen, "h1g2", key)
    assert table.drop_guest("h1g1") == [slot]
    assert (table.count_of("h1g1"), table.count_of("h1g2"), table.held) == (0, 1, 1)
    other, _ = table.alloc("h1g3", "h1g2", key)
    assert other != slot
    with pytest.raises(PoolError, match="no free slot"):
        table.alloc("h1g3", "h1g2", key)
    assert table.free(slot, gen, "h1g2") and table.free_count == 1
    # The owner of an unclaimed grant leaving releases it: the peer never mapped it.
    assert table.drop_guest("h1g3") == [other] and table.free_count == 2


def test_slots_are_handed_out_oldest_freed_first_and_mapped_ones_last() -> None:
    """A slot taken back goes to the end of the line, and one a process still marks mapped
    (its release was not its own: a dropped connection, a guest that left) is handed out
    only when no other slot is free."""
    key = ("10.77.1.11", 40000, "10.77.1.12", 8000)
    table = SlotTable(3)
    first, gen = table.alloc("h1g1", "h1g2", key)
    assert first == 0
    assert table.free(first, gen, "h1g1")  # unclaimed: free again at once
    order = [table.alloc("h1g1", "h1g2", key)[0] for _ in range(3)]
    assert order == [1, 2, 0]
    table = SlotTable(3)
    assert table.alloc("h1g1", "h1g2", key, avoid={0, 1})[0] == 2
    assert table.alloc("h1g1", "h1g2", key, avoid={0, 1})[0] == 0  # nothing else is free
    stamps = {table.stamp_of(s) for s in (0, 2)}
    assert len(stamps) == 2 and 0 not in stamps and table.stamp_of(1) == 0


def test_a_pair_pool_is_found_by_the_id_in_its_header(tmp_path: Path) -> None:
    """A guest with several ivshmem devices (one per neighbour) picks the pool a grant names
    by the id the host wrote into its header; a device without it, or a BAR too small for a
    header, is passed over; an id that no device holds is a clear error."""
    root = tmp_path / "devices"
    ids = {}
    for n, size in (("0000:00:04.0", 1 << 20), ("0000:00:05.0", 1 << 20), ("0000:00:06.0", 64)):
        dev = root / n
        dev.mkdir(parents=True)
        (dev / "vendor").write_text("0x1af4\n")
        (dev / "device").write_text("0x1110\n")
        with open(dev / "resource2", "wb") as f:
            f.truncate(size)
        if size > POOL_HEADER_SIZE:
            ids[n] = os.urandom(16)
            with Pool(dev / "resource2") as p:
                p.format(CAP, ids[n], f"pair-{n}")
    other = root / "0000:00:02.0"  # not ivshmem
    other.mkdir()
    (other / "vendor").write_text("0x1af4\n")
    (other / "device").write_text("0x1000\n")
    for n, ident in ids.items():
        found = find_device(root, pool_id=ident)
        assert found == root / n / "resource2"
        with Pool(found) as p:
            assert p.identity() == (ident, f"pair-{n}")
    with pytest.raises(PoolError, match="no ivshmem device holding pool"):
        find_device(root, pool_id=b"\x01" * 16)
    assert find_device(root) == root / "0000:00:04.0" / "resource2"  # shared: the first
    with Pool(root / "0000:00:04.0" / "resource2") as p, pytest.raises(PoolError, match="16"):
        p.format(CAP, b"short")
