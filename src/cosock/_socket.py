"""``CoSocket``: a drop-in ``socket.socket`` whose data path is a shared-memory ring when
the peer is a co-resident cosock endpoint, and plain TCP otherwise.

Life of an accelerated connection (DESIGN.md, "Connection life"):

1. ``connect``: ask the agent's table (a local dict lookup) whether the destination is a
   co-resident cosock listener.  If so, bind an ephemeral port, create a sealed memfd with
   two rings, and hand it to the listener's rendezvous socket *before* the TCP connect
   (so the offer is queued when ``accept()`` sees the connection).  Then connect for real
   and send ``HELLO(nonce)`` in-band.
2. ``accept``: match the accepted 4-tuple with a queued offer, check the offer sender's
   network namespace against the guest owning the client address, map the memfd, and
   answer ``ACCEPT`` once the in-band nonce matches, else ``REJECT`` (plain TCP).
3. Both sides write optimistically into their ring before the verdict; on ``REJECT``
   every byte written so far is resent over TCP, so nothing is lost either way.
4. Data flows through the rings; the TCP connection carries only control frames (BELL,
   SPACE, FIN), which also makes ``fileno()`` (the TCP fd) an honest readiness fd.

Blocking, timeouts and non-blocking mode are emulated in Python while a channel is
attached (the kernel fd is then always non-blocking); plain sockets keep the kernel's own
behaviour and pay one attribute check per call.

Intentionally not overridden: ``sendto``/``recvfrom*`` beyond the connected-TCP forms, and
``os.sendfile`` on the raw fd (``socket.sendfile`` is routed through ``send``).
"""

from __future__ import annotations

import _socket
import errno
import fcntl
import functools
import io
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Final

from . import (
    _census,
    _config,
    _downgrade,
    _forkshare,
    _linger,
    _residency,
    _vmchannel,
    _vmloopback,
)
from ._errors import AgentUnavailable, FallbackReason, ProtocolError, RingCorrupted
from ._events import (
    NEED_DATA,
    Accept,
    Bell,
    Data,
    Eof,
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
)
from ._offer import Offer, normalise_host
from ._pool import take as take_channel
from ._pool import top_up as top_up_channels
from ._protocol import (
    FRAME_SIZES,
    HELLO_MAGIC,
    HELLO_SIZE,
    T_ACCEPT,
    T_BELL,
    T_DATA,
    T_FIN,
    T_PLAIN,
    T_REJECT,
    T_RINGMARK,
    T_SPACE,
    T_SWITCH,
    T_UPGRADE,
    Connection,
    Role,
    State,
)
from ._rendezvous import Rendezvous, netns_of_pid, send_offer
from ._ring import (
    CONTENDED_NS,
    YIELD_MASK,
    RingReader,
    RingWriter,
    map_channel_fd,
    spin_yield_mask,
    yield_cpu,
)
from ._selectors import EVENT_READ, EVENT_WRITE, track, untrack
from ._selectors import _channels as _tracked

_BaseSocket = socket.socket
_raw_family = _socket.socket.family.__get__
_raw_type = _socket.socket.type.__get__
_INET_FAMILIES: Final = (int(socket.AF_INET), int(socket.AF_INET6))
_SOCK_STREAM: Final = int(socket.SOCK_STREAM)
#: The kernel's send, whatever the Python-level timeout (see ``_flush_plain``).
_kernel_send = _socket.socket.send
#: Serialises sending owed bytes (``CoSocket._flush_plain``).
_owed_lock = threading.Lock()
#: The kernel's poll, bound now: enable() makes ``select.poll`` ring-aware for applications.
_kernel_poll = select.poll
# Plain ints: socket.MSG_* are IntFlag members, whose ``&`` costs microseconds in Python.
_MSG_PEEK: Final = int(socket.MSG_PEEK)
_MSG_WAITALL: Final = int(socket.MSG_WAITALL)
_MSG_DONTWAIT: Final = int(socket.MSG_DONTWAIT)
_CTL_CHUNK: Final = 65536
#: ``_take_frames`` verdicts on a frame: take it, take it and stop, stop before it.
_TAKE, _LAST, _STOP = 0, 1, 2
_ACCEPT: Final = b"\x02"  # the ACCEPT frame
#: Frames a doorbell drain may walk over (a SWITCH or DATA frame ends the walk).
_WAKE_FRAMES: Final = frozenset({T_BELL, T_SPACE, T_FIN})
#: The peer's path markers: what follows them may be DATA frames or plain bytes.
_MARKERS: Final = frozenset({T_SWITCH, T_PLAIN})
#: An upgrade's own frames, which the residency watch takes for an idle application
#: (``_pump_upgrade_only``), and how much of the queue it peeks at for them (UPGRADE, the
#: largest, is 17 bytes; the walk stops at the first frame of another kind).
_UPGRADE_FRAMES: Final = frozenset({T_UPGRADE, T_ACCEPT, T_REJECT, T_RINGMARK})
_UPGRADE_PEEK: Final = 64
#: Upper bound of one blocking sleep: a safety net only; wake-ups come from doorbells.
_MAX_SLEEP_MS: Final = 5000
#: A doorbell within this time of blocking means the peer is busy with us: spin longer.
_BUSY_WAKE_NS: Final = 5_000_000
#: A sleep this long means the connection idles: shrink the spin budget.
_IDLE_WAKE_NS: Final = 50_000_000
_HANDSHAKE, _SHM, _BROKEN = "handshake", "shm", "broken"
#: Path switch (DESIGN.md): we left the rings and wait for the peer's SWITCH, which says
#: where our resend starts; then data goes in DATA frames on TCP (``_FRAMED``).
_SWITCHING, _FRAMED = "switching", "tcp"
#: Server, upgrade accepted: our data goes into the new ring, the client's still comes in
#: DATA frames until its RINGMARK.
_UPGRADING = "upgrading"
#: On the rings, shared with another process by fork(): claimed before the next use
#: (``_forkshare``); shown as "shm".
_FORKED = "forked"
#: Payload of one DATA frame we send (the protocol accepts up to MAX_DATA_FRAME).
_DATA_CHUNK: Final = 256 * 1024
#: How long close() may wait to hand over bytes written before the verdict.
_CLOSE_LINGER: Final = 2.0
_WILDCARDS: Final = ("0.0.0.0", "::")
#: How long a probed source address is reused for one destination (see ``_source_ip``).
_SOURCE_TTL: Final = 1.0
_source_cache: dict[tuple[Any, ...], tuple[str, float]] = {}
#: ioctl: bytes in the kernel's send queue not yet sent (Linux ``SIOCOUTQNSD``).
_SIOCOUTQNSD: Final = 0x894B
#: SO_LINGER {on, 0 s}: close() sends RST at once.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_ENOTCONN_TEXT: Final = os.strerror(errno.ENOTCONN)


@functools.lru_cache(maxsize=1024)
def _is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


log = logging.getLogger("cosock")

#: ``COSOCK_TRACE=PATH``: append path-switch events with timestamps (diagnostics only).
_TRACE: Final = os.environ.get("COSOCK_TRACE")


def _trace(what: str, ch: _Channel) -> None:
    if _TRACE:
        with open(_TRACE, "a") as f:
            f.write(
                f"{time.monotonic():.6f} {os.getpid()} {threading.get_native_id()} "
                f"{ch.role.value} {what} phase={ch.phase} sleepers={ch.sleepers} "
                f"tx={ch.tx_base}+{None if ch.tx is None else ch.tx.head} "
                f"sent={ch.proto.sent_offset} tcp_next={ch.proto.tcp_next} "
                f"rx={ch.rx_base}+{None if ch.rx is None else ch.rx.tail} "
                f"received={ch.proto.received_offset} tx_out={len(ch.tx_out)}\n"
            )


#: ``agent.client.AgentClient``, imported on first use (the agent layer imports us).
_client_cls: Any = None


def _agent() -> Any:
    global _client_cls
    if _client_cls is None:  # an import statement here costs ~1 µs on every connect
        from .agent.client import AgentClient

        _client_cls = AgentClient
    vm = _vmchannel.directory()
    if vm is not None:  # a QEMU guest: the VM's own agent for loopback, else the gateway
        return _vmloopback.combined(_client_cls.shared(), vm)
    return _client_cls.shared()


def _check_fin(fin: int, base: int, rx: RingReader, avail: int) -> None:
    if base + rx.tail + avail > fin:
        raise RingCorrupted(f"peer wrote past its own FIN at offset {fin}: channel corrupted")


def _handshake_room(ch: _Channel) -> int:
    """Bytes a side may still write before the verdict (all of them kept for a resend)."""
    if ch.role is Role.SERVER:
        return max(0, _config.ring_size() if ch.tx is None else ch.tx.capacity) - len(ch.pre_out)
    assert ch.tx is not None
    return min(ch.tx.free(), ch.tx.capacity - ch.tx.head)


def _byte_view(data: Any, method: Any, sock: Any) -> memoryview:
    """``data`` as bytes; for what is not a buffer, CPython's own TypeError (its argument
    parsing rejects the object before any I/O, so the call never reaches the fd)."""
    try:
        return memoryview(data).cast("B")
    except TypeError:
        method(sock, data)
        raise


def _own_netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino


class _Channel:
    """Shared-memory state of one connection (shared by ``dup()``-ed objects)."""

    __slots__ = (
        "bell_mark",
        "bells_base",
        "counters",
        "ctl_lock",
        "ctl_out",
        "downgrade",
        "error",
        "fell_back",
        "fin",
        "fin_pending",
        "fork_cell",
        "forked",
        "kicks",
        "mm",
        "nodelay",
        "nonce",
        "peer_ip",
        "peer_reset",
        "phase",
        "pre_out",
        "proto",
        "rd_shut",
        "refs",
        "reject",
        "released",
        "reset_err",
        "retained",
        "retained_base",
        "role",
        "rv",
        "rv_path",
        "rx",
        "rx_base",
        "rx_busy",
        "rx_lock",
        "sleepers",
        "spin_max",
        "spin_min",
        "spin_ns",
        "tcp_eof",
        "tx",
        "tx_base",
        "tx_busy",
        "tx_out",
        "upgrade",
        "waiting",
        "watch_asked",
        "wr_shut",
        "yield_mask",
    )

    def __init__(self, role: Role, nonce: bytes, mm: Any, capacity: int) -> None:
        self.role = role
        self.nonce = nonce
        self.proto = Connection(role, nonce)
        self.mm = mm
        self.tx: RingWriter | None = None
        self.rx: RingReader | None = None
        if mm is not None:
            tx_index = 0 if role is Role.CLIENT else 1
            self.tx = RingWriter(mm, tx_index, capacity)
            self.rx = RingReader(mm, 1 - tx_index, capacity)
        self.phase = _HANDSHAKE
        self.nodelay = 0
        self.bell_mark = 0
        #: BELL frames parsed before the current ring (its writer counts from 0).
        self.bells_base = 0
        self.ctl_out = bytearray()
        # Server writes before the nonce is verified stay here, never in the ring: the
        # memfd came from whoever sent the offer, who must not read what we meant for the
        # connection's real client until its HELLO proves it is that client.
        self.pre_out = bytearray()
        self.ctl_lock = threading.Lock()
        self.rx_lock = threading.RLock()
        self.error: OSError | None = None
        self.tcp_eof = False
        self.rd_shut = False
        self.wr_shut = False
        self.fin_pending = False
        self.fin: int | None = None  # the peer's FIN offset, once received
        # The peer's Reset arrived (TCP: an RST; the socket is in CLOSE), and the error it
        # left pending for the next recv/send/SO_ERROR to report (TCP's sk_err).
        self.peer_reset = False
        self.reset_err: int | None = None
        self.refs = 1
        # Path switch: the ring bytes the peer had not consumed when we left the rings
        # (copied out at that moment: the ring is never read again), and our bytes waiting
        # for DATA frames.  ``*_busy`` mark a thread inside a ring copy, so that a switch
        # made by another thread waits for it (see ``_quiesce``).
        self.retained: bytearray | None = None
        self.retained_base = 0
        # The way back (TCP -> shm): a fresh channel's rings start at 0 while the stream
        # goes on, so each ring position is read as ``base + position``.
        self.rx_base = self.tx_base = 0
        self.rv: Rendezvous | None = None  # server: the listener's, for upgrade offers
        self.rv_path: str | None = None  # client: the listener's rendezvous socket
        self.upgrade: tuple[Any, int] | None = None  # client: (mapping, capacity) offered
        self.tx_out = bytearray()
        self.rx_busy = False
        self.tx_busy = False
        #: Threads inside ``_sleep`` (the residency watch leaves their fd alone then).
        self.sleepers = 0
        # One eventfd per sleeping thread (in a FileIO, so a channel lost without release()
        # still closes it on collection): a sibling thread took our wake-up (_sleep).  Each
        # sleeper has its own: with one shared fd, a sibling that kicked and then slept
        # itself drained the kick meant for the other.  ``waiting``: the sleepers' fds;
        # ``kicks``: idle ones, for the next sleep.
        self.waiting: list[io.FileIO] = []
        self.kicks: list[io.FileIO] = []
        self.released = False
        self.forked = False  # shared with another process by fork: the watch keeps off
        #: A REJECT is being acted on: sends queue behind the bytes it owes the peer
        #: (``_fallback``), never into ``pre_out`` or the ring again.
        self.fell_back = False
        #: A downgrade left the rings ("ring") or framed TCP ("framed"); None before.
        self.downgrade: str | None = None
        #: Shared by fork(): who may use the channel now (``_forkshare``).
        self.fork_cell: _forkshare.Cell | None = None
        self.peer_ip: str | None = None
        self.reject: FallbackReason | None = None
        #: We woke the residency watch to take the verdict for bytes written before it.
        self.watch_asked = False
        self.spin_ns = self.spin_min = _config.spin_ns()
        self.spin_max = _config.spin_max_ns()
        self.yield_mask = YIELD_MASK  # 0 while our CPU is shared with the peer (_sleep)
        #: Wake-up accounting (doorbells and blocking sleeps), reported by cosock_info().
        self.counters = {
            "bells_sent": 0,
            "spaces_sent": 0,
            "sleeps": 0,
            "sleep_ns": 0,
            "safety_timeouts": 0,
            "switches": 0,
            "upgrades": 0,
            "upgrades_refused": 0,
        }

    def bells_parsed(self) -> int:
        """BELL frames parsed for the current ring: comparable with its writer's count."""
        return self.proto.bells_received - self.bells_base

    def release(self) -> None:
        with self.ctl_lock:  # a thread about to sleep must not make a kick fd after this
            self.released = True
            for kick in self.waiting:
                try:
                    os.eventfd_write(kick.fileno(), 1)  # closing alone wakes no poll
                except OSError:
                    pass
            for kick in (*self.kicks, *self.waiting):
                kick.close()  # (the sleeper's own _give_kick drops it from ``waiting``)
            self.kicks.clear()
        for end in (self.tx, self.rx):
            if end is not None:
                end.release()
        self.tx = self.rx = None
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.upgrade is not None:
            self.upgrade[0].close()
            self.upgrade = None
        if self.rv is not None:
            self.rv.release()
            self.rv = None
        if self.fork_cell is not None:
            self.fork_cell.close()
            self.fork_cell = None


class CoSocket(socket.socket):
    """``socket.socket`` for AF_INET/AF_INET6 SOCK_STREAM with a shared-memory data path.

    Other families and types behave exactly like ``socket.socket``.
    """

    __slots__ = (
        "_co",
        "_lingering",
        "_listening",
        "_rv",
        "_rxb",
        "_shut_after_flush",
        "_txb",
        "_utimeout",
        "_why",
    )

    def __init__(
        self,
        family: int = -1,
        type: int = -1,
        proto: int = -1,
        fileno: int | None = None,
    ) -> None:
        super().__init__(family, type, proto, fileno)
        self._co: _Channel | None = None
        self._rv: tuple[Rendezvous, str, int] | None = None
        self._rxb: bytearray | None = None  # plain bytes owed to the app after a fallback
        self._txb: bytearray | None = None  # plain bytes owed to the peer after a fallback
        self._why: FallbackReason | None = None
        self._shut_after_flush = False
        self._lingering = False  # a closed connection's twin, finishing what it owed
        self._listening = False  # listen() was called (the census need not ask the kernel)
        self._utimeout: float | None = super().gettimeout()

    # ------------------------------------------------------------------ introspection

    @property
    def _reason(self) -> FallbackReason | None:
        return self._why

    @_reason.setter
    def _reason(self, why: FallbackReason | None) -> None:
        """Every fallback reason passes here: ``cosock status`` counts and lists them."""
        self._why = why
        if why is not None:
            _census.noted(self, why, self._listening)

    @property
    def cosock_path(self) -> str:
        """``"shm"`` once the channel is accepted, ``"handshake"`` before, else ``"tcp"``."""
        ch = self._co
        return "tcp" if ch is None else "shm" if ch.phase is _FORKED else ch.phase

    @property
    def cosock_fallback_reason(self) -> FallbackReason | None:
        return self._reason

    def cosock_info(self) -> dict[str, Any]:
        ch = self._co
        sent = received = 0
        if ch is not None and ch.phase in (_SWITCHING, _FRAMED):
            sent = ch.proto.sent_offset + len(ch.tx_out)
            received = ch.proto.received_offset - len(self._rxb or b"")
        elif ch is not None:
            sent = 0 if ch.tx is None else ch.tx_base + ch.tx.head
            received = 0 if ch.rx is None else ch.rx_base + ch.rx.tail
        return {
            "path": self.cosock_path,
            "fallback_reason": None if self._reason is None else self._reason.value,
            "error": None if ch is None or ch.error is None else str(ch.error),
            "bytes_sent": sent,
            "bytes_received": received,
            **({} if ch is None else ch.counters),
        }

    def cosock_switch(self) -> bool:
        """Move this connection from shared memory to TCP now, without losing a byte.

        What a residency change (migration) does on its own; also useful to test the path
        switch. Both directions switch; the peer follows when it reads our SWITCH frame.
        Returns False when there is nothing to switch (not on the shared-memory path).
        """
        return self._switch(self._pump)

    def _switch(self, pump: Callable[[_Channel], object]) -> bool:
        ch = self._co
        if ch is None:
            return False
        # Under the pump's lock: a thread that parsed the peer's SWITCH while ours is half
        # done (phase set, private copy not yet taken) would resend from nothing.
        with ch.rx_lock:
            if self._co is not ch or ch.phase is not _SHM or ch.tcp_eof or ch.forked:
                return False  # (forked: a fork came while we waited; see _cosock_service)
            try:
                self._begin_switch(ch)
                pump(ch)
            except (RingCorrupted, ProtocolError, ValueError) as exc:
                self._poison(ch, exc)
        return True

    def cosock_upgrade(self) -> bool:
        """Ask to move a switched connection back to shared memory with a fresh channel.

        What the residency watch does when a guest arrives next to its peer again. Only
        the client (connect()ing) side asks; the server verifies the new offer like a
        first one. Returns False when there is nothing to upgrade or no offer could be
        made; the answer arrives in-band (the path becomes ``"shm"`` when accepted).
        True says the UPGRADE went out: its answer may be acted on before we return (another
        thread reading), so whether one is still pending says nothing.
        """
        ch = self._co
        if ch is None or ch.phase is not _FRAMED or ch.role is not Role.CLIENT:
            return False
        try:
            return self._start_upgrade(ch, _agent())
        except Exception:
            return False

    def _cosock_pump(self) -> bool:
        """Consume queued control frames (the selector saw the TCP fd readable); True if
        any arrived (the kernel's readiness was taken: a selector may sleep again)."""
        ch = self._co
        if ch is not None and ch.phase is _FORKED:
            try:
                _forkshare.claim(self, ch)
            except OSError:
                return False  # the application's next call raises it
            ch = self._co
        if ch is None:
            return False
        try:
            if ch.rx is not None:
                ch.bell_mark = ch.rx.bells_sent()
            took = self._pump(ch)
            if ch.phase is _FRAMED:
                self._flush_framed(ch)
        except (RingCorrupted, ProtocolError, ValueError) as exc:
            self._poison(ch, exc)
            return False
        return took

    def _cosock_check_residency(self, agent: Any) -> None:
        """Residency watch: switch to TCP if the agent says the peer left this host.

        Undecided (nothing happens) while the agent is unreachable or does not know us.
        """
        ch = self._co
        if ch is None or ch.phase not in (_SHM, _FRAMED) or ch.tcp_eof or ch.error or ch.forked:
            return
        if ch.peer_ip is None:
            try:
                ch.peer_ip = normalise_host(super().getpeername()[0])
            except (OSError, ValueError):
                return
        if ipaddress.ip_address(ch.peer_ip).is_loopback:
            return  # same guest: wherever it goes, both ends go
        if not agent.available or agent.self_guest is None:
            _trace("residency: agent unavailable", ch)
            return
        coresident = agent.guest_owning(ch.peer_ip) is not None
        if ch.phase is _SHM and not coresident and agent.gone_for_sure(ch.peer_ip):
            _trace("residency: peer left", ch)
            # Not a full pump: DATA frames taken here would sit in our buffer while the
            # application sleeps on the kernel fd, which they no longer make readable.
            self._switch(self._pump_control_only)
        elif ch.phase is _FRAMED and coresident and ch.role is Role.CLIENT:
            self._start_upgrade(ch, agent)

    def _cosock_needs_service(self) -> bool:
        """Residency watch: is a switch unfinished (the peer's SWITCH not read yet, or
        resend bytes not handed to the kernel)?"""
        ch = self._co
        if ch is None or ch.tcp_eof or ch.error is not None or ch.forked:
            return False  # a forked twin's process may be reading the same TCP stream
        return (
            ch.phase is _SWITCHING
            or ch.phase is _HANDSHAKE  # the verdict, for an application that does not read
            or (ch.phase is _FRAMED and bool(ch.tx_out or ch.ctl_out))
            # e.g. the DATA frames and the RINGMARK (ACCEPT) an upgrade queued behind them
            or ((ch.phase is _SHM or ch.phase is _UPGRADING) and bool(ch.ctl_out))
        )

    def _cosock_upgrade_waits(self) -> bool:
        """Residency watch: may an upgrade wait for a frame this end has to read -- an
        UPGRADE to answer, the answer to ours, the client's RINGMARK?  An application that
        is not calling in never reads it: the watch looks each round (``_cosock_service``).
        Not a poll for POLLIN: unread DATA in front would make that fd ready for good."""
        ch = self._co
        if ch is None or ch.tcp_eof or ch.error is not None or ch.forked:
            return False
        if ch.phase is _UPGRADING:
            return True
        return ch.phase is _FRAMED and (ch.role is Role.SERVER or ch.upgrade is not None)

    def _cosock_pokeable(self) -> bool:
        """Residency watch: may the peer ask this connection to downgrade (watch POLLPRI)?"""
        ch = self._co
        if ch is None or ch.tcp_eof or ch.error is not None:
            return False
        return not ch.forked or _forkshare.may_serve(ch)

    def _cosock_poked(self) -> None:
        """Residency watch: the peer's urgent byte arrived (see ``_downgrade.poked``)."""
        _downgrade.poked(self)

    def _cosock_fork_requests(self) -> int | None:
        """Residency watch: the fd on which processes sharing our channel by fork() ask
        us (its owner) to hand it over; None if none."""
        ch = self._co
        return None if ch is None else _forkshare.owned_efd(ch)

    def _cosock_fork_serve(self) -> None:
        _forkshare.serve(self)

    def _cosock_service_events(self) -> int:
        ch = self._co
        if ch is None:
            return 0
        if ch.phase is _HANDSHAKE or ch.phase is _SWITCHING:
            # The peer's answer; and a non-blocking connect's HELLO, or our SWITCH, to send.
            return select.POLLIN | (select.POLLOUT if ch.ctl_out else 0)
        return select.POLLOUT  # framed bytes or queued frames (never POLLIN: see above)

    def _cosock_service(self) -> None:
        """Residency watch: move an unfinished switch or upgrade on for an application
        that is not calling into this socket.  An app thread asleep on the fd reads for
        itself, but frames queued after it fell asleep are sent from here: it may watch
        POLLIN only."""
        ch = self._co
        if ch is None:
            return
        with ch.rx_lock:
            # Again under the pump lock, which a fork() holds: a watch that found this
            # channel ours and then waited out a fork would otherwise take a frame (the
            # HELLO) off the stream the child now reads (CI: a ForkingTCPServer child in a
            # VM never saw its HELLO, the parent's watch had answered it).
            if ch.forked or self._co is not ch:
                return
            self._service_locked(ch)

    def _service_locked(self, ch: _Channel) -> None:
        try:
            if ch.phase is _HANDSHAKE and ch.ctl_out and self._connect_done():
                self._flush_ctl(ch)  # the peer may be waiting for our HELLO to answer
            if ch.sleepers:
                pass  # reading is the sleeper's
            elif ch.phase is _HANDSHAKE and ch.role is Role.SERVER:
                self._pump_hello_only(ch)
            elif ch.phase is _HANDSHAKE:
                self._pump_accept_only(ch)
            elif ch.phase is _SWITCHING:
                self._pump_control_only(ch)
            elif ch.phase is _FRAMED or ch.phase is _UPGRADING:
                self._pump_upgrade_only(ch)
            if self._co is not ch:
                return
            if ch.phase is _FRAMED:
                self._flush_framed(ch)
            elif ch.ctl_out and ch.phase is not _HANDSHAKE:
                self._flush_ctl(ch)
        except (RingCorrupted, ProtocolError, ValueError) as exc:
            self._poison(ch, exc)
        except OSError:
            pass  # the application's next call reports it

    def _connect_done(self) -> bool:
        """Has a non-blocking connect completed, without error (never consumes SO_ERROR)?"""
        poller = _kernel_poll()
        poller.register(self.fileno(), select.POLLOUT)
        ready = poller.poll(0)
        return bool(ready) and not ready[0][1] & (select.POLLERR | select.POLLHUP)

    def _pump_hello_only(self, ch: _Channel) -> None:
        """Settle the verdict for a server application that does not read: consume a
        queued HELLO and nothing else (other bytes are a plain client's, the app's)."""
        with ch.rx_lock:
            if self._co is ch and ch.proto.nonce_ok is None:
                self._take_if(ch, HELLO_SIZE, lambda head: head.startswith(HELLO_MAGIC))

    def _pump_accept_only(self, ch: _Channel) -> None:
        """Client: take a queued ACCEPT (never a REJECT: plain data follows that one, and
        it is the application's to read)."""
        with ch.rx_lock:
            if (
                self._co is ch
                and ch.proto.state is State.HELLO_SENT
                and not ch.proto.trailing_data[0]
            ):
                self._take_if(ch, 1, lambda head: head == _ACCEPT)

    def _take_if(self, ch: _Channel, size: int, wanted: Callable[[bytes], bool]) -> None:
        """Consume the next ``size`` queued bytes only if they are all there and
        ``wanted``; act on them."""
        try:
            head = super().recv(size, _MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        if len(head) == size and wanted(head):
            ch.proto.receive_data(super().recv(size))
            self._events(ch)

    def _pump_control_only(self, ch: _Channel) -> None:
        """Consume control frames up to and including the peer's SWITCH, never the DATA
        after it: those stay in the kernel, so the fd's readiness stays the application's."""
        with ch.rx_lock:
            if self._co is not ch:
                return
            try:
                peeked = super().recv(_CTL_CHUNK, _MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            if not peeked:
                self._pump_locked(ch)  # EOF: the ordinary path handles a peer that left
                return
            self._take_frames(ch, peeked, lambda kind: _LAST if kind in _MARKERS else _TAKE)

    def _pump_upgrade_only(self, ch: _Channel) -> None:
        """Take an upgrade's own frames (UPGRADE, ACCEPT or REJECT, RINGMARK) off the front
        of the stream and act on them.  Whatever stands in front of them (DATA, a FIN) is
        the application's, and so stays the fd's readiness: the upgrade then goes on when
        the application reads."""
        with ch.rx_lock:
            if self._co is not ch or (ch.phase is not _FRAMED and ch.phase is not _UPGRADING):
                return
            try:
                peeked = super().recv(_UPGRADE_PEEK, _MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            if peeked:  # (EOF: the application's to find)
                self._take_frames(
                    ch, peeked, lambda kind: _TAKE if kind in _UPGRADE_FRAMES else _STOP
                )

    def _take_frames(self, ch: _Channel, peeked: bytes, admit: Callable[[int], int]) -> None:
        """Consume the whole control frames at the front of the stream that ``admit`` lets
        through (``_TAKE``, ``_LAST``: this one and no more, ``_STOP``: not this one), and
        act on them; ``peeked`` is what MSG_PEEK showed of the kernel's queue.  DATA frames
        and anything incomplete stay queued."""
        self._take_parsed(ch, self._walk_frames(ch, peeked, admit)[0])

    @staticmethod
    def _walk_frames(ch: _Channel, peeked: bytes, admit: Callable[[int], int]) -> tuple[int, bool]:
        """How many bytes of ``peeked`` the whole control frames at the front of the stream
        that ``admit`` lets through span, and whether ``admit`` stopped the walk (else a
        DATA frame, an unknown or incomplete one, or the end did)."""
        pending, _ = ch.proto.trailing_data
        data = pending + peeked
        pos = 0
        while pos < len(data):
            kind = data[pos]
            size = FRAME_SIZES.get(kind)
            if size is None or kind == T_DATA or pos + size > len(data):
                break
            verdict = admit(kind)
            if verdict == _STOP:
                return pos - len(pending), True
            pos += size
            if verdict == _LAST:
                break
        return pos - len(pending), False

    def _take_parsed(self, ch: _Channel, take: int) -> None:
        """Take ``take`` bytes of whole frames off the kernel's queue and act on them."""
        if take <= 0:
            return
        try:
            chunk = _BaseSocket.recv(self, take)
            self._sync_offsets(ch)
            ch.proto.receive_data(chunk)
        except ProtocolError as exc:
            self._poison(ch, exc)
            return
        except OSError:
            return
        self._events(ch)

    def _cosock_kernel_write(self) -> bool:
        """Selectors: must the kernel also watch writability (framed bytes are queued)?"""
        ch = self._co
        return ch is not None and bool(ch.ctl_out or (ch.tx_out and ch.phase is _FRAMED))

    def getsockopt(self, *args: Any) -> Any:
        # asyncio and selector loops check SO_ERROR once a non-blocking connect is
        # writable: the connection is up, so that is the moment to send our HELLO.
        ch = self._co
        if ch is not None and ch.ctl_out:
            self._flush_ctl(ch)
        if ch is not None and args == (socket.SOL_SOCKET, socket.SO_ERROR):
            err = super().getsockopt(*args)  # (an RST's error is consumed here)
            self._read_control(ch)  # did the peer's Reset come (before that RST)?
            if not ch.peer_reset:
                return err
            pending, ch.reset_err = ch.reset_err, None  # TCP's error, cleared as read
            return pending or 0
        return super().getsockopt(*args)

    def getpeername(self) -> Any:
        ch = self._co
        if ch is not None and self._tcp_closed(ch):
            raise OSError(errno.ENOTCONN, _ENOTCONN_TEXT)
        return super().getpeername()

    def _tcp_closed(self, ch: _Channel) -> bool:
        """Would this connection's TCP socket be in CLOSE now (getpeername and shutdown
        then fail ENOTCONN)?  After the peer's reset; or once our FIN is out and the
        peer's has arrived.  The TCP connection itself stays up while we hold the channel
        (a path switch may still need it), so this is emulated; and as TCP's CLOSE does not
        wait for the application to read the peer's FIN, queued frames are read here."""
        if ch.peer_reset:
            return True
        if not ch.wr_shut or ch.fin_pending:
            return False
        if ch.fin is None:
            self._read_control(ch)
            if self._co is not ch:
                return False  # plain TCP now: the kernel knows
        return ch.fin is not None or ch.tcp_eof

    def _read_control(self, ch: _Channel) -> None:
        """Take queued control frames (never DATA: the fd's readiness stays the
        application's) to learn of the peer's FIN or Reset."""
        if ch.peer_reset or ch.tcp_eof or (ch.phase is not _SHM and ch.phase is not _FRAMED):
            return
        try:
            self._pump_control_only(ch)
        except (RingCorrupted, ProtocolError, ValueError) as exc:
            self._poison(ch, exc)

    def _cosock_events(self, wanted: int, arm: bool = True) -> int:
        """Selector readiness from the rings; arms the peer's wake-ups when not ready.

        A hostile peer's ring makes its socket ready (the next call raises the error), so
        one bad connection never breaks the selector loop that serves the others.
        ``arm=False``: the caller will not sleep on the answer, so the peer's wake-ups
        (doorbell, SPACE) need not be armed (no fence, the spinning flag is left alone).
        """
        ch = self._co
        if ch is not None and ch.phase is _FORKED:
            try:
                _forkshare.claim(self, ch)
            except OSError:
                return wanted  # the next call raises it
            ch = self._co
        if ch is None:
            return 0  # plain now: the kernel answers
        try:
            if ch.ctl_out:
                self._flush_ctl(ch)  # a completed non-blocking connect's HELLO
            return self._ring_events(ch, wanted, arm)
        except (RingCorrupted, ProtocolError, ValueError) as exc:
            self._poison(ch, exc)
            return wanted

    def _cosock_spin_reader(self) -> RingReader | None:
        """Selectors: the ring to poll before sleeping, if the channel is on it now and no
        thread of ours sleeps on it (a spinning flag would keep its doorbells away)."""
        ch = self._co
        if ch is None or ch.phase is not _SHM or ch.sleepers or self._rxb:
            return None
        return ch.rx

    def _ring_events(self, ch: _Channel, wanted: int, arm: bool = True) -> int:
        events = 0
        if wanted & EVENT_READ:
            if self._rxb or ch.tcp_eof or ch.rd_shut or ch.error is not None:
                events |= EVENT_READ
            elif ch.phase is _FRAMED and ch.fin is not None and self._rx_offset(ch) >= ch.fin:
                events |= EVENT_READ  # EOF
            elif ch.phase is _SHM and ch.rx is not None:
                rx = ch.rx
                eof = ch.fin is not None and ch.rx_base + rx.tail >= ch.fin
                if rx.available() or eof or (arm and rx.arm()):
                    events |= EVENT_READ
        if wanted & EVENT_WRITE:
            tx = ch.tx
            if ch.wr_shut or ch.tcp_eof or ch.error is not None or tx is None:
                events |= EVENT_WRITE
            elif ch.phase is _SWITCHING or ch.phase is _FRAMED:
                if len(ch.tx_out) < tx.capacity:
                    events |= EVENT_WRITE
            else:
                room = _handshake_room(ch) if ch.phase is _HANDSHAKE else tx.free()
                if room > 0 or (arm and ch.phase is _SHM and tx.request_space() > 0):
                    events |= EVENT_WRITE
        return events

    def _eligible(self) -> bool:
        # The raw ints: socket.socket's family/type properties build enums (~2 µs a call,
        # paid on every connect and accept, also to peers that are not co-resident).
        return _raw_family(self) in _INET_FAMILIES and _raw_type(self) == _SOCK_STREAM

    # ------------------------------------------------------------------ timeouts

    def settimeout(self, value: float | None) -> None:
        super().settimeout(value)
        self._utimeout = super().gettimeout()
        if self._co is not None:
            super().settimeout(0.0)

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def gettimeout(self) -> float | None:
        return self._utimeout

    def getblocking(self) -> bool:
        return self._utimeout != 0.0

    @property
    def timeout(self) -> float | None:  # type: ignore[override]
        """The timeout the application set (the kernel fd is non-blocking with a channel)."""
        return self._utimeout

    def _attach(self, ch: _Channel) -> None:
        self._co = ch
        super().settimeout(0.0)
        # Control frames are tiny and latency-critical: Nagle + delayed ACK would hold a
        # doorbell back for up to 40 ms.
        ch.nodelay = super().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        super().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            ch.peer_ip = normalise_host(super().getpeername()[0])
        except (OSError, ValueError):
            ch.peer_ip = None  # a non-blocking connect still in progress: set on demand
        track(self)
        _residency.ensure_watching()

    def _detach_channel(self) -> None:
        ch = self._co
        self._co = None
        untrack(self, self.fileno())
        super().settimeout(self._utimeout)
        if ch is not None and not ch.nodelay:
            try:
                super().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
            except OSError:
                pass
        if ch is not None:
            ch.refs -= 1
            if ch.refs == 0:
                ch.release()

    # ------------------------------------------------------------------ client side

    def connect(self, address: Any) -> None:
        ch = self._offer(address) if self._co is None and self._eligible() else None
        if ch is None:
            return super().connect(address)
        address = ch[1]
        try:
            super().connect(address)
        except BlockingIOError:
            self._start_client(ch[0], send_hello=False)
            raise
        except BaseException:
            ch[0].release()
            raise
        self._start_client(ch[0], send_hello=True)

    def connect_ex(self, address: Any) -> int:
        try:
            self.connect(address)
        except BlockingIOError as exc:
            return exc.errno or errno.EINPROGRESS
        except OSError as exc:
            if exc.errno is None:
                raise
            return exc.errno
        return 0

    def _offer(self, address: Any) -> tuple[_Channel, Any] | None:
        """Offer a channel to the destination's listener; None (with a reason) for plain TCP."""
        host, port = address[0], address[1]
        try:
            ip = normalise_host(host)
        except ValueError:
            infos = socket.getaddrinfo(host, port, self.family, socket.SOCK_STREAM)
            if not infos:
                return None
            address = infos[0][4]
            ip = normalise_host(address[0])
        try:
            agent = _agent()
            listener, why = agent.lookup(ip, port)
        except Exception:
            self._reason = FallbackReason.AGENT_UNREACHABLE
            return None
        if listener is None:
            self._reason = (
                FallbackReason.AGENT_UNREACHABLE
                if why.startswith("agent")
                else FallbackReason.NOT_CORESIDENT
            )
            return None
        me = agent.last_self_guest  # as of the lookup's poll: no second round
        if me is not None and listener.guest == me.name and not _config.loopback_enabled():
            self._reason = FallbackReason.LOOPBACK_DISABLED
            return None
        try:
            local = super().getsockname()
            src = normalise_host(local[0])
            probed = src in _WILDCARDS
            if probed:
                src = self._source_ip(address)
            if local[1] == 0:
                try:
                    self._bind_ephemeral(src)
                except OSError:
                    if not probed:
                        raise
                    src = self._source_ip(address, fresh=True)  # the cached one went stale
                    self._bind_ephemeral(src)
            local = (src, super().getsockname()[1])
        except OSError:
            self._reason = FallbackReason.RESOURCE
            return None
        made = self._send_channel_offer(listener.rendezvous, local, (ip, port))
        if isinstance(made, FallbackReason):
            self._reason = made
            return None
        nonce, mm, capacity = made
        ch = _Channel(Role.CLIENT, nonce, mm, capacity)
        ch.rv_path = listener.rendezvous  # where an upgrade is offered, should the
        return ch, address  # listener be gone by then

    def _send_channel_offer(
        self, path: str, local: Any, server: tuple[str, int], upgrade: bool = False
    ) -> tuple[bytes, Any, int] | FallbackReason:
        """Offer a fresh channel (memfd + nonce + 4-tuple) to a listener's rendezvous, for
        a first connect or an upgrade: ``(nonce, mapping, capacity)``, or why not."""
        if path.startswith(_vmchannel.RENDEZVOUS_PREFIX):  # another VM: a slot, not a memfd
            vm = _vmchannel.directory()
            if vm is None:
                return FallbackReason.AGENT_UNREACHABLE
            return vm.offer(local, server, upgrade)
        capacity = _config.ring_size()
        try:
            fd, mm = take_channel(capacity)  # fresh, never offered to anyone
        except OSError:
            return FallbackReason.RESOURCE
        try:
            nonce = os.urandom(16)
            offer = Offer(
                client=(normalise_host(local[0]), local[1]),
                server=server,
                nonce=nonce,
                capacity=capacity,
                family=4 if self.family == socket.AF_INET else 6,
            )
            send_offer(path, offer, fd)
        except OSError:
            mm.close()
            return FallbackReason.OFFER_UNDELIVERED
        except BaseException:
            mm.close()
            raise
        finally:
            os.close(fd)
        return nonce, mm, capacity

    def _source_ip(self, address: Any, fresh: bool = False) -> str:
        """The local address the kernel will pick for ``address`` (a UDP connect probes it).

        Probed once per destination and second: four syscalls a connect otherwise.  A stale
        answer is harmless: binding it fails if it is no longer ours (the caller then probes
        afresh), and any address that binds is ours, which is all the offer claims.
        """
        key = (self.family, address[0], address[3] if len(address) > 3 else 0)
        now = time.monotonic()
        hit = None if fresh else _source_cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        probe = _BaseSocket(self.family, socket.SOCK_DGRAM)
        try:
            probe.connect(address)
            src = normalise_host(str(probe.getsockname()[0]))
        finally:
            probe.close()
        if len(_source_cache) >= 1024:
            _source_cache.clear()
        _source_cache[key] = (src, now + _SOURCE_TTL)
        return src

    def _bind_ephemeral(self, src: str) -> None:
        """Bind ``src`` and a kernel-chosen port, so the offer can name the 4-tuple."""
        if self.family == socket.AF_INET6 and ":" not in src:
            src = "::ffff:" + src
        super().bind((src, 0))

    def _start_client(self, ch: _Channel, send_hello: bool) -> None:
        self._attach(ch)
        self._reason = None
        ch.ctl_out += ch.proto.send(Hello(ch.nonce))
        if send_hello:
            self._flush_ctl(ch)
        top_up_channels()  # we wait for the verdict next: make the next channel meanwhile

    # ------------------------------------------------------------------ server side

    def listen(self, backlog: int = socket.SOMAXCONN) -> None:
        super().listen(backlog)
        self._listening = True
        if self._rv is None and self._eligible():
            self._register_listener()

    def _register_listener(self) -> None:
        try:
            agent = _agent()
            directory = agent.rendezvous_dir
            if directory is None or agent.self_guest is None:
                self._reason = FallbackReason.AGENT_UNREACHABLE
                return
            rv = agent.listener() if _vmchannel.active() else Rendezvous(directory)
        except Exception:
            self._reason = FallbackReason.AGENT_UNREACHABLE
            return
        addr, port = super().getsockname()[:2]
        try:
            agent.listen(addr, port, str(rv.path))
        except (AgentUnavailable, OSError):
            rv.close()
            self._reason = FallbackReason.AGENT_UNREACHABLE
            return
        self._rv = (rv, addr, port)

    def accept(self) -> tuple[CoSocket, Any]:
        fd, addr = self._accept()  # type: ignore[attr-defined]
        sock = CoSocket(_raw_family(self), _raw_type(self), self.proto, fileno=fd)
        if socket.getdefaulttimeout() is None and self.gettimeout():
            sock.setblocking(True)
        if self._rv is not None:
            sock._server_attach(self._rv, addr)
            try:
                # A process that only accepts never asks the agent anything: let it notice
                # a restarted agent (and re-register this listener) here.  One recv syscall.
                _agent().poll()
            except Exception:
                pass
        elif self._eligible():
            # The listener never reached the agent: say so on each connection it accepts.
            sock._reason = self._reason or FallbackReason.AGENT_UNREACHABLE
        return sock, addr

    def _server_attach(self, listener: tuple[Rendezvous, str, int], peer: Any) -> None:
        """``peer`` is what accept() returned; a listener bound to one address needs no
        getsockname() to know the local end (two syscalls saved per connection)."""
        rv, addr, port = listener
        try:
            if normalise_host(addr) in _WILDCARDS:
                addr, port = super().getsockname()[:2]
        except (OSError, ValueError):
            return
        local = (addr, port)
        key = (normalise_host(peer[0]), peer[1], normalise_host(local[0]), local[1])
        pending = rv.take(key)
        if pending is None:
            self._reason = FallbackReason.NO_OFFER
            if self._hello_queued():
                # A cosock client whose offer we lack (expired, taken by a sibling process,
                # or sent to someone else): REJECT it in-band; its HELLO is not app data.
                ch = _Channel(Role.SERVER, os.urandom(16), None, _config.ring_size())
                ch.reject = FallbackReason.NO_OFFER
                self._attach(ch)
                self._pump(ch)
            return
        offer = pending.offer
        mm, reject = self._map_offer(pending, key[0], rv)
        ch = _Channel(Role.SERVER, offer.nonce, mm, offer.capacity)
        ch.reject = reject
        if reject is None:
            rv.hold()
            ch.rv = rv
        self._attach(ch)
        self._pump(ch)  # the HELLO is usually here already: settle the verdict now

    def _map_offer(
        self, pending: Any, client_ip: str, rv: Rendezvous
    ) -> tuple[Any, FallbackReason | None]:
        """Check an offer (first or upgrade) and map its memfd: ``(mapping, None)``, or
        ``(None, reason)``.  Takes ownership of the offer's fd."""
        if isinstance(pending, _vmchannel.VmPending):
            return pending.map()  # the gateway checked who may map it
        try:
            if not self._sender_owns(pending.pid, client_ip, rv.netns):
                return None, FallbackReason.OFFER_INVALID
            if pending.offer.capacity > _config.ring_max():
                return None, FallbackReason.RESOURCE  # a peer may not make us map gigabytes
            return map_channel_fd(pending.fd, pending.offer.capacity), None
        except RingCorrupted:
            return None, FallbackReason.OFFER_INVALID
        except OSError:
            return None, FallbackReason.RESOURCE
        finally:
            os.close(pending.fd)

    def _hello_queued(self) -> bool:
        """Do the first bytes already received look like a HELLO (never blocks)?"""
        timeout = super().gettimeout()
        super().settimeout(0.0)  # with a timeout, CPython would wait despite MSG_DONTWAIT
        try:
            head = super().recv(len(HELLO_MAGIC), _MSG_PEEK)
        except OSError:
            return False
        finally:
            super().settimeout(timeout)
        return bool(head) and HELLO_MAGIC.startswith(head)

    def _sender_owns(self, pid: int, client_ip: str, listener_netns: int) -> bool:
        """Does the offer's sender live in the guest that owns the claimed client address?

        A loopback client shares the listener's network namespace (``listener_netns``,
        recorded when it began to listen: a loopback connection reaches the listening
        socket only from the namespace that socket was made in).
        """
        sender_ns = netns_of_pid(pid)
        if sender_ns is None:
            return False
        if _is_loopback(client_ip):
            return sender_ns == listener_netns
        guest = _agent().guest_owning(client_ip)
        return guest is not None and guest.netns == sender_ns

    # ------------------------------------------------------------------ control stream

    def _flush_ctl(self, ch: _Channel) -> None:
        # One lock per channel: threads sharing a socket (a reader and a closer, say)
        # must not interleave or repeat control frames.
        with ch.ctl_lock:
            while ch.ctl_out:
                try:
                    n = super().send(ch.ctl_out)
                except (BlockingIOError, InterruptedError):
                    _trace(f"ctl-blocked {len(ch.ctl_out)}", ch)
                    return
                except OSError as exc:
                    if ch.error is None:
                        ch.error = exc.with_traceback(None)
                    ch.ctl_out.clear()
                    return
                del ch.ctl_out[:n]

    def _control(self, ch: _Channel, event: Any) -> None:
        if ch.tcp_eof:
            return  # the peer's TCP end is gone: nobody to wake or tell
        with ch.ctl_lock:
            try:
                ch.ctl_out += ch.proto.send(event)
            except ProtocolError:
                if isinstance(event, Bell | Space):
                    return  # another thread switched paths meanwhile: nothing to wake
                if isinstance(event, Fin | Upgrade) and _downgrade.leaving(ch):
                    return  # a downgrade began: TCP's own FIN after the resend; no upgrade
                raise
        self._flush_ctl(ch)

    def _sync_offsets(self, ch: _Channel, leaving: bool = False) -> None:
        """Tell the protocol how far the rings have moved (it checks FIN against it).

        Under ``ctl_lock``, like every change of the protocol object: a reader thread and a
        shutdown() both computed the same bytes as new and recorded them twice (or the
        reader's record came after the FIN: "data_sent() after FIN", the connection reset).
        """
        proto = ch.proto
        rx, tx = ch.rx, ch.tx
        with ch.ctl_lock:
            # A direction in DATA frames is counted by the protocol itself.
            if not proto.rx_framed and (ch.phase is _SHM or leaving) and rx is not None:
                offset = ch.rx_base + rx.tail
                if offset != proto.received_offset:
                    proto.data_received(offset - proto.received_offset)
            if not proto.tx_framed and tx is not None and not proto.fin_sent:
                offset = ch.tx_base + tx.head
                if offset != proto.sent_offset:
                    proto.data_sent(offset - proto.sent_offset)

    # ------------------------------------------------------------------ path switch

    def _begin_switch(self, ch: _Channel) -> None:
        """Leave the rings: freeze them, keep a private copy of what the peer has not
        consumed, and tell the peer exactly how much of its stream we took (SWITCH).

        From here on neither ring is read again -- after a migration the memory may be a
        stale copy, or garbage -- so everything unconsumed travels again, framed, on TCP.
        """
        self._leave_rings(ch)
        _forkshare.left(ch)
        ch.counters["switches"] += 1
        self._control(ch, Switch(ch.proto.received_offset))
        _trace("switch-sent", ch)

    def _leave_rings(self, ch: _Channel) -> None:
        """Stop using both rings for good (a switch or a downgrade): freeze them and keep a
        private copy of our bytes the peer has not consumed."""
        ch.phase = _SWITCHING  # fast paths stop here; a thread inside a copy finishes
        _trace("freeze", ch)
        self._quiesce(ch)
        _trace("quiesced", ch)
        tx = ch.tx
        assert tx is not None
        self._sync_offsets(ch, leaving=True)
        since = tx.consumed()  # validated: never past what we wrote
        ch.retained = bytearray(tx.unsent_bytes(since))
        ch.retained_base = ch.tx_base + since
        for end in (tx, ch.rx):
            if end is not None:
                end.freeze()
        if ch.fin is not None and ch.rx is not None and ch.rx_base + ch.rx.tail > ch.fin:
            raise RingCorrupted("peer wrote past its own FIN")

    @staticmethod
    def _quiesce(ch: _Channel) -> None:
        """Wait for another thread's ring copy to finish (it re-checks the phase first).

        Each side of the handshake writes its flag, then reads the other's: with the GIL
        ordering Python-level stores, one of the two sees the other.
        """
        spins = 0
        while ch.rx_busy or ch.tx_busy:
            # Never give up: a snapshot taken while another thread still copies would
            # miss (or double) its bytes.  Busy flags are always cleared in a finally.
            spins += 1
            time.sleep(0 if spins < 100 else 0.0005)  # lets the copying thread run

    def _switched(self, ch: _Channel) -> None:
        """The peer's SWITCH arrived (both of ours are out): resend from its consumed
        offset out of our private copy, then carry on in DATA frames."""
        start = ch.proto.resend_from
        retained = ch.retained if ch.retained is not None else bytearray()
        base = ch.retained_base
        if start is None or not base <= start <= base + len(retained):
            raise RingCorrupted(
                f"peer says it consumed {start} bytes; we still hold [{base}, "
                f"{base + len(retained)}): channel corrupted"
            )
        _trace(f"peer-switch resend={base + len(retained) - start}", ch)
        with ch.ctl_lock:  # in place: a writer thread may be appending to tx_out
            ch.tx_out[0:0] = retained[start - base :]
        ch.retained = None
        ch.phase = _FRAMED
        _vmchannel.switched(ch.mm)  # an ivshmem slot goes back now: its rings are frozen
        self._flush_framed(ch)

    # ------------------------------------------------------------------ upgrade

    def _start_upgrade(self, ch: _Channel, agent: Any) -> bool:
        """Client, on TCP after a switch, co-resident again: offer a fresh channel to the
        server's listener and ask for it in-band (UPGRADE with the new nonce).  True if an
        UPGRADE is out (now, or still unanswered from before)."""
        if ch.upgrade is not None:
            return True
        if ch.peer_ip is None or ch.wr_shut:
            return False
        try:
            peer_port = super().getpeername()[1]
            local = super().getsockname()
        except OSError:
            return False
        listener, _why = agent.lookup(ch.peer_ip, peer_port)
        path = ch.rv_path if listener is None else listener.rendezvous
        if path is None:
            return False  # no way to reach the server's process: stay on TCP
        made = self._send_channel_offer(path, local, (ch.peer_ip, peer_port), upgrade=True)
        if isinstance(made, FallbackReason):
            if _TRACE:  # the gateway's words are worth a look only when tracing
                vm = _vmchannel.directory()
                _trace(f"upgrade-not-offered {made.value} {vm and vm.last_refusal!r}", ch)
            return False  # stay on TCP; the watch asks again
        nonce, mm, capacity = made
        with ch.rx_lock:  # (a fork may have come during the offer: see _cosock_service)
            if ch.forked or self._co is not ch:
                mm.close()
                return False
            return self._send_upgrade(ch, path, nonce, mm, capacity)

    def _send_upgrade(self, ch: _Channel, path: str, nonce: bytes, mm: Any, capacity: int) -> bool:
        ch.rv_path = path
        ch.upgrade = (mm, capacity)  # before the UPGRADE: another thread may read the answer
        try:
            self._control(ch, Upgrade(nonce))
        except BaseException as exc:
            # Not asked after all (the protocol did not take the UPGRADE): a pending upgrade
            # nobody asked for was never retried (the watch offers again only once
            # ``upgrade`` is None again).  Once taken, the answer will come: keep it.
            pending = ch.upgrade
            if ch.proto.state is not State.UPGRADE_SENT and pending and pending[0] is mm:
                ch.upgrade = None
                mm.close()
            _trace(f"upgrade-not-sent {exc!r}", ch)
            raise
        _trace("upgrade-offered", ch)
        return True

    def _frame_all_locked(self, ch: _Channel) -> None:
        """Put every queued byte (and a pending FIN) into frames: what follows in the
        stream is about to live in a ring."""
        proto = ch.proto
        while ch.tx_out:
            chunk = bytes(ch.tx_out[:_DATA_CHUNK])
            del ch.tx_out[: len(chunk)]
            ch.ctl_out += proto.send(Data(chunk))
        if ch.fin_pending and not proto.fin_sent:
            ch.fin_pending = False
            ch.ctl_out += proto.send(Fin(proto.sent_offset))

    def _install_rings(self, ch: _Channel, mm: Any, capacity: int) -> None:
        old = (ch.tx, ch.rx, ch.mm)
        tx_index = 0 if ch.role is Role.CLIENT else 1
        ch.mm = mm
        ch.tx = RingWriter(mm, tx_index, capacity)
        ch.rx = RingReader(mm, 1 - tx_index, capacity)
        for end in old[:2]:
            if end is not None:
                end.release()
        if old[2] is not None:
            old[2].close()
        ch.bell_mark = 0
        # The new ring's doorbell count starts at 0; every BELL of the old one came before
        # the frame we install on (Upgrade, Accept) in the TCP stream and is parsed already.
        ch.bells_base = ch.proto.bells_received

    def _answer_upgrade(self, ch: _Channel) -> None:
        """Server: verify the client's new offer like a first one (sender's guest, nonce
        in-band, sizes); Accept moves our data into the new ring, else Reject."""
        _trace("upgrade-received", ch)
        reason: FallbackReason | None = None
        mm = None
        pending = None
        rv: Rendezvous | None = None
        try:
            peer = super().getpeername()
            local = super().getsockname()
            key = (normalise_host(peer[0]), peer[1], normalise_host(local[0]), local[1])
            rv = ch.rv
            pending = rv.take(key) if rv is not None else None
        except (OSError, ValueError):
            pending = None
        if pending is None or rv is None:
            reason = FallbackReason.NO_OFFER
        else:
            mm, reason = self._map_offer(pending, key[0], rv)
            with ch.ctl_lock:  # the protocol object is the writers' too (_handle_events)
                verified = reason is None and ch.proto.verify_upgrade(pending.offer.nonce)
            if reason is None and not verified:
                reason = FallbackReason.OFFER_INVALID
        if reason is not None or mm is None or pending is None:
            if mm is not None:
                mm.close()
            ch.counters["upgrades_refused"] += 1
            self._control(ch, Reject(reason or FallbackReason.OFFER_INVALID))
            return
        self._install_rings(ch, mm, pending.offer.capacity)
        self._tx_into_ring(ch, Accept(), _UPGRADING)

    def _upgrade_accepted(self, ch: _Channel) -> None:
        """Client: the server's data now comes through the new ring; ours follows after
        RINGMARK, once everything queued has gone out in frames."""
        _trace("upgrade-accepted", ch)
        assert ch.upgrade is not None
        mm, capacity = ch.upgrade
        ch.upgrade = None
        self._install_rings(ch, mm, capacity)
        ch.rx_base = ch.proto.received_offset
        self._tx_into_ring(ch, RingMark(), _SHM)

    def _tx_into_ring(self, ch: _Channel, mark: Accept | RingMark, phase: str) -> None:
        """Our data moves into the new ring after ``mark``: frame what is queued first."""
        with ch.ctl_lock:  # no writer may queue between the last frame and the switch
            self._frame_all_locked(ch)
            ch.ctl_out += ch.proto.send(mark)
            ch.tx_base = ch.proto.sent_offset
            ch.phase = phase
        ch.counters["upgrades"] += 1
        _trace(f"into-ring after {type(mark).__name__}", ch)
        self._flush_ctl(ch)

    def _upgrade_refused(self, ch: _Channel) -> None:
        if ch.upgrade is not None:
            ch.upgrade[0].close()
            ch.upgrade = None
        ch.counters["upgrades_refused"] += 1

    def _flush_framed(self, ch: _Channel) -> bool:
        """Send queued bytes as DATA frames; True once nothing is left queued."""
        proto = ch.proto
        while True:
            if ch.ctl_out:
                self._flush_ctl(ch)
                if ch.ctl_out:
                    return False
            if ch.error is not None or ch.tcp_eof:
                ch.tx_out.clear()
                return True
            with ch.ctl_lock:
                if not ch.tx_out or ch.phase is not _FRAMED:
                    break  # (a downgrade began: its marker is the last frame we send)
                chunk = bytes(ch.tx_out[:_DATA_CHUNK])
                del ch.tx_out[: len(chunk)]
                ch.ctl_out += proto.send(Data(chunk))
        if ch.fin_pending and proto.tcp_next == proto.sent_offset and ch.phase is _FRAMED:
            self._send_fin(ch)
        return True

    def _pump(self, ch: _Channel) -> bool:
        """Read every queued control byte and act on it; True if anything arrived.

        Serialised per channel: after a path switch the control stream carries data, and
        two threads feeding the parser could reorder it.
        """
        with ch.rx_lock:
            if self._co is not ch:
                return False  # another thread ended the channel while we waited: the
            return self._pump_locked(ch)  # queued bytes are plain data now, not ours

    def _pump_upto(self, ch: _Channel, bells: int) -> None:
        """Read the queued control frames like ``_pump``, but stop at the first doorbell
        younger than ``bells`` (the writer's count before we found the ring empty): it
        announces bytes published since, which our read may not take whole -- consumed
        here, it would leave them in the ring with the raw fd unreadable.  It is drained
        with the read that empties the ring (``_drain_stale_bells``)."""
        with ch.rx_lock:
            if self._co is not ch:
                return
            if ch.ctl_out:
                self._flush_ctl(ch)
            want = bells - ch.bells_parsed()
            try:
                peeked = super().recv(_CTL_CHUNK, _MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._pump_locked(ch)  # records the error
                return

            def admit(kind: int) -> int:
                nonlocal want
                if kind != T_BELL:
                    return _TAKE
                if want <= 0:
                    return _STOP  # the first young doorbell: not ours to consume
                want -= 1
                return _TAKE

            young, stopped = 0, False
            if peeked and ch.phase is _SHM:  # (else EOF, or data frames may follow)
                young, stopped = self._walk_frames(ch, peeked, admit)
            if stopped:
                self._take_parsed(ch, young)
            else:
                self._pump_locked(ch)

    def _pump_locked(self, ch: _Channel) -> bool:
        progressed = False
        if ch.ctl_out:
            self._flush_ctl(ch)
        while not ch.tcp_eof:
            try:
                data = super().recv(_CTL_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                ch.error = exc.with_traceback(None)  # a traceback would pin callers' buffers
                ch.tcp_eof = True
                progressed = True
                break
            progressed = True
            try:
                self._sync_offsets(ch)
                ch.proto.receive_data(data)
            except ProtocolError as exc:
                self._poison(ch, exc)
                return True
            if not data:
                ch.tcp_eof = True
                break
            if len(data) < _CTL_CHUNK:
                break
        if progressed:
            self._events(ch)
        if ch.tcp_eof and ch.phase is _SWITCHING:
            self._peer_gone_while_switching(ch)
        return progressed

    @staticmethod
    def _peer_gone_while_switching(ch: _Channel) -> None:
        """The peer closed before answering our SWITCH: it can resend nothing, so what it
        left in the ring is all there is.  Read it as before (and send nothing more)."""
        if ch.downgrade == "framed":  # the rings were left long ago: never read them
            ch.phase = _FRAMED
            ch.retained = None
            with ch.ctl_lock:
                ch.tx_out.clear()
            return
        for end in (ch.tx, ch.rx):
            if end is not None:
                end.thaw()
        ch.phase = _SHM
        ch.retained = None
        with ch.ctl_lock:
            ch.tx_out.clear()

    @staticmethod
    def _peer_reset(ch: _Channel) -> None:
        """The peer closed with our bytes unread (its Reset; an RST follows on TCP).

        As Linux handles an RST: what the peer sent before stays readable; then one recv,
        send or SO_ERROR reports the error, ECONNRESET -- or EPIPE when the peer's FIN came
        first (CLOSE_WAIT), which recv never reports (EOF) -- and later sends fail EPIPE.
        """
        ch.peer_reset = True
        ch.reset_err = errno.EPIPE if ch.fin is not None else errno.ECONNRESET
        ch.tcp_eof = True
        if ch.phase is _SWITCHING:
            CoSocket._peer_gone_while_switching(ch)

    @staticmethod
    def _reset_error(ch: _Channel) -> OSError:
        """The error a peer's reset left pending, reported (and cleared) now."""
        err, ch.reset_err = ch.reset_err, None
        if err == errno.ECONNRESET:
            return ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return BrokenPipeError(errno.EPIPE, "Broken pipe")

    def _poison(self, ch: _Channel, exc: Exception) -> None:
        """A hostile or broken peer: the connection fails like a reset TCP connection.

        Except on a server still waiting for HELLO: there the bytes are from a plain client
        that happens to reuse the 4-tuple of a stale offer, so they go to the application.
        """
        if ch.role is Role.SERVER and ch.phase is _HANDSHAKE and ch.proto.nonce_ok is None:
            data, _ = ch.proto.trailing_data
            with ch.ctl_lock:  # a racing sender queues behind these (see _fallback)
                owed = bytearray(ch.pre_out)
                ch.pre_out.clear()
                ch.fell_back = True
            self._reason = FallbackReason.NO_OFFER
            with _owed_lock:
                self._txb = owed
            self._detach_channel()
            self._owe_app(data)
            self._flush_plain(block=False)
            return
        if ch.error is None:
            ch.error = ConnectionResetError(errno.ECONNRESET, f"cosock: {exc}")
        ch.tcp_eof = True
        ch.phase = _BROKEN

    @staticmethod
    def _take_kick(ch: _Channel) -> io.FileIO | None:
        """Count the calling thread as a sleeper and give it its own eventfd, on which
        siblings wake it (made at a first sleep: most channels never sleep); None if no
        descriptor is left (its wake-ups then rely on the safety timeout)."""
        with ch.ctl_lock:
            ch.sleepers += 1
            if ch.released:
                return None
            if ch.kicks:
                kick: io.FileIO | None = ch.kicks.pop()
            else:
                try:
                    kick = io.FileIO(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC), "r")
                except OSError:
                    return None
            assert kick is not None
            ch.waiting.append(kick)
            return kick

    @staticmethod
    def _give_kick(ch: _Channel, kick: io.FileIO | None, kicked: bool) -> None:
        """The sleep is over: drain our eventfd if ``kicked`` (the poll saw it readable; a
        read of an unkicked one is a failed syscall per sleep, on the round-trip path) and
        keep it for the next sleep. A kick that landed after the poll stays counted: it ends
        the next sleep at once, which then drains it; a spurious wake, never a lost one."""
        with ch.ctl_lock:
            ch.sleepers -= 1
            if kick is None:
                return
            ch.waiting.remove(kick)
            if kick.closed:
                return  # released meanwhile
            if kicked:
                try:
                    os.eventfd_read(kick.fileno())
                except OSError:
                    pass  # not kicked after all
            if ch.released:
                kick.close()
            else:
                ch.kicks.append(kick)

    @staticmethod
    def _kick(ch: _Channel) -> None:
        """Wake every thread of ours asleep on ``ch``."""
        with ch.ctl_lock:
            for kick in ch.waiting:
                try:
                    os.eventfd_write(kick.fileno(), 1)
                except (OSError, ValueError):
                    pass  # released meanwhile

    def _events(self, ch: _Channel) -> None:
        """Act on what the protocol parsed; then wake threads of ours asleep on this
        channel: the frames we took may have been their doorbell, or their data.

        A frame we could not answer (our own send refused by the protocol) fails the
        connection like a reset: raised from recv(), a ProtocolError is no OSError, and
        ended the reading thread of an application that catches OSError only (CI's
        twenty-migration stall), leaving the peer waiting for the answer for ever."""
        try:
            self._handle_events(ch)
        except ProtocolError as exc:
            self._poison(ch, exc)
        finally:
            if ch.sleepers:
                self._kick(ch)

    def _handle_events(self, ch: _Channel) -> None:
        while self._co is ch:
            try:
                # Under ctl_lock, as every send() is: a writer thread's send() reads the
                # state, builds its frame, then stores the state it computed -- over ours,
                # were an UPGRADE (or its answer) parsed meanwhile: our ACCEPT then "cannot
                # be sent in state FRAMED" and the upgrade hung (the CI run after
                # migration #10).  The protocol object is not thread-safe by design.
                with ch.ctl_lock:
                    event = ch.proto.next_event()
            except ProtocolError as exc:
                self._poison(ch, exc)
                return
            if event is NEED_DATA:
                return
            if type(event) is Bell:
                continue  # the common frame: callers re-check their rings
            if isinstance(event, Plain) or (
                isinstance(event, Switch | Upgrade) and _downgrade.leaving(ch)
            ):
                _downgrade.on_event(self, ch, event)  # the downgrade: plain TCP from here
            elif isinstance(event, Hello):
                self._verdict(ch)
            elif isinstance(event, Accept) and ch.phase is _FRAMED:
                self._upgrade_accepted(ch)
            elif isinstance(event, Reject) and ch.phase is _FRAMED:
                self._upgrade_refused(ch)
            elif isinstance(event, Upgrade):
                self._answer_upgrade(ch)
            elif isinstance(event, RingMark):
                ch.rx_base = ch.proto.received_offset  # the client's data: now in the ring
                ch.phase = _SHM
                _trace("ringmark-received", ch)
            elif isinstance(event, Accept):
                ch.phase = _SHM
                if ch.tx is not None and ch.tx.head:
                    self._bell(ch)  # bytes written before the verdict were never rung
                if ch.fin_pending:
                    self._send_fin(ch)
            elif isinstance(event, Reject):
                self._fallback(ch, event.reason)
            elif isinstance(event, PlainData | Data):
                self._owe_app(event.data)
            elif isinstance(event, Switch):
                try:
                    if ch.phase is _SHM:
                        self._begin_switch(ch)  # the peer went first: answer with ours
                    self._switched(ch)
                except (RingCorrupted, ValueError) as exc:
                    self._poison(ch, exc)
                    return
            elif isinstance(event, Reset):
                self._peer_reset(ch)
            elif isinstance(event, Eof):
                ch.tcp_eof = True
                if ch.phase is _SWITCHING:
                    self._peer_gone_while_switching(ch)
            elif isinstance(event, Fin):
                ch.fin = event.offset
                _forkshare.noted_fin(ch)
            # Bell, Space, Fin: state lives in the protocol and the rings; callers re-check.

    def _verdict(self, ch: _Channel) -> None:
        reason = ch.reject
        if reason is None and not ch.proto.nonce_ok:
            reason = FallbackReason.OFFER_INVALID
        if reason is None:
            self._control(ch, Accept())
            # The writes held back go into the ring before any other: a sender thread sees
            # the phase change only after they are in (under ctl_lock, as its appends to
            # pre_out are). Published first, the phase let a sender write into the ring
            # alongside: two writers of one ring, which overwrote each other's bytes and
            # together wrote past its capacity (CI: "peer ring head 1055915 outside
            # [0, 1048576]"; in lab runs, a stream of the right length with wrong bytes).
            with ch.ctl_lock:
                held = bool(ch.pre_out) and ch.tx is not None
                if held and ch.tx is not None:  # fits: the ring is empty and as large
                    ch.tx.write(memoryview(ch.pre_out), ch.tx.free())
                    ch.pre_out.clear()
                ch.phase = _SHM
            if held:
                self._bell(ch)
            if ch.fin_pending:
                self._send_fin(ch)
            return
        ch.ctl_out += ch.proto.send(Reject(reason))
        self._fallback(ch, reason)

    def _fallback(self, ch: _Channel, reason: FallbackReason) -> None:
        """Give up on shared memory before the channel was accepted: resend our ring bytes.

        A sender thread may be writing meanwhile (into ``pre_out``, or the client's ring):
        the mark below, under ``ctl_lock`` and inside a ring write's ``tx_busy`` window,
        sends it to the owed queue instead, behind what is taken here. Without it, bytes
        a sender added after this snapshot were counted as sent and never went out."""
        with ch.ctl_lock:  # ours to send now, once: no thread may flush it again
            owed = bytearray(ch.ctl_out)
            ch.ctl_out.clear()
            ch.fell_back = True
            if ch.role is Role.SERVER:
                owed += ch.pre_out
                ch.pre_out.clear()
        if ch.role is not Role.SERVER and ch.tx is not None:
            while ch.tx_busy:  # a ring write that began before the mark: let it end
                time.sleep(0)
            owed += ch.tx.unsent_bytes(0)
        leftover = ch.proto.next_event()
        while leftover is not NEED_DATA:
            if isinstance(leftover, PlainData):
                self._owe_app(leftover.data)
            leftover = ch.proto.next_event()
        self._reason = reason
        if ch.forked or ch.refs > 1:
            _shared_fds.add(self)  # plain from here, but not this fd's alone
        with _owed_lock:
            self._txb = owed  # before the detach: a racing sender queues behind it
        self._detach_channel()
        self._shut_after_flush = ch.wr_shut
        self._flush_plain(block=False)

    def _owe_peer(self, data: memoryview) -> bool:
        """A send during a fallback: queue ``data`` behind the bytes it owes the peer;
        False if they are not set out yet, or already sent (then send the plain way)."""
        with _owed_lock:
            if self._txb is None:
                return False
            self._txb += data
            return True

    def _owe_app(self, data: bytes) -> None:
        if data:
            if self._rxb is None:
                self._rxb = bytearray()
                _rxb_holders.add(self)  # a fork() makes their fds shared (_reset_plain)
            self._rxb += data

    def _send_fin(self, ch: _Channel) -> None:
        ch.fin_pending = False
        if not ch.proto.fin_sent and not ch.tcp_eof:
            self._sync_offsets(ch)
            self._control(ch, Fin(ch.proto.sent_offset))

    def _bell(self, ch: _Channel) -> None:
        assert ch.tx is not None
        if ch.phase is _HANDSHAKE:
            self._pump(ch)  # has the verdict arrived?  Before it, the peer reads no ring.
            if self._co is not ch:
                return
            if ch.phase is not _HANDSHAKE:
                return  # the ACCEPT we took rang for every ring byte, ours included
            if not ch.watch_asked:
                # Our bytes wait unannounced until the ACCEPT, which rings for them
                # (_handle_events) -- when we next call in, or when the residency watch
                # takes it (it serves handshakes, but may be in a 1 s idle sleep that
                # began before this connection): wake it to look now.
                ch.watch_asked = True
                _residency.wake()
            return
        if ch.ctl_out and not ch.tcp_eof:
            self._flush_ctl(ch)
            if ch.ctl_out:
                # The peer is not reading its TCP socket; the frame still queued will wake
                # it.  Queueing one doorbell per write would grow without bound.
                return
        ch.tx.count_bell()
        ch.counters["bells_sent"] += 1
        self._control(ch, Bell())

    # ------------------------------------------------------------------ waiting

    def _deadline(self, flags: int) -> float | None:
        """None = wait forever, 0.0 = never wait, else a monotonic deadline."""
        if self._utimeout == 0.0 or (flags & _MSG_DONTWAIT and self._utimeout is None):
            return 0.0  # with a timeout, CPython waits for readiness even under MSG_DONTWAIT
        if self._utimeout is None:
            return None
        return time.monotonic() + self._utimeout

    def _sleep(
        self, ch: _Channel, deadline: float | None, ready: Any = None, arm: Any = None
    ) -> None:
        """Spin while ``ready()`` is false, then ``arm()`` the peer's doorbell (it re-checks
        after a fence) and block on the TCP fd until a control frame arrives.

        The spin budget adapts like an adaptive mutex: a sleep that a doorbell ends soon
        means the peer is busy with us, so spinning longer would have avoided a costly
        wake-up (tens of µs idle, milliseconds on a loaded 2-core machine); a long or
        timed-out sleep means the connection idles, so the budget shrinks back.

        Raises:
            TimeoutError: the deadline passed.
        """
        if ready is not None and ch.spin_ns:
            end = time.perf_counter_ns() + ch.spin_ns
            spins = 0
            entry = ch.phase
            mask = ch.yield_mask
            try:
                while time.perf_counter_ns() < end:
                    if ch.phase is not entry:
                        return  # switched paths: the ring is not to be looked at again
                    try:
                        if ready():
                            return
                    except ValueError:
                        if self._co is ch and not ch.released:
                            raise
                        return  # released under us (a downgrade, a close): look again
                    spins += 1
                    # On time-shared vCPUs the peer may wait for *our* CPU: a pure spin
                    # would hold it until the next tick (4 ms at HZ=250); see yield_cpu.
                    if spins & mask == 0:
                        took = yield_cpu()
                        if took > CONTENDED_NS:
                            ch.spin_ns = max(ch.spin_ns // 2, ch.spin_min)
                            break
                        mask = spin_yield_mask(took)
            finally:
                ch.yield_mask = mask
        phase = ch.phase
        # Counted before arm(): from here on, another thread of ours that takes our
        # doorbell off the shared TCP stream (full duplex) kicks us (_events).
        kicker = self._take_kick(ch)
        kick = None if kicker is None or kicker.closed else kicker.fileno()
        kicked = False
        try:
            try:
                if arm is not None and (phase is _SWITCHING or phase is _FRAMED or arm()):
                    return
            except ValueError:
                if self._co is ch and not ch.released:
                    raise
                # The ring was released under us by another thread (a downgrade or a
                # close after the phase we read): the caller looks again (it used to
                # report EBADF, "closed during recv", for a downgrade).
                return
            if deadline is None:
                timeout = _MAX_SLEEP_MS
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out")  # like CPython: no errno
                timeout = min(_MAX_SLEEP_MS, max(1, int(left * 1000 + 0.999)))
            poller = _kernel_poll()
            output = bool(ch.ctl_out or (ch.tx_out and ch.phase is _FRAMED))
            fd = self.fileno()
            poller.register(fd, select.POLLIN | (select.POLLOUT if output else 0))
            if kick is not None:
                poller.register(kick, select.POLLIN)
            if ch.phase is not phase:
                return  # the residency watch switched paths meanwhile: look again
            t0 = time.perf_counter_ns()
            woken = poller.poll(timeout)
            slept = time.perf_counter_ns() - t0
            kicked = kick is not None and any(who == kick for who, _ in woken)
        finally:
            self._give_kick(ch, kicker, kicked)
        if output and any(who == fd and ev & select.POLLOUT for who, ev in woken):
            if ch.phase is _FRAMED:
                self._flush_framed(ch)
            else:
                self._flush_ctl(ch)
        ch.counters["sleeps"] += 1
        ch.counters["sleep_ns"] += slept
        if not woken and timeout == _MAX_SLEEP_MS:
            ch.counters["safety_timeouts"] += 1  # only an idle peer, or a lost wake-up
        if slept > 100_000_000:
            _trace(f"slept {slept // 1_000_000} ms phase-at-entry={phase} woken={woken}", ch)
        if ready is None:
            return
        if woken and slept < _BUSY_WAKE_NS:
            ch.spin_ns = min(ch.spin_ns * 2 or _config.spin_ns(), ch.spin_max)
        elif not woken or slept > _IDLE_WAKE_NS:
            ch.spin_ns = max(ch.spin_ns // 2, ch.spin_min)

    # ------------------------------------------------------------------ receive

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self._co is None and self._rxb is None and self._txb is None:
            return super().recv(bufsize, flags)
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        ch = self._co
        rx = None if ch is None else ch.rx
        if ch is not None and ch.phase is _SHM and not flags and not ch.rd_shut and rx:
            # (bytes framed before an upgrade wait in _rxb: the slow path serves them first)
            try:
                bells = rx.begin_read()  # before the ring: see _drain_stale_bells
                avail = rx.available()
                if avail and rx.recv_spin:  # another thread's blocking recv spins on it
                    bells = rx.end_spin_read()
                    avail = rx.available()
                if avail and ch.fin is None and not self._rxb:  # fast path: one copy
                    n = min(avail, bufsize)
                    ch.rx_busy = True
                    try:
                        data = rx.read_bytes(n) if ch.phase is _SHM else None
                    finally:
                        ch.rx_busy = False
                    if data is not None:
                        self._consumed(ch, n, avail, bells)
                        return data
            except ValueError:
                if not self._released_under_us(ch):
                    raise  # (the slow path below looks at the socket afresh)
        buf = bytearray(bufsize)
        n = self._recv_into(memoryview(buf), bufsize, flags)
        return bytes(buf) if n == bufsize else bytes(memoryview(buf)[:n])

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        ch = self._co
        if ch is None:
            if self._rxb is None and self._txb is None:
                return super().recv_into(buffer, nbytes, flags)
        elif ch.phase is _SHM and not flags and ch.fin is None and not ch.rd_shut and not self._rxb:
            rx = ch.rx
            assert rx is not None
            try:
                bells = rx.begin_read()  # before the ring: see _drain_stale_bells
                avail = rx.available()
                if avail and rx.recv_spin:  # another thread's blocking recv spins on it
                    bells = rx.end_spin_read()
                    avail = rx.available()
            except ValueError:
                if not self._released_under_us(ch):
                    raise
                avail = 0  # the slow path below looks at the socket afresh
            if avail:  # fast path: data is there, take it
                view = buffer if type(buffer) is memoryview else memoryview(buffer)
                if view.format != "B" or view.ndim != 1:
                    view = view.cast("B")
                size = len(view)
                n = 0
                if 0 <= nbytes <= size and not view.readonly:  # else raise as CPython below
                    n = nbytes or size
                    if n > avail:
                        n = avail
                    ch.rx_busy = True
                    try:
                        if ch.phase is _SHM:
                            rx.read_into(view, n)
                        else:
                            n = 0
                    finally:
                        ch.rx_busy = False
                if n:
                    self._consumed(ch, n, avail, bells)
                    return n
        view = memoryview(buffer).cast("B")
        if view.readonly:  # CPython's own TypeError: its argument parsing rejects it, no I/O
            return super().recv_into(buffer, nbytes, flags)
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        if nbytes == 0 or nbytes > len(view):
            if nbytes > len(view):
                raise ValueError("buffer too small for requested bytes")
            nbytes = len(view)
        return self._recv_into(view, nbytes, flags)

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        if self._co is None and self._rxb is None and self._txb is None:
            return super().recvfrom(bufsize, flags)
        return self.recv(bufsize, flags), None

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, Any]:
        if self._co is None and self._rxb is None and self._txb is None:
            return super().recvfrom_into(buffer, nbytes, flags)
        return self.recv_into(buffer, nbytes, flags), None

    def recvmsg(
        self, bufsize: int, ancbufsize: int = 0, flags: int = 0
    ) -> tuple[bytes, list[tuple[int, int, bytes]], int, Any]:
        if self._co is None and self._rxb is None and self._txb is None:
            return super().recvmsg(bufsize, ancbufsize, flags)
        return self.recv(bufsize, flags), [], 0, None

    def _recv_into(self, view: memoryview, nbytes: int, flags: int) -> int:
        if nbytes == 0:
            return 0
        ch = self._co
        if ch is not None and ch.phase is _FORKED:
            _forkshare.claim(self, ch)
            ch = self._co
        if ch is None or self._deadline(flags) == 0.0:
            # A non-blocking caller returns to its event loop, which waits on the fd:
            # every publish into the ring it has caught up with must ring the doorbell.
            return self._recv_loop(view, nbytes, flags)
        # While a blocking caller is inside recv the writer need not ring for what it will
        # take: we look at the ring again before we block (the flag is cleared, fenced and
        # re-checked in arm), and bytes found while flagged are claimed before they are
        # copied (end_spin_read, see _shm_read).  A peek takes nothing; bytes already
        # taken off TCP (_rxb) may end the call before the ring is looked at.
        rx = ch.rx
        if ch.phase is _SHM and rx is not None and not flags & _MSG_PEEK and not self._rxb:
            try:
                rx.set_spinning(True, nbytes)
            except ValueError:
                if not self._released_under_us(ch):
                    raise  # (released under us: the loop looks at the socket afresh)
        # A spin left by an exception, an early return or a path change ends here, on the
        # ring the channel has *now*: a recv begun in the handshake had none at entry, and
        # used to leave the flag set for good (no doorbell ever again while the peer's
        # writes fit: test_a_recv_begun_in_the_handshake_leaves_the_doorbell_on).
        try:
            return self._recv_loop(view, nbytes, flags)
        except ValueError:
            if self._co is ch:
                raise
            raise OSError(errno.EBADF, "Bad file descriptor: closed during recv") from None
        finally:
            now = self._co
            rx = None if now is None else now.rx
            if rx is not None and rx.recv_spin:
                try:
                    rx.end_spin()
                except ValueError:
                    pass  # released by a close meanwhile: nobody to ring for

    def _recv_loop(self, view: memoryview, nbytes: int, flags: int) -> int:
        peek = bool(flags & _MSG_PEEK)
        # With a timeout the kernel fd is non-blocking in CPython too: MSG_WAITALL then
        # returns what is there, like plain sockets do.
        waitall = bool(flags & _MSG_WAITALL) and not peek and self._utimeout is None
        deadline = self._deadline(flags)
        got = 0
        woke = deadline == 0.0  # a non-blocking call must notice EOF and frames at once
        while True:
            if self._rxb:
                n = min(len(self._rxb), nbytes - got)
                view[got : got + n] = self._rxb[:n]
                if not peek:
                    del self._rxb[:n]
                got += n
                if got == nbytes or not waitall:
                    return got
            ch = self._co
            if ch is None:
                if self._rxb:
                    continue  # a fallback or downgrade in another thread left us bytes
                if self._rxb is not None and not self._rxb:
                    self._rxb = None
                if got and not waitall:
                    return got
                if self._txb:
                    self._flush_while_receiving(deadline)
                return got + super().recv_into(view[got:], nbytes - got, flags)
            try:
                n = self._shm_read(ch, view, got, nbytes, peek, woke)
            except ValueError:
                if not self._released_under_us(ch):
                    raise
                continue  # released under us (a downgrade ended, a close): look afresh
            woke = deadline == 0.0
            if n:
                got += n
                if got == nbytes or not waitall:
                    return got
                continue
            if self._co is not ch or self._rxb:
                continue
            if got and not waitall:
                return got
            if ch.rd_shut or (ch.fin is not None and self._rx_offset(ch) >= ch.fin):
                return got
            if ch.tcp_eof:
                # The peer's TCP end is gone.  Every byte it published is already ours
                # (the ring is drained), so this is EOF -- also after a kernel RST, which a
                # closed peer's kernel sends for a late doorbell.  Reported as errors: the
                # peer's own Reset (it closed with our bytes unread), once, as TCP does;
                # and a protocol violation.
                if ch.reset_err == errno.ECONNRESET and not got:
                    raise self._reset_error(ch)
                if ch.phase is _BROKEN and ch.error is not None and not got:
                    raise ch.error
                return got
            if deadline == 0.0:
                if got:
                    return got
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            rx = ch.rx
            try:
                if ch.phase is _SHM and rx is not None:
                    if not peek and (got or not rx.recv_spin):  # (see _recv_into): what
                        rx.set_spinning(True, nbytes - got)  # is left for this call to take
                    self._sleep(ch, deadline, rx.available, rx.arm)
                else:
                    self._sleep(ch, deadline)
            except TimeoutError:
                if got:
                    return got  # bytes already taken from the ring are the caller's
                raise
            except ValueError:
                if not self._released_under_us(ch):
                    raise
            woke = True

    def _shm_read(
        self, ch: _Channel, view: memoryview, got: int, nbytes: int, peek: bool, woke: bool
    ) -> int:
        """Copy ring bytes if the channel is accepted; else make control-stream progress.

        The control stream is read only when it can hold news (we woke from a sleep, the
        peer rang, or we are not accepted yet): the spinning fast path makes no syscall.
        """
        if ch.phase is _HANDSHAKE:
            self._pump(ch)  # the verdict may be here; after ACCEPT the ring is readable
            if self._co is not ch or ch.phase is not _SHM:
                return 0
            woke = False
        rx = ch.rx
        if ch.phase is _SHM and rx is not None:  # after SHUT_RD too, like Linux
            # Before the ring: see _drain_stale_bells.  If our spin saw bytes (a sleep in
            # the kernel would have ended it), claim them before the snapshot we copy
            # from (end_spin_read).
            spun = woke and rx.recv_spin and not peek
            bells = rx.end_spin_read() if spun else rx.begin_read()
            avail = rx.available()
            if not avail and (woke or rx.bells_sent() != ch.bell_mark):
                ch.bell_mark = rx.bells_sent()
                self._pump_upto(ch, bells)
                if self._co is not ch or ch.rx is None:
                    return 0
                bells = rx.bells_sent()
                avail = rx.available()
            if avail and rx.recv_spin and not peek:  # (arrived before our spin began)
                bells = rx.end_spin_read()
                avail = rx.available()
            if ch.fin is not None:
                _check_fin(ch.fin, ch.rx_base, rx, avail)
            if avail:
                n = min(avail, nbytes - got)
                ch.rx_busy = True
                try:
                    if ch.phase is not _SHM:
                        return 0  # switched meanwhile: these bytes come again on TCP
                    rx.read_into(view[got:], n, peek=peek)
                finally:
                    ch.rx_busy = False
                if not peek:
                    self._consumed(ch, n, avail, bells)
                return n
            return 0
        was = ch.phase
        self._pump(ch)
        if self._co is ch:
            if ch.phase is _FRAMED:
                self._flush_framed(ch)
            elif was is _SWITCHING and ch.phase is _SHM:  # the peer left mid-switch
                return self._shm_read(ch, view, got, nbytes, peek, woke=False)
        return 0

    @staticmethod
    def _rx_offset(ch: _Channel) -> int:
        """How much of the peer's stream has reached us (ring or DATA frames)."""
        if ch.phase is _SWITCHING or ch.phase is _FRAMED:
            return ch.proto.received_offset
        return 0 if ch.rx is None else ch.rx_base + ch.rx.tail

    def _consumed(self, ch: _Channel, n: int, avail: int, bells_before: int) -> None:
        """Bookkeeping after taking ``n`` of ``avail`` ring bytes.

        The protocol's offsets are brought up to date lazily (``_sync_offsets``), before
        control frames are parsed or sent: on the hot path the ring counters are the truth.
        """
        rx = ch.rx
        if rx is None and self._released_under_us(ch):
            return  # released right after the copy: see below
        assert rx is not None
        try:
            if rx.space_wanted():
                self._control(ch, Space())
                ch.counters["spaces_sent"] += 1
            if n == avail and bells_before != ch.bells_parsed():
                self._drain_stale_bells(ch, bells_before)
            rx.end_read()
        except ValueError:
            # The copy was done under rx_busy, so a downgrade's snapshot counts those bytes
            # as ours; a close or that downgrade's end released the ring right after it:
            # nothing is left to tell the producer (CI: a reader thread got this error
            # for bytes it had already copied).
            if not self._released_under_us(ch):
                raise

    def _drain_stale_bells(self, ch: _Channel, upto: int) -> None:
        """We emptied the ring: consume the doorbells rung for what we took, so the raw fd
        stops being readable -- but no later one.

        ``upto`` is the writer's doorbell count read *before* we looked at the ring; a
        writer counts a doorbell before sending it and sends it after publishing, so the
        first ``upto`` doorbells announce bytes we have consumed.  A doorbell for a write
        published during our copy stays queued (consuming it would leave those bytes in
        the ring with nothing to make a raw select() see them).  Frames are walked on a
        peeked copy; only the prefix up to the first younger doorbell is consumed.
        """
        with ch.rx_lock:
            if self._co is ch:
                self._drain_stale_bells_locked(ch, upto)

    def _drain_stale_bells_locked(self, ch: _Channel, upto: int) -> None:
        want = upto - ch.bells_parsed()
        if want > 0:
            try:
                peeked = super().recv(_CTL_CHUNK, _MSG_PEEK)
            except OSError:
                return
            if not peeked:
                return

            def admit(kind: int) -> int:
                nonlocal want
                if kind not in _WAKE_FRAMES or (kind == T_BELL and want == 0):
                    return _STOP
                if kind == T_BELL:
                    want -= 1
                return _TAKE

            self._take_frames(ch, peeked, admit)
        if ch.bells_parsed() >= upto:
            # Every doorbell up to ``upto`` is parsed: the next read that finds the ring
            # empty need not look at the control stream for them (_shm_read), which was a
            # MSG_PEEK failing with EAGAIN on every request/response round trip.
            ch.bell_mark = upto

    # ------------------------------------------------------------------ send

    def send(self, data: Any, flags: int = 0) -> int:
        ch = self._co
        if ch is None:
            if self._txb is None:
                return super().send(data, flags)
        elif not flags and self._fast_send(ch, data):
            return len(data)
        return self._send(_byte_view(data, _BaseSocket.send, self), flags, all_=False)

    def _fast_send(self, ch: _Channel, data: Any) -> bool:
        """Write ``data`` whole if it fits right now (the common case); else False."""
        tx = ch.tx
        if (
            ch.phase is not _SHM
            or ch.wr_shut
            or ch.tcp_eof
            or tx is None
            or type(data) is not bytes
        ):
            return False
        try:
            free = tx.free()
        except ValueError:
            if not self._released_under_us(ch):
                raise
            return False  # the slow path looks at the socket afresh
        if len(data) > free or not data:
            return False
        old = tx.head
        ch.tx_busy = True
        try:
            if ch.phase is not _SHM:
                return False
            tx.write(data, free)  # type: ignore[arg-type]
        finally:
            ch.tx_busy = False
        self._wrote(ch, tx, old)
        return True

    def _wrote(self, ch: _Channel, tx: RingWriter, old: int) -> None:
        """After a ring write: ring if the reader may be asleep.  The write was made under
        tx_busy, so a downgrade's snapshot holds its bytes; if that downgrade ended (or a
        close came) right after it and released the ring, there is nobody to ring for."""
        try:
            needs = tx.needs_bell(old)
        except ValueError:
            if not self._released_under_us(ch):
                raise
            return
        if needs:
            self._bell(ch)

    def _released_under_us(self, ch: _Channel) -> bool:
        """A ValueError from a ring end means it was released by another thread (a close,
        or the end of a downgrade) -- unless the channel is still ours and live."""
        return ch.released or self._co is not ch

    def sendall(self, data: Any, flags: int = 0) -> None:
        ch = self._co
        if ch is None:
            if self._txb is None:
                return super().sendall(data, flags)
        elif not flags and self._fast_send(ch, data):
            return None
        view = _byte_view(data, _BaseSocket.sendall, self)
        if not view:  # CPython still makes one send call: EPIPE after SHUT_WR, say
            self._send(view, flags, all_=False)
            return None
        deadline = self._deadline(flags)
        sent = 0
        while sent < len(view):
            if deadline == 0.0:
                sent += self._send(view[sent:], flags, all_=False)
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("timed out")  # like CPython: no errno
            sent += self._send(view[sent:], flags, all_=True, deadline=deadline)
        return None

    def sendmsg(
        self,
        buffers: Iterable[Any],
        ancdata: Iterable[Any] = (),
        flags: int = 0,
        address: Any = None,
    ) -> int:
        anc = list(ancdata)
        if anc:
            _downgrade.before_passing(anc)  # an accelerated fd must leave as plain TCP
        if self._co is None and self._txb is None:
            return super().sendmsg(buffers, anc, flags, address)
        if anc:
            raise OSError(errno.EOPNOTSUPP, "ancillary data is not carried by cosock channels")
        views = [_byte_view(b, lambda s, b: _BaseSocket.sendmsg(s, [b]), self) for b in buffers]
        return self.send(b"".join(views), flags)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        if self._co is None and self._txb is None:
            return super().sendfile(file, offset, count)
        sent: int = self._sendfile_use_send(file, offset, count)  # type: ignore[attr-defined]
        return sent

    def _send(self, view: memoryview, flags: int, all_: bool, deadline: float | None = None) -> int:
        ch = self._co
        if ch is not None and ch.phase is _FORKED:
            _forkshare.claim(self, ch)
            ch = self._co
        try:
            return self._send_loop(view, flags, all_, deadline)
        except ValueError:
            if ch is None or self._co is ch:
                raise
            raise OSError(errno.EBADF, "Bad file descriptor: closed during send") from None

    def _send_loop(self, view: memoryview, flags: int, all_: bool, deadline: float | None) -> int:
        if not all_:
            deadline = self._deadline(flags)
        total = len(view)
        sent = 0
        woke = deadline == 0.0
        while True:
            ch = self._co
            if ch is None:
                if not self._flush_plain(block=deadline != 0.0):
                    if sent:
                        return sent
                    raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
                self._txb = None
                if sent == total:
                    return sent
                return sent + super().send(view[sent:], flags & ~_MSG_DONTWAIT)
            if ch.fell_back:  # a REJECT is being acted on (_fallback)
                if self._owe_peer(view[sent:]):
                    return total
                time.sleep(0)  # its snapshot is not taken yet, or it is detaching
                continue
            if ch.ctl_out:  # e.g. the HELLO of a non-blocking connect that has completed
                self._flush_ctl(ch)
            self._check_writable(ch)
            if ch.phase is _SWITCHING or ch.phase is _FRAMED:
                n = self._send_framed(ch, view[sent:], deadline)
                sent += n
                if sent == total or (n and not all_) or deadline == 0.0:
                    if sent:
                        return sent
                    raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
                continue
            tx = ch.tx
            if ch.phase is _HANDSHAKE and ch.role is Role.SERVER:
                with ch.ctl_lock:  # the verdict moves pre_out into the ring under it
                    held = ch.phase is _HANDSHAKE and not ch.fell_back
                    n = min(_handshake_room(ch), total - sent) if held else 0
                    if n:
                        ch.pre_out += view[sent : sent + n]
                if not held:
                    continue  # accepted meanwhile: the ring takes the rest, after pre_out
                if n:
                    sent += n
                    if sent == total or deadline == 0.0:
                        return sent
                    continue
                free = 0
            else:
                assert tx is not None
                try:
                    free = _handshake_room(ch) if ch.phase is _HANDSHAKE else tx.free()
                except ValueError:
                    if not self._released_under_us(ch):
                        raise
                    continue  # released under us: look at the socket afresh
            if free and sent < total:
                assert tx is not None
                old = tx.head
                ch.tx_busy = True
                try:
                    if ch.phase is _SWITCHING or ch.phase is _FRAMED or ch.fell_back:
                        continue  # switched or rejected meanwhile: the loop's top takes it
                    n = tx.write(view[sent:], free)
                finally:
                    ch.tx_busy = False
                sent += n
                self._wrote(ch, tx, old)
                if sent == total or deadline == 0.0:
                    return sent
                continue
            if sent == total:
                return sent
            if woke:
                self._pump(ch)
                if self._co is not ch:
                    continue
                self._check_writable(ch)
            woke = deadline == 0.0
            if deadline == 0.0:
                if sent:
                    return sent
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            woke = True
            if tx is None or ch.phase is _HANDSHAKE:
                try:
                    self._sleep(ch, deadline)  # the verdict arrives on the TCP fd
                except TimeoutError:
                    if sent:
                        return sent
                    raise
                continue
            try:
                self._sleep(ch, deadline, tx.free, tx.request_space)
            except TimeoutError:
                if sent:
                    return sent
                raise

    def _send_framed(self, ch: _Channel, view: memoryview, deadline: float | None) -> int:
        """Queue bytes for DATA frames, bounded like a send buffer (the ring's size)."""
        limit = ch.tx.capacity if ch.tx is not None else _config.ring_size()
        while True:
            if ch.phase is _FRAMED:
                self._flush_framed(ch)
            self._check_writable(ch)
            room = limit - len(ch.tx_out)
            if room > 0:
                n = min(room, len(view))
                with ch.ctl_lock:
                    if ch.phase is not _SWITCHING and ch.phase is not _FRAMED:
                        return 0  # upgraded meanwhile: the caller goes the ring's way
                    if ch.downgrade == "done":
                        return 0  # downgraded meanwhile: the caller goes the plain way
                    ch.tx_out += view[:n]
                if ch.phase is _FRAMED:
                    self._flush_framed(ch)
                    # Blocking: hand the bytes to the kernel before returning, as a plain
                    # send does (bytes left in our memory would die with the process).
                    while deadline != 0.0 and (ch.tx_out or ch.ctl_out) and self._co is ch:
                        self._check_writable(ch)
                        self._wait_writable(deadline)
                        self._flush_framed(ch)
                return n
            if deadline == 0.0:
                return 0
            self._sleep(ch, deadline)  # the peer's SWITCH, or room in the kernel
            self._pump(ch)
            if self._co is not ch:
                return 0

    def _wait_writable(self, deadline: float | None) -> None:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "timed out")
        poller = _kernel_poll()
        poller.register(self.fileno(), select.POLLOUT)
        poller.poll(_MAX_SLEEP_MS if left is None else max(1, int(left * 1000)))

    def _check_writable(self, ch: _Channel) -> None:
        if ch.reset_err is not None:
            raise self._reset_error(ch)  # TCP: a pending error first, then EPIPE
        if ch.wr_shut or ch.peer_reset:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        if ch.error is not None:
            raise ch.error
        if ch.tcp_eof:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe: cosock peer closed")

    def _flush_plain(self, block: bool) -> bool:
        """Send bytes owed after a fallback or a downgrade; True once none remain.

        Serialised (one lock for all sockets, never held while waiting): two threads
        sending the same owed bytes would double them, and an application thread that
        sends new bytes first must find the owed ones gone (it calls this first).
        """
        while True:
            with _owed_lock:
                owed = self._txb
                if owed is None:
                    return True
                if not owed:  # (emptiness seen and cleared at once: see _owe_peer)
                    self._txb = None
                    shut, self._shut_after_flush = self._shut_after_flush, False
                    break
                try:
                    n = self._send_now(owed)
                except (BlockingIOError, InterruptedError):
                    n = -1
                else:
                    del owed[:n]
            if n < 0:
                if not block:
                    return False
                self._wait_owed_writable()
        if shut:  # a shutdown(SHUT_WR) made before the fallback
            super().shutdown(socket.SHUT_WR)
        return True

    def _send_now(self, data: bytearray) -> int:
        """One kernel send that never waits.  With a timeout set, CPython polls for
        writability first even under MSG_DONTWAIT (and changing the timeout would race
        other threads' calls): so poll here first, without waiting."""
        if super().gettimeout():
            poller = _kernel_poll()
            poller.register(self.fileno(), select.POLLOUT)
            if not poller.poll(0):
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return _kernel_send(self, data, _MSG_DONTWAIT)

    def _wait_owed_writable(self) -> None:
        """Block as the kernel's own send would (the socket's timeout): until writable."""
        timeout = super().gettimeout()
        poller = _kernel_poll()
        poller.register(self.fileno(), select.POLLOUT)
        if not poller.poll(None if timeout is None else max(0, int(timeout * 1000))):
            raise TimeoutError("timed out")

    def _flush_while_receiving(self, deadline: float | None) -> None:
        """Before a blocking plain recv, push owed bytes out as the peer makes room, until
        they are gone or the peer has something for us (it may need them to answer)."""
        fd = self.fileno()
        while self._txb:
            if self._flush_plain(block=False):
                return
            left = None if deadline is None else deadline - time.monotonic()
            if deadline == 0.0 or (left is not None and left <= 0):
                return
            poller = _kernel_poll()
            poller.register(fd, select.POLLIN | select.POLLOUT)
            events = poller.poll(None if left is None else max(0, int(left * 1000)))
            if any(ev & (select.POLLIN | select.POLLHUP | select.POLLERR) for _, ev in events):
                return

    # ------------------------------------------------------------------ shutdown/close

    def shutdown(self, how: int) -> None:
        ch = self._co
        if ch is not None and ch.phase is _FORKED:
            _forkshare.claim(self, ch)
            ch = self._co
        if ch is None:
            if self._txb and how in (socket.SHUT_WR, socket.SHUT_RDWR):
                self._flush_plain(block=True)
            return super().shutdown(how)
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise OSError(errno.EINVAL, "Invalid argument")
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            ch.rd_shut = True
        if self._tcp_closed(ch):
            raise OSError(errno.ENOTCONN, _ENOTCONN_TEXT)  # (Linux still notes SHUT_RD)
        if how in (socket.SHUT_WR, socket.SHUT_RDWR) and not ch.wr_shut:
            ch.wr_shut = True
            _forkshare.noted_shutdown(ch)
            if ch.phase is _SHM:
                self._send_fin(ch)
            else:
                ch.fin_pending = True
                if ch.phase is _FRAMED:
                    self._flush_framed(ch)
        return None

    def _real_close(self, _ss: Any = _socket.socket) -> None:
        ch = self._co
        if ch is not None and self._may_reset(ch) and self._queue_may_hold_data(ch):
            self._read_queued(ch)  # DATA frames, a verdict: then we know what is unread
        handed = False
        if not self._lingering and self._owes():
            handed = self._hand_over()
            if not handed:
                # No descriptor for a lingering copy: finish here, briefly (like SO_LINGER).
                try:
                    self._cosock_finish_owed(time.monotonic() + _CLOSE_LINGER)
                except (OSError, ProtocolError, ValueError, RingCorrupted):
                    pass
        ch = self._co
        if ch is not None and self._may_reset(ch) and self._unread(ch):
            self._reset(ch)
        elif ch is None and self._rxb and not handed and self not in _shared_fds:
            self._reset_plain()
        # No FIN frame here: close() ends only this fd, which a forked child may share
        # (socketserver.ForkingMixIn).  The peer learns of the close from TCP itself and
        # reads EOF after the ring's bytes; shutdown() sends FIN explicitly.
        if ch is not None:
            self._co = None
            untrack(self, self.fileno())
            ch.refs -= 1
            if ch.refs == 0:
                _forkshare.closing(ch)
                ch.release()
        if self._rv is not None:
            rv, addr, port = self._rv
            self._rv = None
            if os.getpid() == rv._owner:
                try:
                    _agent().unlisten(addr, port)
                except Exception:
                    pass
            rv.release()
        _ss.close(self)
        if ch is not None:
            # The watch's poll holds this fd's file: until it lets go, the kernel sends
            # neither FIN nor RST (the peer would wait up to a second for its EOF).
            _residency.wake()

    @staticmethod
    def _may_reset(ch: _Channel) -> bool:
        """May close() reset this connection?  Only if this fd is the connection's last:
        SO_LINGER belongs to the kernel socket, so a dup() twin, a process sharing it by
        fork() or a lingering twin still finishing would lose their connection with it."""
        return ch.refs == 1 and not ch.forked and not ch.tcp_eof and ch.error is None

    def _queue_may_hold_data(self, ch: _Channel) -> bool:
        """At close: may the kernel's queue hold what decides whether bytes are unread
        (DATA frames, a verdict)?  Not on the rings; not before a connect completed."""
        if ch.phase is _HANDSHAKE:
            return ch.role is Role.SERVER or self._connect_done()
        return ch.phase in (_FRAMED, _UPGRADING, _SWITCHING)

    def _read_queued(self, ch: _Channel) -> None:
        try:
            self._pump(ch)
        except (RingCorrupted, ProtocolError, ValueError) as exc:
            self._poison(ch, exc)
        except OSError:
            pass

    def _unread(self, ch: _Channel) -> bool:
        """Are received bytes still unread (TCP's close() then sends RST, not FIN)?"""
        if self._rxb:
            return True
        rx = ch.rx
        if ch.phase is not _SHM or rx is None:
            return False
        try:
            return rx.available() > 0
        except (RingCorrupted, ValueError):
            return False

    def _reset(self, ch: _Channel) -> None:
        """Close with received bytes unread, as TCP does: reset the connection.

        The peer learns it from our Reset frame (an RST alone could be a late doorbell's);
        SO_LINGER {1, 0} makes the kernel send the RST itself, so both TCP sockets end in
        CLOSE as with TCP -- only once the frame has left our send queue, which an RST
        discards.
        """
        try:
            self._control(ch, Reset())
        except ProtocolError:
            return  # mid-switch or -upgrade: no frame may go now; an ordinary close
        if ch.ctl_out:
            return  # the peer does not read its TCP socket: it will see EOF
        try:
            (unsent,) = struct.unpack("i", fcntl.ioctl(self.fileno(), _SIOCOUTQNSD, bytes(4)))
            if unsent == 0:
                super().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass

    def _reset_plain(self) -> None:
        """Close with bytes unread that we took off TCP before a fallback or downgrade
        (``_rxb``): the kernel sees an empty queue and would send FIN; TCP sends RST.  On
        plain TCP the kernel's RST says it all (the peer is plain now too).  Only once our
        queue has left (an RST discards it), and never on an fd known to be shared (a
        ``dup()``, a ``fork()``): SO_LINGER belongs to the kernel socket."""
        try:
            (unsent,) = struct.unpack("i", fcntl.ioctl(self.fileno(), _SIOCOUTQNSD, bytes(4)))
            if unsent == 0:
                super().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except (OSError, ValueError):
            pass  # (ValueError: closed already)

    def _owes(self) -> bool:
        """Does closing now leave the peer short of bytes that only we can still send?"""
        ch = self._co
        if ch is None:
            return bool(self._txb)
        if ch.refs != 1 or ch.tcp_eof or ch.error is not None:
            return False  # a dup()ed twin carries on; or nobody is left to send to
        if ch.phase is _HANDSHAKE:
            # Ours until the verdict: a REJECT needs them resent, by us.
            if ch.role is Role.SERVER:
                return bool(ch.pre_out)
            return ch.tx is not None and ch.tx.head > 0
        if ch.phase is _SWITCHING:
            return True  # the peer's SWITCH says what we must resend
        return ch.phase is _FRAMED and bool(ch.tx_out or ch.ctl_out)

    def _hand_over(self) -> bool:
        """Move what we owe to a lingering twin on a ``dup`` of our fd (see ``_linger``)."""
        try:
            fd = os.dup(self.fileno())
        except OSError:
            return False
        heir = CoSocket(self.family, self.type, self.proto, fileno=fd)
        heir._lingering = True
        _socket.socket.settimeout(heir, 0.0)
        heir._utimeout = 0.0  # the twin never blocks: it polls (the fd may be shared)
        heir._txb, self._txb = self._txb, None
        heir._rxb, self._rxb = self._rxb, None  # unread: the heir's close resets
        heir._shut_after_flush, self._shut_after_flush = self._shut_after_flush, False
        ch = self._co
        if ch is not None:
            self._co = None
            untrack(self, self.fileno())
            heir._co = ch  # the channel's reference moves with it
        _linger.start(heir)
        return True

    def _cosock_finish_owed(self, deadline: float) -> None:
        """Settle the verdict, finish a switch, hand owed bytes to the kernel: until
        nothing is owed, the peer is gone, or ``deadline``."""
        fd = self.fileno()
        while self._owes():
            ch = self._co
            events = select.POLLIN
            if ch is None:
                if self._flush_plain(block=False):
                    return
                events = select.POLLOUT
            elif ch.phase is _FRAMED:
                if self._flush_framed(ch) and not ch.ctl_out:
                    return
                events |= select.POLLOUT
            elif ch.ctl_out:
                self._flush_ctl(ch)
                events |= select.POLLOUT if ch.ctl_out else 0
            if ch is not None and self._pump(ch):
                continue  # a verdict or SWITCH may have moved us on: look again
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("cosock: close() gave up on %s owed bytes", self._owed_count())
                return
            poller = _kernel_poll()
            poller.register(fd, events)
            poller.poll(max(1, min(1000, int(left * 1000))))

    def _owed_count(self) -> int:
        ch = self._co
        if ch is None:
            return len(self._txb or b"")
        return len(ch.tx_out) + len(ch.retained or b"") + len(ch.pre_out)

    def detach(self) -> int:
        """Return the TCP fd, carrying exactly the application's stream.

        An accelerated connection is downgraded first (with the peer: both continue on
        plain TCP at exact offsets), so the fd is an honest TCP stream.

        Raises:
            OSError: the downgrade failed (see ``cosock_downgrade``), or received bytes
                were already taken off the TCP stream and are not read yet (EBUSY: read
                them first); nothing is detached.
        """
        if self._co is not None or self._rxb is not None or self._txb is not None:
            self.cosock_downgrade()
            _downgrade.check_handed_over(self)
        return super().detach()

    def cosock_downgrade(self, timeout: float | None = None) -> None:
        """Leave cosock for good: continue this connection as plain TCP, byte-exact both
        ways (the peer, a CoSocket, follows; its application notices nothing).

        What ``detach()`` and handing the socket to code that drives the fd itself
        (uvloop, another process) need. Blocks until the peer answered and every byte owed
        to it is in the kernel, at most ``timeout`` seconds (default: the socket's timeout,
        else 30 s, also when non-blocking). Nothing to do on a plain connection.

        Raises:
            TimeoutError: the peer did not answer in time (the downgrade may still finish
                when it does; the socket stays usable).
            ConnectionResetError: the peer closed while received bytes were still only in
                shared memory, or the channel is broken.
        """
        _downgrade.downgrade(self, timeout=timeout)

    def dup(self) -> CoSocket:
        sock = super().dup()
        assert isinstance(sock, CoSocket)
        _shared_fds.add(self)
        _shared_fds.add(sock)
        ch = self._co
        if ch is not None:
            ch.refs += 1
            sock._co = ch
            sock._utimeout = self._utimeout
            _BaseSocket.settimeout(sock, 0.0)
            track(sock)
        sock._reason = self._reason
        return sock


_fork_held: list[_Channel] = []
#: Sockets whose kernel socket another fd is known to share (``dup()``, ``fork()``): their
#: close never sets SO_LINGER (``_reset_plain``).
_shared_fds: weakref.WeakSet[CoSocket] = weakref.WeakSet()
#: Sockets that took bytes off TCP for the application (``_rxb``), marked shared at a fork.
_rxb_holders: weakref.WeakSet[CoSocket] = weakref.WeakSet()


#: A fork is under way: the child's reset below is still to be done (once).
_child_reset_due = False


def _channels_before_fork() -> None:
    """Hold every channel's pump lock across the fork: a residency watch half way through
    a peek-then-take (the HELLO, say) finishes first, so parent and child never both act
    on one frame of their shared TCP stream."""
    global _child_reset_due
    _child_reset_due = True
    for holder in list(_rxb_holders):
        _shared_fds.add(holder)
    for ref in list(_tracked.values()):
        sock = ref()
        ch = None if sock is None else sock._co
        if ch is not None and ch.rx_lock.acquire(timeout=1.0):
            _fork_held.append(ch)
            _forkshare.prepare(ch)


def _channels_after_fork_in_child() -> None:
    """Only the forking thread lives on in a child: a lock another thread held at the fork
    (the residency watch pumping, say) would stay held for ever, a busy flag or sleeper
    count stay up.  Each inherited channel starts afresh.  Once per fork: the census's
    fork hook calls this before it restarts the residency watch (fork hooks run in the
    order modules registered them, the census's first): a watch started before it found
    the channels not yet marked forked and waited for good on a pump lock the forking
    thread held (review: 9 runs in 15)."""
    global _child_reset_due
    if not _child_reset_due:
        return
    _child_reset_due = False
    for ref in list(_tracked.values()):
        sock = ref()
        ch = None if sock is None else sock._co
        if ch is not None:
            ch.rx_lock = threading.RLock()
            ch.ctl_lock = threading.Lock()
            ch.rx_busy = ch.tx_busy = False
            ch.sleepers = 0
            for kick in (*ch.kicks, *ch.waiting):
                kick.close()  # shared with the parent's eventfds: never ours to drain
            ch.kicks, ch.waiting = [], []
            ch.forked = True
            _forkshare.after_fork(ch)
    _fork_held.clear()


def _channels_after_fork_in_parent() -> None:
    """Parent and child now share each channel's TCP stream: the residency watches of two
    processes must not both read it (a ForkingMixIn parent's watch took the HELLO its child
    was waiting for).  The applications' own calls still drive these connections."""
    global _child_reset_due
    _child_reset_due = False
    for ref in list(_tracked.values()):
        sock = ref()
        ch = None if sock is None else sock._co
        if ch is not None:
            ch.forked = True
            _forkshare.after_fork(ch)
    for ch in _fork_held:
        ch.rx_lock.release()
    _fork_held.clear()


os.register_at_fork(
    before=_channels_before_fork,
    after_in_child=_channels_after_fork_in_child,
    after_in_parent=_channels_after_fork_in_parent,
)


def path_of(sock: socket.socket) -> str:
    """``"shm"`` or ``"tcp"`` (or ``"handshake"``) for any socket object."""
    return sock.cosock_path if isinstance(sock, CoSocket) else "tcp"
