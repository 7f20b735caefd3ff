"""Downgrade: an accelerated connection leaves cosock for good and goes on as plain TCP.

Why: an accelerated connection's TCP fd carries only control frames (its data is in the
shared-memory rings), so once the fd leaves the CoSocket's control -- ``detach()``, a
socket handed to uvloop (libuv reads and writes the fd itself), an fd sent to another
process -- the program would read frames, or lose the ring's bytes.  A downgrade is a
path switch whose target is unframed TCP (``Plain`` in the protocol, Rule 9 of
``_protocol.py``): each side leaves the rings, tells the other how much of its stream it
consumed, and resends, unframed, from the offset the *other* reported.  The peer is a
CoSocket too; it answers from whatever call reads its control stream (an application
read, its selector, a sleeping writer), and its application notices nothing.

Locks, as for a switch (``CoSocket._switch``): the rings are left under the channel's pump
lock (``rx_lock``) once in-flight ring copies are done (``_quiesce``); on the framed path the
phase change, the record of where our frames stopped and the marker share one
``ctl_lock`` section, so no writer thread frames data behind the marker.  While we wait for
the peer's marker the channel's phase is ``switching``: writers queue (the bytes are resent
plain), readers and the residency watch take control frames only up to the marker.

Contents: ``downgrade()`` (the initiator, blocking), ``on_event()`` (the peer's marker,
called from ``CoSocket._handle_events``), ``leaving()``.
"""

from __future__ import annotations

import _socket
import array
import errno
import fcntl
import os
import select
import socket
import stat
import termios
import time
from typing import TYPE_CHECKING, Any, Final

from . import _forkshare
from . import _socket as _s  # (a cycle: _socket imports us; names are looked up at call time)
from ._errors import FallbackReason, ProtocolError, RingCorrupted
from ._events import MAX_DATA_FRAME, NEED_DATA, Plain, PlainData, Switch, Upgrade
from ._protocol import FRAME_SIZES, T_BELL, T_DATA, T_FIN, T_REJECT, T_SPACE, Role, State

if TYPE_CHECKING:
    from ._socket import CoSocket, _Channel

#: How long ``downgrade()`` waits for the peer without a socket timeout.
DEFAULT_TIMEOUT: Final = 30.0
#: Frames that leave the path as it is: the walk to the peer's marker goes over them.
_PASSING: Final = frozenset({T_BELL, T_SPACE, T_FIN, T_DATA})
#: Enough to peek at a whole DATA frame.
_PEEK: Final = MAX_DATA_FRAME + 64
_REJECT_SIZE: Final = FRAME_SIZES[T_REJECT]
#: ``_await_resend`` gives up when the kernel queue stops growing for this long.
_RESEND_STALL: Final = 0.2
#: The urgent byte of ``_poke``: a BELL frame.
_URGENT: Final = bytes([T_BELL])


def leaving(ch: _Channel) -> bool:
    """Has this channel's downgrade begun (our marker is out, or both are)?"""
    state = ch.proto.state
    return state is State.PLAIN_SENT or (state is State.TCP and ch.phase is not _s._HANDSHAKE)


#### The initiator


def downgrade(
    sock: CoSocket,
    reason: FallbackReason = FallbackReason.HANDED_OVER,
    timeout: float | None = None,
) -> None:
    """Make ``sock`` a plain TCP socket whose fd carries exactly the application's stream.

    Waits for a handshake, switch or upgrade under way to settle first; a connection the
    peer rejects is already plain (its owed bytes are handed to the kernel here).

    Raises:
        TimeoutError: the peer did not answer within ``timeout`` (default: the socket's
            timeout, else -- blocking or non-blocking -- ``DEFAULT_TIMEOUT``).
        ConnectionResetError: the peer is gone while received bytes are only in shared
            memory, or the channel is broken.
    """
    if timeout is None:
        timeout = sock.gettimeout() or None  # a non-blocking socket still waits for the peer
    deadline = time.monotonic() + (DEFAULT_TIMEOUT if timeout is None else timeout)
    poked = False
    resent = 0  # bytes unread in our ring when we left it: the peer sends them again
    while (ch := sock._co) is not None:
        if ch.phase is _s._FORKED:
            _forkshare.claim(sock, ch)  # shared by fork(): ours to downgrade, or plain already
            continue
        if ch.phase is _s._BROKEN:
            raise ch.error or ConnectionResetError(errno.ECONNRESET, "cosock: channel broken")
        if ch.tcp_eof:
            _peer_gone(sock, ch, reason)
            break
        if _ready_to_leave(sock, ch):
            with ch.rx_lock:
                if sock._co is ch and not ch.tcp_eof and _ready_to_leave(sock, ch):
                    try:
                        resent = _send_marker(sock, ch, reason)
                    except (RingCorrupted, ProtocolError, ValueError) as exc:
                        sock._poison(ch, exc)
            continue
        if not poked and ch.proto.state is State.PLAIN_SENT and not ch.ctl_out:
            poked = _poke(sock)
        _take_to_marker(sock, ch)
        if sock._co is ch and ch.phase is _s._FRAMED:
            sock._flush_framed(ch)  # a peer mid-switch may wait for our resend
        if sock._co is ch and not ch.tcp_eof and ch.phase is not _s._BROKEN:
            try:
                sock._sleep(ch, deadline)
            except TimeoutError:
                raise TimeoutError(
                    f"cosock: the peer did not answer the downgrade to plain TCP within "
                    f"{timeout if timeout is not None else DEFAULT_TIMEOUT:g} s"
                ) from None
    _settle(sock, deadline)
    _await_resend(sock, resent, deadline)


def _await_resend(sock: CoSocket, n: int, deadline: float) -> None:
    """Until the ``n`` bytes the peer resends (unread in our ring when we left it) are in
    our kernel queue, the peer closed, or ``deadline``: bytes it had sent before the
    downgrade are then readable from the fd at once, as on TCP (else a non-blocking
    reader of a handed-over fd could see EAGAIN first)."""
    if n <= 0:
        return
    fd = sock.fileno()
    buf = array.array("i", [0])
    seen, since = -1, time.monotonic()
    while (now := time.monotonic()) < deadline:
        try:
            fcntl.ioctl(fd, termios.FIONREAD, buf, True)
        except OSError:
            return
        queued = buf[0] + len(sock._rxb or b"")
        if queued >= n:
            return
        if queued != seen:
            seen, since = queued, now
        elif now - since > _RESEND_STALL:
            return  # our receive buffer is full (or the peer is slow): best effort
        poller = select.poll()
        poller.register(fd, select.POLLRDHUP)
        if poller.poll(1):
            return  # the peer closed (or an error): nothing more is coming


def _poke(sock: CoSocket) -> bool:
    """Wake the peer's residency watch: one urgent (out-of-band) byte makes its fd report
    POLLPRI, which the watch polls for on every accelerated connection, so an application
    that is not reading still answers.  Sent once our marker is wholly in the kernel (the
    urgent byte is not part of the stream: ordinary reads skip it).

    One per connection and direction (a connection downgrades once), because Linux pulls an
    unread urgent byte into the stream when the next urgent byte arrives; and a BELL, a
    harmless frame on the shared-memory path, should anything else ever do that."""
    try:
        _socket.socket.send(sock, _URGENT, socket.MSG_OOB)
    except OSError:
        pass  # the application's own reads still answer
    return True


def poked(sock: CoSocket) -> None:
    """Residency watch: the peer's urgent byte arrived (POLLPRI; or the fd reports an error
    or hang-up, which ``poll`` always reports).  Take it off, then, unless
    an application thread sleeps on the fd (it reads the marker itself), take the control
    frames up to the peer's marker and answer it."""
    try:
        _socket.socket.recv(sock, 1, socket.MSG_OOB)
    except OSError:
        pass
    ch = sock._co
    if ch is None or ch.sleepers:
        return
    with ch.rx_lock:  # which a fork() holds: forked or not is looked at after it
        if ch.forked and not _forkshare.try_claim(sock, ch):
            return  # another process owns it: its watch answers
        try:
            try:
                sock._pump_control_only(ch)
            except OSError:
                sock._pump(ch)  # an error on the fd (POLLERR): recorded, so no longer polled
        except (RingCorrupted, ProtocolError, ValueError) as exc:
            sock._poison(ch, exc)
        except OSError:
            pass  # the application's next call reports it


def _ready_to_leave(sock: CoSocket, ch: _Channel) -> bool:
    """On a path we can leave from (not mid-handshake, -switch or -upgrade)?"""
    state = ch.proto.state
    return (state is State.SHM and ch.phase is _s._SHM) or (
        state is State.FRAMED and ch.phase is _s._FRAMED and ch.upgrade is None
    )


def _send_marker(sock: CoSocket, ch: _Channel, reason: FallbackReason) -> int:
    """Leave and send our Plain; returns how many bytes the peer will send again (what
    was unread in our ring)."""
    _leave(sock, ch, reason)
    sock._flush_ctl(ch)
    rx = ch.rx
    return rx.available() if ch.downgrade == "ring" and rx is not None else 0


def _leave(sock: CoSocket, ch: _Channel, reason: FallbackReason) -> None:
    """Leave the path we are on and send our Plain (the caller holds ``rx_lock``, so what
    we report as consumed cannot move).  From the rings: as a switch leaves them, the
    marker once they are frozen.  From framed TCP: the phase change, where our frames
    stop, and the marker in one ``ctl_lock`` section."""
    if ch.phase is _s._SHM:
        sock._leave_rings(ch)
        ch.downgrade = "ring"
        sock._control(ch, Plain(ch.proto.received_offset, reason))
        return
    with ch.ctl_lock:
        ch.phase = _s._SWITCHING
        ch.downgrade = "framed"
        ch.retained = bytearray()
        ch.retained_base = ch.proto.tcp_next  # where our queued bytes (tx_out) start
        ch.ctl_out += ch.proto.send(Plain(ch.proto.received_offset, reason))
    if ch.upgrade is not None:  # an upgrade offer crossed the peer's downgrade: drop it
        ch.upgrade[0].close()
        ch.upgrade = None


def _take_to_marker(sock: CoSocket, ch: _Channel) -> None:
    """Move the control stream on without taking a byte past the peer's marker: the bytes
    after it are plain, and ours to leave in the kernel for whoever gets the fd."""
    if ch.phase is _s._HANDSHAKE:
        sock._flush_ctl(ch)
        if ch.role is Role.SERVER:
            sock._pump(ch)  # the client sends nothing after its HELLO until our verdict
        else:
            sock._pump_accept_only(ch)
            if sock._co is ch and ch.phase is _s._HANDSHAKE:
                sock._take_if(ch, _REJECT_SIZE, lambda head: head[0] == T_REJECT)
        return
    with ch.rx_lock:
        if sock._co is not ch:
            return
        try:
            peeked = _socket.socket.recv(sock, _PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sock._pump_locked(ch)  # records the error
            return
        if not peeked:
            sock._pump_locked(ch)  # EOF: the ordinary path handles a peer that left
            return
        pending, _ = ch.proto.trailing_data
        data = pending + peeked
        pos = 0
        while pos < len(data):
            kind = data[pos]
            size = FRAME_SIZES.get(kind)
            if size is None:
                pos = len(data)  # garbage: the protocol says so (and poisons)
                break
            if kind == T_DATA and pos + size <= len(data):
                size += int.from_bytes(data[pos + 1 : pos + size], "little")
            if pos + size > len(data):
                break
            pos += size
            if kind not in _PASSING:
                break  # a marker or an answer: act on it before looking further
        sock._take_parsed(ch, pos - len(pending))


def _peer_gone(sock: CoSocket, ch: _Channel, reason: FallbackReason) -> None:
    """The peer's TCP end is gone: it can resend nothing.  If everything it published
    has been read, the fd is honest as it is (EOF, or its reset); else the bytes only in
    shared memory would be lost."""
    unread = len(sock._rxb or b"")
    if ch.phase is _s._SHM and ch.rx is not None:
        unread += ch.rx.available()
    if unread:
        raise ConnectionResetError(
            errno.ECONNRESET,
            f"cosock: the peer closed before the connection could continue as plain TCP; "
            f"{unread} received bytes are only in shared memory (read them first)",
        )
    _detach_all(sock, ch, reason)


#### The peer's marker


def on_event(sock: CoSocket, ch: _Channel, event: Plain | Switch | Upgrade) -> None:
    """The peer's Plain, or a Switch or Upgrade that crossed ours (called under
    ``rx_lock``): answer a Plain with ours, and finish once both markers are out."""
    try:
        if isinstance(event, Plain) and ch.proto.state is State.PLAIN_RECEIVED:
            _leave(sock, ch, event.reason)
            sock._flush_ctl(ch)
        if ch.proto.state is State.TCP and not isinstance(event, Upgrade):
            _finish(sock, ch)
        # An Upgrade that crossed our Plain: the client drops its offer when it reads ours.
    except (RingCorrupted, ProtocolError, ValueError) as exc:
        sock._poison(ch, exc)


def _finish(sock: CoSocket, ch: _Channel) -> None:
    """Both markers are out: hand our resend and every queued byte to the kernel,
    unframed, and make every CoSocket on this channel plain."""
    proto = ch.proto
    with ch.ctl_lock:
        start = proto.resend_from
        pending = (ch.retained or bytearray()) + ch.tx_out
        base = ch.retained_base
        if start is None or not base <= start <= base + len(pending):
            raise RingCorrupted(
                f"peer says it consumed {start} bytes; we still hold [{base}, "
                f"{base + len(pending)}): channel corrupted"
            )
        owed = bytearray(ch.ctl_out) + pending[start - base :]
        ch.ctl_out.clear()
        ch.tx_out.clear()
        ch.retained = None
        ch.downgrade = "done"  # writer threads queue nothing more here (_send_framed)
    while (leftover := proto.next_event()) is not NEED_DATA:
        if isinstance(leftover, PlainData):
            sock._owe_app(leftover.data)
    reason = proto.fallback or FallbackReason.HANDED_OVER
    shut_rd = ch.rd_shut
    # Owed bytes first, then plain: a thread that finds the socket plain sends them first.
    sock._shut_after_flush = ch.wr_shut
    sock._txb = owed
    _forkshare.downgraded(ch)  # a process sharing it by fork() goes plain too
    _detach_all(sock, ch, reason)
    if shut_rd:
        try:
            _socket.socket.shutdown(sock, socket.SHUT_RD)
        except OSError:
            pass
    sock._flush_plain(block=False)


def _detach_all(sock: CoSocket, ch: _Channel, reason: FallbackReason) -> None:
    """Every CoSocket on ``ch`` (dup()s, fromfd twins) goes plain; ``sock`` last.  Threads
    asleep on the channel are woken first (its wake-up fd closes with the channel)."""
    from ._selectors import _channels

    if ch.sleepers:
        _s.CoSocket._kick(ch)
    for ref in list(_channels.values()):
        other = ref()
        if other is not None and other is not sock and other._co is ch:
            other._reason = reason
            other._detach_channel()
    sock._reason = reason
    if sock._co is ch:
        sock._detach_channel()


#### Descriptors passed to another process


def before_passing(ancdata: list[Any]) -> None:
    """``sendmsg`` is about to pass fds (``SCM_RIGHTS``): an accelerated connection among
    them is downgraded first, so the receiving process gets an honest TCP stream (it has
    no channel) and we keep one too (both share the kernel's queue, as with TCP).

    Raises:
        OSError: a downgrade failed (see ``downgrade``); nothing is sent.
    """
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            raw = bytes(data)
            fds += array.array("i", raw[: len(raw) - len(raw) % 4])
    for fd in fds:
        for sock in _accelerated_on(fd):
            sock.cosock_downgrade()
            check_handed_over(sock)


def _accelerated_on(fd: int) -> list[CoSocket]:
    """This process's accelerated CoSockets on the socket ``fd`` refers to (same inode)."""
    from . import _residency

    try:
        st = os.fstat(fd)
    except OSError:
        return []
    if not stat.S_ISSOCK(st.st_mode):
        return []
    found = []
    for sock in _residency._live():
        try:
            other = os.fstat(sock.fileno())
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            found.append(sock)
    return found


#### After: what a plain fd cannot carry


def check_handed_over(sock: CoSocket) -> None:
    """Before the fd leaves us: refuse if the application has received bytes that only
    this object holds (taken off the kernel's queue, not read yet: they would vanish).

    Raises:
        OSError(EBUSY): so; read them first.
    """
    if sock._rxb:
        raise OSError(
            errno.EBUSY,
            f"cosock: {len(sock._rxb)} received bytes were already taken off the TCP stream "
            "and are not read yet; read them before handing the socket over",
        )
    sock._rxb = None


def _settle(sock: CoSocket, deadline: float) -> None:
    """The connection is plain: hand what we owe the peer to the kernel."""
    fd = sock.fileno()
    while not sock._flush_plain(block=False):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"cosock: the peer did not take the {len(sock._txb or b'')} bytes owed to "
                "it after the downgrade"
            )
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        poller.poll(max(1, int(left * 1000)))
