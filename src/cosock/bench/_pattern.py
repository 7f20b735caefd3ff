"""A self-locating byte pattern and the checker that verifies every received byte of it.

The stream is a sequence of segments of ``SEG`` bytes.  Segment ``k`` is a 16-byte header
(magic, ``k``, a CRC of both) followed by one of ``VARIANTS`` pseudo-random bodies
(``k % VARIANTS``), so the byte at every stream offset is known in advance, sending costs
one concatenation per segment and checking costs one ``startswith`` per piece.

The checker compares what arrives with the pattern at the offset it expects.  On a
mismatch it finds where the arriving bytes really come from (a header names its segment;
a window of body bytes is located in the bodies, taking the segment nearest to where the
stream was), so it can tell apart, by real counting:

- ``duplicated``: bytes of offsets that had already arrived;
- ``reordered``: new bytes of offsets below the highest offset already received;
- ``corrupted``: bytes that match no place in the pattern;
- ``lost``: offsets the sender sent that never arrived (:meth:`StreamChecker.finish`).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Any

SEG = 16384
HDR = 16
BODY = SEG - HDR
VARIANTS = 61
MAGIC = b"CSMB"
#: Bytes of body the checker looks up to locate a run without a header.
WINDOW = 16
_HEADER = struct.Struct("<4sQI")
MAX_JUMPS = 20


class Pattern:
    """The deterministic stream of one direction, chosen by ``seed``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        key = seed.to_bytes(8, "little")
        self.bodies = hashlib.shake_256(b"cosock-migrate" + key).digest(BODY * VARIANTS)
        # One bytes object per body: bytes-to-bytes operations run at memcpy speed,
        # memoryview operands would be ten times slower.
        self._body = [self.bodies[v * BODY : (v + 1) * BODY] for v in range(VARIANTS)]

    def header(self, k: int) -> bytes:
        crc = zlib.crc32(struct.pack("<QQ", k, self.seed)) & 0xFFFFFFFF
        return _HEADER.pack(MAGIC, k, crc)

    def body(self, k: int) -> bytes:
        return self._body[k % VARIANTS]

    def segment(self, k: int) -> bytes:
        """Segment ``k`` (stream offsets ``k * SEG`` .. ``(k + 1) * SEG``)."""
        return self.header(k) + self.body(k)

    def expected(self, offset: int, n: int) -> bytes:
        """The ``n`` pattern bytes from stream ``offset`` (tests and rare paths)."""
        out = bytearray()
        k = offset // SEG
        skip = offset - k * SEG
        while len(out) < n + skip:
            out += self.segment(k)
            k += 1
        return bytes(out[skip : skip + n])

    def match_len(self, buf: bytes, pos: int, offset: int) -> int:
        """How many bytes of ``buf[pos:]`` equal the pattern from ``offset`` on."""
        end = len(buf)
        start = pos
        while pos < end:
            k, within = divmod(offset, SEG)
            if within < HDR:
                piece = self.header(k)[within:]
            elif within == HDR:
                piece = self._body[k % VARIANTS]
            else:
                piece = self._body[k % VARIANTS][within - HDR :]
            if len(piece) > end - pos:
                piece = piece[: end - pos]
            if not buf.startswith(piece, pos):
                return pos - start + _common_prefix(buf, pos, piece)
            pos += len(piece)
            offset += len(piece)
        return pos - start

    def header_at(self, buf: bytes, pos: int) -> int | None:
        """Stream offset of the segment whose valid header starts at ``buf[pos]``."""
        if len(buf) - pos < HDR:
            return None
        magic, k, _crc = _HEADER.unpack_from(buf, pos)
        if magic != MAGIC or k >= 1 << 48 or self.header(k) != buf[pos : pos + HDR]:
            return None
        return int(k) * SEG

    def locate_body(self, buf: bytes, pos: int, near: int) -> int | None:
        """Stream offset of ``buf[pos:pos + WINDOW]`` if it is body bytes: of all the
        segments using that body, the one nearest to ``near``."""
        window = buf[pos : pos + WINDOW]
        if len(window) < WINDOW:
            return None
        at = self.bodies.find(window)
        if at < 0:
            return None
        v, u = divmod(at, BODY)
        if u + WINDOW > BODY:  # spans two bodies: not a real place in the stream
            return None
        k0 = near // SEG
        base = k0 - (k0 - v) % VARIANTS  # largest k <= k0 with k % VARIANTS == v
        k = min((base, base + VARIANTS), key=lambda c: abs(c * SEG - near))
        k = max(k, v)
        return k * SEG + HDR + u


def _common_prefix(buf: bytes, pos: int, piece: bytes) -> int:
    n = 0
    for a, b in zip(buf[pos : pos + len(piece)], piece, strict=False):
        if a != b:
            break
        n += 1
    return n


class StreamChecker:
    """Verifies one received stream against its :class:`Pattern`, byte by byte."""

    def __init__(self, pattern: Pattern) -> None:
        self.pattern = pattern
        self.received = 0  # every byte handed to feed()
        self.verified = 0  # bytes that matched the pattern at a new offset
        self.duplicated = 0
        self.reordered = 0
        self.corrupted = 0
        self.max_end = 0
        self._have: list[list[int]] = []  # sorted, disjoint [start, end) ranges received
        self._expect = 0
        self._aligned = True
        self._pending = b""
        #: Where the stream stopped matching (receive position, offset expected, offset
        #: the bytes really had): the first few, to tell what a fault looked like.
        self.jumps: list[dict[str, int]] = []

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        buf = self._pending + data if self._pending else data
        self._pending = b""
        self._process(buf, final=False)

    def finish(self, sent: int) -> dict[str, Any]:
        """Flush what is pending; ``sent`` (the sender's count) gives the lost bytes."""
        if self._pending:
            buf, self._pending = self._pending, b""
            self._process(buf, final=True)
        unique = sum(e - s for s, e in self._have)
        beyond = sum(max(0, e - max(s, sent)) for s, e in self._have)
        return {
            "received": self.received,
            "verified": self.verified,
            "lost": max(0, sent - (unique - beyond)),
            "duplicated": self.duplicated,
            "reordered": self.reordered,
            "corrupted": self.corrupted + beyond,
            "jumps": self.jumps,
        }

    def _process(self, buf: bytes, final: bool) -> None:
        pos = 0
        while pos < len(buf):
            if self._aligned:
                n = self.pattern.match_len(buf, pos, self._expect)
                if n:
                    self._accept(self._expect, n)
                    self._expect += n
                    pos += n
                if pos < len(buf):
                    self._aligned = False
                continue
            pos, at = self._resync(buf, pos, final)
            if at is None:  # not enough bytes to tell yet
                self._pending = buf[pos:]
                return
            if len(self.jumps) < MAX_JUMPS:
                where = self.received - len(buf) + pos
                self.jumps.append({"received_at": where, "expected": self._expect, "found": at})
            self._expect = at
            self._aligned = True

    def _resync(self, buf: bytes, pos: int, final: bool) -> tuple[int, int | None]:
        """Where ``buf[pos:]`` comes from: (position in buf, stream offset) to continue at,
        after counting any bytes in between as corrupted; offset None: wait for more
        bytes, keeping ``buf`` from that position."""
        p = self.pattern
        at = p.header_at(buf, pos)
        if at is None:
            at = self._fills_hole(buf, pos)
        if at is not None:
            return pos, at
        for j in range(HDR + 1):  # a run may begin with a piece of a header
            at = p.locate_body(buf, pos + j, self._expect)
            if at is None:
                continue
            if j and p.match_len(buf[: pos + j], pos, at - j) < j:
                self._claim(buf[pos : pos + j], at - j)
                return pos + j, at
            return pos, at - j
        # Look for the next valid header, then claim the run of bytes just before it.
        idx = buf.find(MAGIC, pos + 1)
        while idx >= 0:
            start = p.header_at(buf, idx)
            if start is not None:
                run = _suffix_match(p, buf, pos, idx, start)
                if run:
                    self._accept(start - run, run)
                self.corrupted += idx - pos - run
                return idx, start
            if len(buf) - idx < HDR and not final:
                return pos, None
            idx = buf.find(MAGIC, idx + 1)
        if not final and len(buf) - pos < 2 * SEG:
            return pos, None
        keep = 0 if final else HDR - 1  # a header may be cut at the end
        self.corrupted += len(buf) - pos - keep
        return len(buf) - keep, None

    def _claim(self, data: bytes, start: int) -> None:
        """``data`` stands at stream offsets from ``start`` on: the bytes equal to the
        pattern there arrived, the others are corrupted."""
        if start < 0:
            self.corrupted += len(data)
            return
        want = self.pattern.expected(start, len(data))
        i = 0
        while i < len(data):
            j = i
            while j < len(data) and data[j] == want[j]:
                j += 1
            if j > i:
                self._accept(start + i, j - i)
            if j < len(data):
                self.corrupted += 1
            i = j + 1

    def _fills_hole(self, buf: bytes, pos: int) -> int | None:
        """The start of a gap in what arrived so far, if ``buf[pos:]`` is its bytes: late
        bytes fill the gap they left (even runs too short to locate otherwise)."""
        prev = 0
        for s, e in self._have:
            if s > prev:
                n = self.pattern.match_len(buf, pos, prev)
                if n >= min(8, s - prev, len(buf) - pos):
                    return prev
            prev = e
        return None

    def _accept(self, start: int, n: int) -> None:
        """Bytes of stream offsets [start, start + n) arrived and matched the pattern."""
        end = start + n
        dup = 0
        for s, e in self._have:
            if s >= end:
                break
            dup += max(0, min(e, end) - max(s, start))
        new = n - dup
        below = max(0, min(end, self.max_end) - start)
        self.duplicated += dup
        self.reordered += max(0, below - dup)
        self.verified += new
        self.max_end = max(self.max_end, end)
        self._add(start, end)

    def _add(self, start: int, end: int) -> None:
        have = self._have
        if have and have[-1][0] <= start <= have[-1][1]:  # the usual case: extend the tail
            have[-1][1] = max(have[-1][1], end)
            return
        have.append([start, end])
        have.sort()
        merged: list[list[int]] = []
        for s, e in have:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self._have = merged


def _suffix_match(p: Pattern, buf: bytes, pos: int, idx: int, start: int) -> int:
    """Length of the longest run ``buf[x:idx]`` (x >= pos) equal to the pattern ending at
    stream offset ``start``."""
    n = min(idx - pos, start)
    if n <= 0:
        return 0
    want = p.expected(start - n, n)
    got = buf[idx - n : idx]
    run = 0
    while run < n and got[n - 1 - run] == want[n - 1 - run]:
        run += 1
    return run
