"""Single-producer single-consumer byte rings in one shared mapping (a memfd per connection).

Layout of a channel (two rings, one per direction)::

    [ ring 0 header (4 KiB) | ring 0 data (capacity) | ring 1 header | ring 1 data ]

A ring header holds 64-bit counters, each on its own cache line so the two processes do
not false-share: ``head`` (bytes ever written, producer-owned), ``tail`` (bytes ever read,
consumer-owned), ``spinning`` (consumer is spin-polling and will take up to that many
bytes: producer need not ring for writes that fit; ``SPIN_ALL``: a ring-aware selector
that reads readiness from the ring itself),
``bells`` (doorbells the producer has sent), ``space_wait`` / ``space_rung`` (a blocked
producer's request for a SPACE wake-up and the consumer's answer).

The peer is not trusted: every counter it writes is validated against what we know
(monotonic, within capacity) before it is used as an index, and our own counters are kept
in private memory, never read back from the mapping.  Copies: one in (``write``), one out
(``read_into``), both straight between the caller's buffer and the mapping.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
import time
from typing import Final

from ._errors import RingCorrupted

MAGIC: Final = 0x52_4B_53_43  # b"CSKR" little-endian
VERSION: Final = 1
HEADER_SIZE: Final = 4096
#: Bytes copied between two publications of a counter (pipelining large copies).
PUBLISH_STEP: Final = 128 * 1024

# Header slots (index into the header viewed as uint64; 8 slots = one 64-byte line).
_MAGIC, _CAPACITY = 0, 1
_HEAD = 8
_TAIL = 16
_SPINNING = 24
_BELLS = 32
_SPACE_WAIT = 40
_SPACE_RUNG = 48
#: Odd while a consumer that is not spinning copies out of the ring (``begin_read``).
_READING = 56
_U64 = (1 << 64) - 1
#: ``spinning`` of a consumer that answers readiness from the ring (the cosock selectors):
#: bytes it leaves unread are still seen, so no write needs a doorbell.
SPIN_ALL: Final = _U64

_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

_fence_lock = threading.Lock()


def fence() -> None:
    """Full memory barrier between our shared-memory stores and later loads.

    The doorbell protocol is Dekker-shaped (store own flag, then load the peer's), which
    x86-TSO may reorder through the store buffer.  An uncontended lock acquire/release is
    a locked read-modify-write in glibc, i.e. a full fence, at ~100 ns.
    """
    _fence_lock.acquire()
    _fence_lock.release()


#: Spin iterations between two sched_yield() calls (a power of two minus one); the
#: selectors also look at the kernel then.
YIELD_MASK: Final = int(os.environ.get("COSOCK_YIELD_MASK", "15"))
#: A sched_yield() that takes this long ran another task: the CPU is oversubscribed.
CONTENDED_NS: Final = 50_000
#: A sched_yield() that takes this long (but less than CONTENDED_NS) let another task run
#: briefly on our CPU, usually the peer we wait for, when the scheduler put both on one CPU.
SHARED_NS: Final = 3_000


def yield_cpu() -> int:
    """Yield the CPU from a spin; how long that took (ns), which tells the spinner how its
    CPU is shared.

    An uncontended sched_yield() returns in about a microsecond: keep spinning.  Up to
    CONTENDED_NS, another task ran a little, most often the peer, which the scheduler likes
    to put on the waker's CPU: every spin turn without a yield then holds the CPU that peer
    needs, so the spinner yields at every turn (pinned on one CPU, loopback RR 64 B: 19 ->
    13 µs).  Longer: the CPUs are oversubscribed; spinning loses twice (the scheduler ranks
    a spinner below tasks that sleep, and the peer waits for a CPU): sleep in the kernel.
    """
    t0 = time.perf_counter_ns()
    os.sched_yield()
    return time.perf_counter_ns() - t0


def spin_yield_mask(took_ns: int) -> int:
    """The yield mask for the next spin turns after a yield that took ``took_ns``: 0 (yield
    at every turn) while our CPU is shared with the task we wait for, else YIELD_MASK."""
    return 0 if took_ns > SHARED_NS else YIELD_MASK


def channel_size(capacity: int) -> int:
    return 2 * (HEADER_SIZE + capacity)


def check_capacity(capacity: int) -> None:
    if capacity < 4096 or capacity & (capacity - 1):
        raise ValueError(f"ring capacity {capacity} is not a power of two >= 4096")


def new_channel(capacity: int) -> tuple[int, mmap.mmap]:
    """A fresh sealed memfd sized for two rings, and our mapping of it, headers initialised.

    One mapping serves both the initialisation and the connection: mapping twice (create,
    then map as a receiver would) cost four syscalls and two page faults more.
    """
    check_capacity(capacity)
    fd = os.memfd_create("cosock", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        size = channel_size(capacity)
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        mm = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise
    for base in (0, HEADER_SIZE + capacity):
        hdr = memoryview(mm)[base : base + HEADER_SIZE].cast("Q")
        hdr[_MAGIC] = MAGIC | (VERSION << 32)
        hdr[_CAPACITY] = capacity
        hdr.release()
    return fd, mm


def format_channel(mm: mmap.mmap, capacity: int) -> None:
    """Zero both rings' headers in ``mm`` and write magic and capacity: a channel in memory
    that did not come from :func:`new_channel` (a slot of an ivshmem pool)."""
    check_capacity(capacity)
    if len(mm) < channel_size(capacity):
        raise ValueError(f"mapping of {len(mm)} bytes cannot hold a channel of {capacity}")
    for base in (0, HEADER_SIZE + capacity):
        mm[base : base + HEADER_SIZE] = bytes(HEADER_SIZE)
        hdr = memoryview(mm)[base : base + HEADER_SIZE].cast("Q")
        hdr[_MAGIC] = MAGIC | (VERSION << 32)
        hdr[_CAPACITY] = capacity
        hdr.release()


def channel_headers_ok(mm: mmap.mmap, capacity: int) -> bool:
    """Both ring headers carry our magic and ``capacity`` (counters are checked on use)."""
    if len(mm) < channel_size(capacity):
        return False
    for base in (0, HEADER_SIZE + capacity):
        hdr = memoryview(mm)[base : base + HEADER_SIZE].cast("Q")
        ok = hdr[_MAGIC] == MAGIC | (VERSION << 32) and hdr[_CAPACITY] == capacity
        hdr.release()
        if not ok:
            return False
    return True


def create_channel_fd(capacity: int) -> int:
    """A fresh sealed memfd sized for two rings; headers initialised (no mapping kept)."""
    fd, mm = new_channel(capacity)
    mm.close()
    return fd


def map_channel_fd(fd: int, capacity: int) -> mmap.mmap:
    """Map a channel memfd received from a peer, after checking it is what it claims.

    Raises:
        RingCorrupted: not a sealed memfd of exactly the expected size, or bad headers.
    """
    check_capacity(capacity)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise RingCorrupted(f"channel fd is not a sealable memfd ({exc.strerror})") from None
    if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) != (
        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    ):
        raise RingCorrupted("channel memfd is not sealed against resizing")
    size = os.fstat(fd).st_size
    if size != channel_size(capacity):
        raise RingCorrupted(f"channel memfd has size {size}, expected {channel_size(capacity)}")
    mm = mmap.mmap(fd, size)
    for base in (0, HEADER_SIZE + capacity):
        hdr = memoryview(mm)[base : base + HEADER_SIZE].cast("Q")
        # Counters are not checked here: the client may already have written (optimistic
        # sends before the verdict); every counter is validated when it is used.
        ok = hdr[_MAGIC] == MAGIC | (VERSION << 32) and hdr[_CAPACITY] == capacity
        hdr.release()
        if not ok:
            mm.close()
            raise RingCorrupted("channel ring header has bad magic or capacity")
    return mm


class _RingEnd:
    __slots__ = ("_data", "_hdr", "_shared", "_src", "capacity", "mask")

    def __init__(self, mm: mmap.mmap, index: int, capacity: int) -> None:
        self._src = mm  # asked why, when a counter is out of bounds (_corrupted)
        base = index * (HEADER_SIZE + capacity)
        view = memoryview(mm)
        self._hdr = view[base : base + HEADER_SIZE].cast("Q")
        self._data = view[base + HEADER_SIZE : base + HEADER_SIZE + capacity]
        self._shared: memoryview | None = None  # the shared header while frozen
        view.release()
        self.capacity = capacity
        self.mask = capacity - 1

    def release(self) -> None:
        """Drop our views so the mapping can be closed."""
        self._hdr.release()
        self._data.release()
        if self._shared is not None:
            self._shared.release()

    def freeze(self) -> None:
        """Stop looking at shared memory: counters read from now on come from a private
        copy taken here (a thread racing a path switch sees stale but sane values, never
        what was written into the region afterwards)."""
        if self._shared is None:
            self._shared = self._hdr
            self._hdr = memoryview(bytearray(self._hdr.tobytes())).cast("Q")

    def thaw(self) -> None:
        """Look at shared memory again (the peer left without taking part in a switch:
        what it put in the ring is all there is)."""
        if self._shared is not None:
            self._hdr, self._shared = self._shared, None


def _corrupted(end: _RingEnd, what: str) -> RingCorrupted:
    """The error for a counter out of bounds; a slot of an ivshmem pool granted to another
    connection meanwhile (``_vmchannel.SlotMapping.grant_lost``) is named as the cause."""
    lost = getattr(end._src, "grant_lost", None)
    if lost is not None and lost():
        return RingCorrupted(f"{what}: the slot was granted to another connection")
    return RingCorrupted(f"{what}: channel corrupted")


class RingWriter(_RingEnd):
    """Producer end: copies bytes in and publishes ``head``."""

    __slots__ = ("_head", "_rung_read", "_tail")

    def __init__(self, mm: mmap.mmap, index: int, capacity: int) -> None:
        super().__init__(mm, index, capacity)
        self._head = 0
        self._tail = 0
        self._rung_read = 0  # the consumer's read we rang for (``needs_bell``)

    @property
    def head(self) -> int:
        return self._head

    def resync(self) -> None:
        """Take over from another process that shared this end (after a fork): the
        positions it published are the truth."""
        self._head = int(self._hdr[_HEAD])
        self._tail = int(self._hdr[_TAIL])

    def consumed(self) -> int:
        """The consumer's ``tail``, validated: monotonic and never past what we wrote."""
        tail = self._hdr[_TAIL]
        if tail < self._tail or tail > self._head:
            raise _corrupted(self, f"peer ring tail {tail} outside [{self._tail}, {self._head}]")
        self._tail = tail
        return tail

    def free(self) -> int:
        return self.capacity - (self._head - self.consumed())

    def write(self, data: memoryview, free: int) -> int:
        """Copy up to ``free`` bytes of ``data`` and publish them; returns the count.

        Large writes are published in steps of ``PUBLISH_STEP`` so the consumer copies out
        the first part while we copy in the rest (pipelined, not half-duplex).
        """
        n = len(data)
        if n > free:
            n = free
        if n <= 0:
            return 0
        head = self._head
        pos = head & self.mask
        if n <= PUBLISH_STEP and pos + n <= self.capacity:  # the common small write
            self._data[pos : pos + n] = data if n == len(data) else data[:n]
            self._head = head = head + n
            self._hdr[_HEAD] = head
            return n
        done = 0
        while done < n:
            step = min(n - done, PUBLISH_STEP)
            pos = self._head & self.mask
            first = min(step, self.capacity - pos)
            self._data[pos : pos + first] = data[done : done + first]
            if step > first:
                self._data[: step - first] = data[done + first : done + step]
            self._head += step
            self._hdr[_HEAD] = self._head
            done += step
        return n

    def needs_bell(self, old_head: int) -> bool:
        """After a write that started at ``old_head``: must we send a BELL?

        Not while the consumer spins and the unread bytes fit what it will take (a blocking
        recv's buffer: it re-checks before it blocks, and a spin that finds bytes ends in
        ``begin_read``; a ring-aware selector's ``SPIN_ALL``: it sees whatever is left);
        more than that, and its recv returns with bytes unread that it may then wait for
        on the raw fd.  Otherwise if it has consumed everything that preceded this write:
        then it may have
        seen the ring empty at some step of our (pipelined) publication and gone to sleep.
        And once per read of a consumer that does not spin (``begin_read``: an event loop
        on the raw fd) when older bytes are unread: it may be copying them now, and it
        will consume the doorbells of what it saw, not of this write, and go back to its
        select() on the fd: without this bell our bytes would wait there unannounced.
        Otherwise older bytes are unread and an earlier bell is still pending.
        """
        fence()
        hdr = self._hdr
        spin = hdr[_SPINNING]
        if spin:
            # (the peer's tail, unchecked here: a hostile value only costs it doorbells)
            if self._head - hdr[_TAIL] <= spin:
                return False
            # Once per spin: the consumer takes no doorbell before the read that ends it,
            # whose mark changes ``reading``.
            reading = hdr[_READING]
            if reading != self._rung_read:
                self._rung_read = reading
                return True
            return False
        if self.consumed() >= old_head:
            return True
        reading = hdr[_READING]
        if reading & 1 and reading != self._rung_read:
            self._rung_read = reading
            return True
        return False

    def count_bell(self) -> None:
        self._hdr[_BELLS] = (self._hdr[_BELLS] + 1) & _U64  # the peer may have set 2**64-1

    def request_space(self) -> int:
        """Ask the consumer for a SPACE wake-up; returns free bytes re-read after the fence."""
        self._hdr[_SPACE_WAIT] = (self._hdr[_SPACE_WAIT] + 1) & _U64
        fence()
        return self.free()

    def unsent_bytes(self, since: int) -> bytes:
        """Bytes ``[since, head)`` still held in the ring (for a resend over TCP)."""
        if not 0 <= since <= self._head or self._head - since > self.capacity:
            raise ValueError("requested bytes are no longer retained by the ring")
        out = bytearray()
        off = since
        while off < self._head:
            pos = off & self.mask
            n = min(self._head - off, self.capacity - pos)
            out += self._data[pos : pos + n]
            off += n
        return bytes(out)


class RingReader(_RingEnd):
    """Consumer end: validates ``head``, copies bytes out, publishes ``tail``."""

    __slots__ = ("_head", "_reads", "_spin", "_tail", "recv_spin")

    def __init__(self, mm: mmap.mmap, index: int, capacity: int) -> None:
        super().__init__(mm, index, capacity)
        self._head = 0
        self._tail = 0
        self._reads = 0  # reads announced by begin_read (twice the count: even)
        self._spin = 0  # what we last stored in ``spinning`` (never read back)
        #: A blocking recv spins (``spinning`` holds what it will take): bytes it finds
        #: must be claimed with ``end_spin_read`` before they are copied.
        self.recv_spin = False

    def begin_read(self) -> int:
        """About to look at the ring and consume: unless we spin (doorbells are off then),
        say so to the producer (fenced), so that a write landing during our copy rings
        once (see ``RingWriter.needs_bell``).  Returns the producer's doorbell count: the
        doorbells a drain after this read may consume (their bytes are in the snapshot
        taken next)."""
        hdr = self._hdr
        # Read before the mark: a doorbell rung because the producer saw this read's mark
        # is then younger than what we return, so our drain leaves it queued.
        bells = int(hdr[_BELLS])
        if not self._spin:
            self._reads += 2
            hdr[_READING] = self._reads | 1
            fence()
        return bells

    def end_spin_read(self) -> int:
        """A blocking recv's spin found bytes: end the spin before taking the snapshot to
        copy from (``begin_read`` in the same fenced step: the mark first, so a producer
        that sees the spin over sees the mark).  From here on the producer's writes
        follow the rules of a reader that may leave bytes behind and return to a raw
        select(): a write that landed after our snapshot, or more than we take, would
        otherwise stay unannounced in the ring.  Returns what ``begin_read`` returns."""
        hdr = self._hdr
        bells = int(hdr[_BELLS])
        self._reads += 2
        hdr[_READING] = self._reads | 1
        self._spin = 0
        self.recv_spin = False
        hdr[_SPINNING] = 0
        fence()
        return bells

    def end_read(self) -> None:
        """The read is over (after the drain of its doorbells): no more bells for it."""
        self._hdr[_READING] = self._reads

    @property
    def tail(self) -> int:
        return self._tail

    def resync(self) -> None:
        """Take over from another process that shared this end (after a fork)."""
        self._tail = int(self._hdr[_TAIL])
        self._head = int(self._hdr[_HEAD])

    def available(self) -> int:
        """Readable bytes, after validating the producer's ``head``."""
        head = self._hdr[_HEAD]
        if head != self._head:
            if head < self._head or head - self._tail > self.capacity:
                raise _corrupted(
                    self,
                    f"peer ring head {head} outside [{self._head}, {self._tail + self.capacity}]",
                )
            self._head = head
        return self._head - self._tail

    def read_into(self, buf: memoryview, n: int, *, peek: bool = False) -> int:
        """Copy ``n`` available bytes into ``buf``; consume them unless ``peek``.

        Consumption is published in steps, so the producer can refill behind us.
        """
        tail = self._tail
        pos = tail & self.mask
        if n <= PUBLISH_STEP and pos + n <= self.capacity:  # the common small read
            buf[:n] = self._data[pos : pos + n]
            if not peek:
                self._tail = tail = tail + n
                self._hdr[_TAIL] = tail
            return n
        done = 0
        while done < n:
            step = min(n - done, PUBLISH_STEP)
            pos = tail & self.mask
            first = min(step, self.capacity - pos)
            buf[done : done + first] = self._data[pos : pos + first]
            if step > first:
                buf[done + first : done + step] = self._data[: step - first]
            tail += step
            done += step
            if not peek:
                self._tail = tail
                self._hdr[_TAIL] = tail
        return n

    def read_bytes(self, n: int) -> bytes:
        """Consume ``n`` available bytes as a new ``bytes`` (one copy)."""
        pos = self._tail & self.mask
        first = min(n, self.capacity - pos)
        data = bytes(self._data[pos : pos + first])
        if n > first:
            data += self._data[: n - first]
        self._tail += n
        self._hdr[_TAIL] = self._tail
        return data

    def set_spinning(self, on: bool, upto: int = SPIN_ALL) -> None:
        """Spin-poll the ring (``on``): the producer need not ring for writes that leave at
        most ``upto`` bytes unread (a blocking recv: what it will take, ``recv_spin``; a
        ring-aware selector, ``SPIN_ALL``: everything, it sees what is left).  Off:
        fenced, doorbells back."""
        if on:
            self._spin = upto
            self.recv_spin = upto != SPIN_ALL
            self._hdr[_SPINNING] = upto
        elif self._spin:
            self._spin = 0
            self.recv_spin = False
            self._hdr[_SPINNING] = 0
            fence()

    def end_spin(self) -> None:
        """A blocking recv is over: end a spin it left (never a ring-aware selector's)."""
        if self.recv_spin:
            self.set_spinning(False)

    def arm(self) -> int:
        """About to block: stop suppressing doorbells, then re-check (after the fence)."""
        self._spin = 0
        self.recv_spin = False
        self._hdr[_SPINNING] = 0
        fence()
        return self.available()

    def space_wanted(self) -> bool:
        """After consuming: does a blocked producer wait for a SPACE wake-up?  Answers once."""
        fence()
        want = self._hdr[_SPACE_WAIT]
        if want != self._hdr[_SPACE_RUNG]:
            self._hdr[_SPACE_RUNG] = want
            return True
        return False

    def bells_sent(self) -> int:
        """How many BELLs the producer says it sent (only compared for change, never trusted
        as an index): lets the consumer skip a syscall when no bell can be queued."""
        return int(self._hdr[_BELLS])
