"""Agent wire format: JSON lines, one object per line, no IO here.

Requests (client -> agent) are objects with an ``"op"``; every request gets exactly one reply,
in order, ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.  The agent also pushes
``{"push": "snapshot", "snapshot": {...}}`` to subscribers, interleaved anywhere between
replies.  JSON lines keep the protocol debuggable with ``socat`` and cost nothing at the
rates the agent sees (guest and listener changes, never per-connection traffic).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._errors import RemoteProtocolError

#: Longest request line the agent accepts (a request is a few hundred bytes).
MAX_REQUEST_LINE = 1 << 20
#: Longest line a client accepts from the agent: snapshots grow with guests and listeners.
MAX_REPLY_LINE = 16 << 20


class WireError(RemoteProtocolError):
    """A line that is not one JSON object: the sender is broken or hostile."""


class LineTooLong(WireError):
    """No newline within the size limit; the stream cannot be resynchronised."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def encode(msg: Mapping[str, Any]) -> bytes:
    """One message as one line (ASCII JSON, so a newline can only be the terminator)."""
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line (without its newline) into a JSON object.

    Raises:
        WireError: not UTF-8 JSON, not an object, NaN/Infinity, or nested too deep.
    """
    try:
        msg = json.loads(line, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise WireError(f"malformed line: {type(exc).__name__}: {str(exc)[:120]}") from None
    if not isinstance(msg, dict):
        raise WireError(f"malformed line: expected a JSON object, got {type(msg).__name__}")
    return msg


class LineReader:
    """Splits a byte stream into lines, refusing lines longer than ``limit``.

    After :class:`LineTooLong` the reader is poisoned: the rest of the stream has no
    trustworthy line boundary.
    """

    __slots__ = ("_buf", "_limit", "_poisoned", "_scanned")

    def __init__(self, limit: int = MAX_REQUEST_LINE) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._scanned = 0  # bytes of _buf already known to hold no newline
        self._poisoned = False

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_line(self) -> bytes | None:
        """The next complete line without its newline, or None if none is buffered.

        Raises:
            LineTooLong: the line (complete or not) exceeds the limit.
        """
        if self._poisoned:
            raise LineTooLong(f"line longer than {self._limit} bytes")
        end = self._buf.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buf)
            if self._scanned > self._limit:
                self._poisoned = True
                raise LineTooLong(f"line longer than {self._limit} bytes")
            return None
        if end > self._limit:
            self._poisoned = True
            raise LineTooLong(f"line longer than {self._limit} bytes")
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]  # O(1) amortised: bytearray keeps a start offset
        self._scanned = 0
        return line

    def take_rest(self) -> bytes:
        """At EOF: the unterminated tail (lets ``echo -n ... | socat`` clients work).

        Raises:
            LineTooLong: the tail exceeds the limit.
        """
        if self._poisoned or len(self._buf) > self._limit:
            self._poisoned = True
            raise LineTooLong(f"line longer than {self._limit} bytes")
        rest = bytes(self._buf)
        self._buf.clear()
        self._scanned = 0
        return rest

    @property
    def buffered(self) -> int:
        return len(self._buf)
