"""Offer delivery: a client hands a listener the channel memfd before it connects.

Each cosock listener owns a Unix datagram socket (the *rendezvous*) whose path it
publishes through the agent.  A client sends one datagram per connection: the encoded
:class:`~cosock._offer.Offer` plus the memfd (SCM_RIGHTS).  The listener has SO_PASSCRED
on, so the kernel attaches the sender's real pid/uid/gid to every datagram; the pid tells
which network namespace (guest) the sender lives in.  The offer is sent *before* the TCP
connect, so by the time ``accept()`` returns the connection, its offer is queued.

Path sockets are reachable across network namespaces (they live in the file system), which
is exactly the co-residency scope: guests on one kernel.
"""

from __future__ import annotations

import array
import os
import resource
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ._errors import RemoteProtocolError
from ._offer import Offer

_SOCKET = socket.socket  # captured before interception can replace it
_MAX_PENDING = 4096
_OFFER_TTL = 30.0
_MAX_DGRAM = 512
_SEND_PATIENCE = 0.2
_MAX_UNIX_PATH = 107
#: Where rendezvous sockets go when the agent's directory makes the path too long.
_SHORT_DIR = "/tmp/cosock-rv-{uid}"
_ANC_SIZE = socket.CMSG_SPACE(4 * 4) + socket.CMSG_SPACE(struct.calcsize("3i"))
#: Plain ints: flag arithmetic on socket's IntFlag members costs microseconds a datagram.
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
_CRED = struct.Struct("3i")


def _check_private(directory: Path) -> None:
    """Refuse a shared fallback directory someone else made (they could swap our socket)."""
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"{directory} is not a private directory of ours")


@dataclass(slots=True)
class Pending:
    """An offer waiting for its TCP connection to be accepted."""

    offer: Offer
    fd: int
    pid: int
    uid: int
    received: float


class Rendezvous:
    """The listener side: receives offers, keeps them by 4-tuple until ``accept()``."""

    def __init__(self, directory: Path) -> None:
        name = f"rv-{os.getpid()}-{os.urandom(6).hex()}.sock"
        if len(str(directory / name)) >= _MAX_UNIX_PATH:
            # sun_path holds 108 bytes: a deep agent directory must not silently turn
            # acceleration off, so use a short private directory instead.
            directory = Path(_SHORT_DIR.format(uid=os.getuid()))
            directory.mkdir(mode=0o700, exist_ok=True)
            _check_private(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / name
        self._sock = _SOCKET(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind(str(self.path))
        self._sock.setblocking(False)
        self._pending: OrderedDict[tuple[str, int, str, int], Pending] = OrderedDict()
        # Nonces of offers already taken (bounded like the pending table): a replay of a
        # used offer is refused, not queued for a later connection that reuses its 4-tuple.
        self._taken: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()
        self._owner = os.getpid()
        #: Network namespace of the listener (a loopback client must share it); read once
        #: here rather than per accepted connection.
        self.netns = os.stat("/proc/self/ns/net").st_ino
        # Every pending offer holds an fd: a flood must not use up the listener's table.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = _MAX_PENDING if soft == resource.RLIM_INFINITY else max(16, soft // 4)
        self._max_pending = min(_MAX_PENDING, limit)
        #: Datagrams dropped, by reason (counted, never raised at the listener).
        self.dropped: dict[str, int] = {}
        #: Holders: the listener, and each accepted connection that may later be offered
        #: a fresh channel (an upgrade after a switch) -- it outlives the listener.
        self._holders = 1

    def hold(self) -> None:
        with self._lock:
            self._holders += 1

    def release(self) -> None:
        """Drop one holder; the last one closes the socket."""
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self.close()

    def _drop(self, reason: str, fds: list[int]) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        for fd in fds:
            os.close(fd)

    def drain(self) -> None:
        """Move every queued datagram into the pending table; garbage is dropped and counted."""
        while True:
            try:
                data, anc, flags, _ = self._sock.recvmsg(_MAX_DGRAM, _ANC_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            fds: list[int] = []
            cred: tuple[int, int, int] | None = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    cred = _CRED.unpack_from(payload)
            if flags & _TRUNCATED:
                self._drop("truncated", fds)
                continue
            if len(fds) != 1:
                self._drop("fd-count", fds)
                continue
            if cred is None:
                self._drop("no-credentials", fds)
                continue
            try:
                offer = Offer.decode(data)
            except RemoteProtocolError:
                self._drop("malformed", fds)
                continue
            self._store(Pending(offer, fds[0], cred[0], cred[1], time.monotonic()))

    def _store(self, item: Pending) -> None:
        with self._lock:
            old = self._pending.get(item.offer.key)
            nonce = item.offer.nonce
            if nonce in self._taken or (old is not None and old.offer.nonce == nonce):
                # A replay (a client never sends one nonce twice): the first copy stands,
                # so whoever replays it cannot swap their memory in under the real nonce.
                self._drop("replayed", [item.fd])
                return
            self._pending.pop(item.offer.key, None)
            if old is not None:  # a replayed or superseded offer: the newest wins
                os.close(old.fd)
                self.dropped["replaced"] = self.dropped.get("replaced", 0) + 1
            self._pending[item.offer.key] = item
            now = time.monotonic()
            while self._pending:
                first = next(iter(self._pending.values()))
                full = len(self._pending) > self._max_pending
                if not full and now - first.received < _OFFER_TTL:
                    break
                self._pending.popitem(last=False)
                os.close(first.fd)
                reason = "overflow" if full else "expired"
                self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def take(self, key: tuple[str, int, str, int]) -> Pending | None:
        """The offer for this accepted connection, if any (the caller owns its fd)."""
        self.drain()
        with self._lock:
            item = self._pending.pop(key, None)
            if item is not None:
                now = time.monotonic()
                self._taken[item.offer.nonce] = now
                while self._taken and (
                    len(self._taken) > _MAX_PENDING
                    or now - next(iter(self._taken.values())) >= _OFFER_TTL
                ):
                    self._taken.popitem(last=False)
            return item

    def close(self) -> None:
        with self._lock:
            for item in self._pending.values():
                os.close(item.fd)
            self._pending.clear()
        self._sock.close()
        if os.getpid() == self._owner:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


_sender: socket.socket | None = None
_sender_lock = threading.Lock()


def _forget_sender_in_child() -> None:
    # The parent's socket works in the child too, but each process keeps its own (so two
    # processes never share one socket's send queue); no getpid() per offer needed.
    global _sender, _sender_lock
    _sender = None
    _sender_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_sender_in_child)


def send_offer(path: str, offer: Offer, fd: int) -> None:
    """Deliver an offer and its memfd; never blocks.

    Raises:
        OSError: the listener is gone (ENOENT, ECONNREFUSED) or its queue is full (EAGAIN).
    """
    global _sender
    with _sender_lock:
        if _sender is None:
            _sender = _SOCKET(socket.AF_UNIX, socket.SOCK_DGRAM)
            _sender.setblocking(False)
        sock = _sender
    fds = array.array("i", [fd])
    payload = [offer.encode()]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
    # A listener's queue holds only net.unix.max_dgram_qlen (often 10) offers until its
    # accept() drains them; a burst of connects waits a little for room, then gives up
    # (the caller falls back to plain TCP).
    deadline = time.monotonic() + _SEND_PATIENCE
    pause = 0.0002
    while True:
        try:
            sock.sendmsg(payload, anc, 0, path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.005)


def netns_of_pid(pid: int) -> int | None:
    """Network-namespace inode of a process, or None if it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None
