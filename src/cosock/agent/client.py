"""Library side of the agent: the co-residency table inside every guest process.

:class:`AgentClient` subscribes once and then keeps the agent's latest snapshot, so the
connect path decides "is ip:port a co-resident cosock listener?" with dict lookups and one
non-blocking ``recv`` that drains pending pushes.  Every failure (no agent, refused,
EOF, garbage) makes it *unavailable* with a reason; callers then use plain TCP, and it
retries connecting at most once per second.  One exception: when the agent hangs up on a
connection that was working (it restarted, or the lab migrated our guest to another host and
re-pointed our agent path), the next poll reconnects at once, so a migrated process sees its
new host without a second's delay.

Two cheap change detectors serve the socket layer: :attr:`AgentClient.version` (a memory
read of the agent's version page) and :meth:`AgentClient.wait_fileno` (an fd that becomes
readable when the agent pushes or hangs up).

The module functions (:func:`register_guest`, :func:`unregister_guest`, :func:`status`)
are for the lab and admin tools: one short connection each.
"""

from __future__ import annotations

import contextlib
import ipaddress
import mmap
import os
import select
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .. import _config
from .._errors import AgentUnavailable
from ._plain import PLAIN_SOCKET
from ._version import VERSION, version_path
from ._wire import MAX_REPLY_LINE, LineReader, WireError, decode, encode

_RETRY_INTERVAL = 1.0  # seconds between connection attempts
#: After the agent closed a working connection the client reconnects at once, but not
#: sooner than this after its previous such quick reconnect (caps an agent that keeps
#: hanging up at 100 reconnects per second; two migrations in a row cost at most this).
_RECONNECT_GAP = 0.01
#: Bits of :attr:`AgentClient.version` left for the agent's own counter.
_EPOCH_SHIFT = 40
_CONNECT_WAIT = 0.5  # longest a lookup waits for a (re)connection's first snapshot
_REQUEST_TIMEOUT = 2.0
_PUSH_PREFIX = b'{"push":'  # how encode() starts every push (the server puts "push" first)
_CATCH_UP_WAIT = 0.05  # longest a lookup waits for a snapshot the version page announced
_RECV_SIZE = 1 << 16
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})
#: Captured before interception can patch ``select``.  A zero-timeout poll costs a third
#: of a failing non-blocking recv (no exception), and the idle drain is all a lookup pays.
_new_poller = select.poll
_new_epoll = select.epoll


class AgentRejected(AgentUnavailable):
    """The agent answered but refused the request (bad arguments, caller not a guest)."""


@dataclass(frozen=True, slots=True)
class GuestInfo:
    name: str
    netns: int
    addresses: tuple[str, ...]
    host: str


@dataclass(frozen=True, slots=True)
class ListenerInfo:
    guest: str
    addr: str
    port: int
    rendezvous: str
    pid: int


#### Addresses (hot path: cached)

_ip_cache: dict[str, tuple[str, bool] | None] = {}


def _classify(ip: str) -> tuple[str, bool] | None:
    """(canonical text, is loopback) of ``ip``, IPv4-mapped IPv6 as IPv4; None if not an IP."""
    try:
        return _ip_cache[ip]
    except KeyError:
        pass
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        result = None
    else:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        result = (str(addr), addr.is_loopback)
    if len(_ip_cache) >= 4096:
        _ip_cache.clear()
    _ip_cache[ip] = result
    return result


def _canonical(addr: str) -> str:
    if addr in _WILDCARDS:
        return addr
    c = _classify(addr)
    return addr if c is None else c[0]


#### The client


class _Slot:
    """One outstanding request; replies arrive in request order."""

    __slots__ = ("done", "kind", "reply")

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "subscribe", "relisten" or "request"
        self.reply: dict[str, Any] = {}
        self.done = False


class _Index:
    """A snapshot turned into the dicts :meth:`AgentClient.lookup` needs."""

    __slots__ = ("by_guest_port", "owner", "rendezvous_dir", "self_addrs", "self_guest", "version")

    def __init__(self, snap: dict[str, Any]) -> None:
        """Raises WireError if the snapshot is not shaped as documented."""
        try:
            self.version = int(snap["version"])
            host = str(snap["host"])
            own = snap["self"]
            self.self_guest = None if own is None else _guest(own)
            self.self_addrs = frozenset(self.self_guest.addresses if self.self_guest else ())
            self.owner: dict[str, GuestInfo] = {}
            for raw in snap["guests"]:
                guest = _guest(raw)
                if guest.host == host:
                    for addr in guest.addresses:
                        self.owner[addr] = guest
            by: dict[tuple[str, int], list[tuple[ListenerInfo, bool]]] = {}
            for raw in snap["listeners"]:
                info = ListenerInfo(
                    str(raw["guest"]),
                    _canonical(str(raw["addr"])),
                    int(raw["port"]),
                    str(raw["rendezvous"]),
                    int(raw["pid"]),
                )
                loop = info.addr not in _WILDCARDS and (_classify(info.addr) or ("", False))[1]
                by.setdefault((info.guest, info.port), []).append((info, loop))
            self.by_guest_port = {k: tuple(v) for k, v in by.items()}
            self.rendezvous_dir = Path(str(snap["rendezvous_dir"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise WireError(f"malformed snapshot: {type(exc).__name__}: {exc}") from None


def _guest(raw: dict[str, Any]) -> GuestInfo:
    addrs = tuple(_canonical(str(a)) for a in raw["addresses"])
    return GuestInfo(str(raw["name"]), int(raw["netns"]), addrs, str(raw["host"]))


class AgentClient:
    """A subscription to the host agent at ``path``; thread-safe, fork-safe, lazy.

    Nothing happens until first use.  Listeners registered with :meth:`listen` are
    re-registered automatically whenever the connection is re-established.
    """

    _shared: ClassVar[AgentClient | None] = None
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._listeners: dict[tuple[str, int], str] = {}  # (addr, port) -> rendezvous
        self._closed = False
        self._epoll: select.epoll | None = None  # created by wait_fileno()
        self._epoch = 0  # bumped on every connect and drop: see version
        self._reset()
        _instances.add(self)

    def _reset(self) -> None:
        self._sock: socket.socket | None = None
        self._poller = _new_poller()
        self._reader = LineReader(MAX_REPLY_LINE)
        self._pending: deque[_Slot] = deque()
        self._snapshot: dict[str, Any] | None = None
        self._index: _Index | None = None
        self._reason = "not connected yet"
        self._last_attempt: float | None = None
        self._retry_at: float | None = None  # an earlier retry than _RETRY_INTERVAL allows
        self._last_quick = -_RECONNECT_GAP  # when _retry_at last let an attempt through
        self._page: mmap.mmap | None = None  # the agent's version page, read-only
        self._given_up = 0  # an announced version that never arrived; not waited for again
        #: Last refusal of an automatic re-registration (for diagnostics).
        self.last_relisten_error: str | None = None

    @classmethod
    def shared(cls) -> AgentClient:
        """The process-wide client for :func:`cosock._config.agent_path`.

        A forked child gets a fresh one (see ``_after_fork_in_child``): the parent's
        connection is closed in the child without a byte being sent on it.
        """
        client = cls._shared
        if client is not None and not client._closed:
            return client
        with cls._shared_lock:
            if cls._shared is None or cls._shared._closed:
                cls._shared = cls(_config.agent_path())
            return cls._shared

    @classmethod
    def current(cls) -> AgentClient | None:
        """The process-wide client if one is open; never creates one (for background
        threads that must not reconnect what the application has closed)."""
        client = cls._shared
        return client if client is not None and not client._closed else None

    @classmethod
    def reset_shared(cls) -> None:
        """Close the shared client; the next :meth:`shared` reads the agent path again."""
        with cls._shared_lock:
            client, cls._shared = cls._shared, None
        if client is not None:
            client.close()

    def close(self) -> None:
        """Disconnect for good (the agent drops this process's listeners)."""
        with self._lock:
            self._closed = True
            self._listeners.clear()
            self._drop_locked("client closed")
            if self._epoll is not None:
                self._epoll.close()
                self._epoll = None

    def _forget_after_fork(self) -> None:
        # In the child: the lock may have been held by a thread that no longer exists, and
        # the socket is shared with the parent, so close our copy without using it.
        self._lock = threading.Lock()
        if self._sock is not None:
            self._sock.close()
        if self._page is not None:
            self._page.close()
        if self._epoll is not None:
            self._epoll.close()  # one epoll instance shared with the parent: never use it
            self._epoll = None
        self._listeners.clear()  # they are the parent's
        self._reset()

    #### Connection

    def _drop_locked(self, reason: str) -> None:
        if self._sock is not None:
            self._epoch += 1
            if self._epoll is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(self._sock)
            self._sock.close()
        if self._page is not None:
            self._page.close()
        self._sock = None
        self._page = None
        self._pending.clear()
        self._snapshot = None
        self._index = None
        self._reason = reason

    def _poll_locked(self) -> None:
        if self._sock is not None:
            self._drain_locked()
            if self._page is not None and self._index is not None:
                announced: int = VERSION.unpack_from(self._page)[0]
                if announced > self._index.version and announced != self._given_up:
                    self._catch_up_locked(announced)
        if self._sock is None and not self._closed:
            now = time.monotonic()
            if self._last_attempt is None:
                due = True
            elif self._retry_at is not None:
                due = now >= self._retry_at
            else:
                due = now - self._last_attempt >= _RETRY_INTERVAL
            if due:
                if self._retry_at is not None:
                    self._last_quick = now
                self._last_attempt = now
                self._retry_at = None
                self._connect_locked(now + _CONNECT_WAIT)

    def _connect_locked(self, deadline: float) -> None:
        """Connect, subscribe and re-send our listeners in one write; wait for the snapshot."""
        sock = PLAIN_SOCKET(socket.AF_UNIX, socket.SOCK_STREAM)
        slots = [_Slot("subscribe")]
        msgs = [encode({"op": "subscribe"})]
        for (addr, port), rendezvous in self._listeners.items():
            slots.append(_Slot("relisten"))
            msgs.append(
                encode({"op": "listen", "addr": addr, "port": port, "rendezvous": rendezvous})
            )
        try:
            sock.settimeout(_CONNECT_WAIT)
            sock.connect(str(self._path))
            sock.sendall(b"".join(msgs))
        except OSError as exc:
            sock.close()
            self._reason = f"cannot reach the agent at {self._path}: {_describe(exc)}"
            return
        self._sock = sock
        self._epoch += 1
        self._page = self._map_version_page(self._path)
        self._poller = _new_poller()
        self._poller.register(sock, select.POLLIN)
        if self._epoll is not None:
            self._epoll.register(sock, select.EPOLLIN)
        self._reader = LineReader(MAX_REPLY_LINE)
        self._pending = deque(slots)
        self._reason = "waiting for the agent's snapshot"
        self._wait_locked(slots[0], deadline)

    def _catch_up_locked(self, announced: int) -> None:
        """The agent has a newer snapshot than we do: wait briefly for its push.

        This happens when our socket buffer was full of older pushes, so the agent could
        not write the newest one yet; it will as soon as we have drained the backlog.
        """
        deadline = time.monotonic() + _CATCH_UP_WAIT
        while self._index is not None and self._index.version < announced:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._given_up = announced
                return
            self._poller.poll(max(1, int(remaining * 1000)))
            self._drain_locked()

    @staticmethod
    def _map_version_page(path: Path) -> mmap.mmap | None:
        try:
            with open(version_path(path), "rb") as f:
                return mmap.mmap(f.fileno(), VERSION.size, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None  # no page: we only lose the catch-up, never correctness

    def _wait_locked(self, slot: _Slot, deadline: float) -> None:
        """Read (applying pushes) until ``slot`` is answered, the deadline, or failure."""
        sock = self._sock
        if sock is None:
            return
        try:
            while not slot.done and self._sock is sock:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                sock.settimeout(remaining)
                try:
                    data = sock.recv(_RECV_SIZE)
                except TimeoutError:
                    return
                except OSError as exc:
                    self._drop_locked(f"agent connection failed: {_describe(exc)}")
                    return
                if not self._received_locked(data):
                    return
        finally:
            if self._sock is sock:
                sock.setblocking(False)  # so poll()'s recv never waits

    def _drain_locked(self) -> None:
        while (sock := self._sock) is not None and self._poller.poll(0):
            try:
                data = sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                self._drop_locked(f"agent connection failed: {_describe(exc)}")
                return
            if not self._received_locked(data):
                return

    def _received_locked(self, data: bytes) -> bool:
        """Apply what the agent sent; False (and the connection dropped) at its EOF."""
        if not data:
            if self._index is not None:
                # A working connection ended: the agent restarted or our guest migrated.
                self._retry_at = max(time.monotonic(), self._last_quick + _RECONNECT_GAP)
            self._drop_locked("the agent closed the connection")
            return False
        self._feed_locked(data)
        return True

    def _feed_locked(self, data: bytes) -> None:
        """Match replies to requests and apply the newest snapshot seen in ``data``."""
        self._reader.feed(data)
        latest: dict[str, Any] | None = None
        try:
            lines = []
            while (line := self._reader.next_line()) is not None:
                lines.append(line)
            # A backlog of pushes: only the last one matters, so only it is parsed.
            pushes = [i for i, line in enumerate(lines) if line.startswith(_PUSH_PREFIX)]
            skip = set(pushes[:-1])
            for i, line in enumerate(lines):
                if i in skip or not line.strip():
                    continue
                msg = decode(line)
                if "push" in msg:
                    if msg["push"] == "snapshot":
                        latest = msg.get("snapshot")
                    continue  # unknown pushes are for newer clients
                if "ok" not in msg or not self._pending:
                    raise WireError("unexpected message from the agent")
                slot = self._pending.popleft()
                slot.reply, slot.done = msg, True
                if slot.kind == "subscribe":
                    if msg["ok"] is not True:
                        raise WireError(f"subscribe refused: {msg.get('error')}")
                    latest = msg.get("snapshot")
                elif slot.kind == "relisten" and msg["ok"] is not True:
                    self.last_relisten_error = str(msg.get("error"))
            if latest is not None:
                if not isinstance(latest, dict):
                    raise WireError("malformed snapshot")
                self._index = _Index(latest)
                self._snapshot = latest
        except WireError as exc:
            self._drop_locked(f"garbage from the agent: {exc}")

    def _request_locked(self, msg: dict[str, Any]) -> dict[str, Any]:
        self._poll_locked()
        sock = self._sock
        if sock is None:
            raise AgentUnavailable(self._reason)
        slot = _Slot("request")
        self._pending.append(slot)
        deadline = time.monotonic() + _REQUEST_TIMEOUT
        try:
            sock.settimeout(_REQUEST_TIMEOUT)
            sock.sendall(encode(msg))
        except OSError as exc:
            self._drop_locked(f"agent connection failed: {_describe(exc)}")
            raise AgentUnavailable(self._reason) from exc
        self._wait_locked(slot, deadline)
        if not slot.done:
            if self._sock is not None:
                # Whether the agent will still act on it is unknown; hanging up settles it
                # (it forgets all our listeners) and the reconnect re-sends the good ones.
                self._drop_locked(f"the agent did not reply within {_REQUEST_TIMEOUT} s")
            raise AgentUnavailable(self._reason)
        if slot.reply.get("ok") is not True:
            raise AgentRejected(str(slot.reply.get("error")))
        return slot.reply

    #### Change detection (for sleeping sockets)

    @property
    def version(self) -> int:
        """A number that grows whenever the agent's table may have changed; no syscall.

        It is read from the agent's shared version page (one aligned 8-byte load from a
        mapping), which the agent bumps *before* it pushes a snapshot, so a socket can check
        it on every operation and call :meth:`poll` only when it moved.  The top bits count
        this client's connects and drops, so the number also moves (and never goes back)
        when the client hangs up or reconnects to another agent, e.g. after its guest
        migrated; values from two agents are never compared as if they were one counter.

        Without a mapped page (agent too old, file unreadable) the low bits are the version
        of the snapshot already applied, so changes then show only after :meth:`poll`.
        Nothing connects here: before the first query or :meth:`poll`, it stays 0.
        """
        with self._lock:  # uncontended: a user-space atomic, not a syscall
            page, index = self._page, self._index
            low = 0
            if page is not None:
                with contextlib.suppress(ValueError):  # closed under us: treat as no page
                    low = VERSION.unpack_from(page)[0]
            elif index is not None:
                low = index.version
            return (self._epoch << _EPOCH_SHIFT) | (low & ((1 << _EPOCH_SHIFT) - 1))

    def wait_fileno(self) -> int:
        """An fd that becomes readable when the agent pushes a snapshot or hangs up.

        A sleeping socket adds it to its select/poll/epoll set (or ``loop.add_reader``) to
        wake on residency changes, then calls :meth:`poll` (which drains it) and re-checks.
        It is an epoll fd watching the current agent connection; it stays the same fd across
        reconnects (the new connection is added to it), until :meth:`close`.  A forked child
        must call this again (the parent's epoll instance is closed in the child).

        While no agent is connected nothing makes it readable; :meth:`poll` reconnects at
        most once per second then, so a sleeper that needs to notice a restarted agent
        should also wake on a timeout.  Calling this connects if no connection exists.
        """
        with self._lock:
            if self._epoll is None:
                self._epoll = _new_epoll()
                if self._sock is not None:
                    self._epoll.register(self._sock, select.EPOLLIN)
            self._poll_locked()
            return self._epoll.fileno()

    #### Queries (hot path)

    def poll(self) -> None:
        """Apply pushed snapshots without blocking (and reconnect if due)."""
        with self._lock:
            self._poll_locked()

    @property
    def available(self) -> bool:
        with self._lock:
            self._poll_locked()
            return self._index is not None

    @property
    def unavailable_reason(self) -> str | None:
        with self._lock:
            self._poll_locked()
            return None if self._index is not None else self._reason

    @property
    def snapshot(self) -> dict[str, Any] | None:
        """The latest snapshot as the agent sent it (read-only by convention)."""
        with self._lock:
            self._poll_locked()
            return self._snapshot

    @property
    def self_guest(self) -> GuestInfo | None:
        with self._lock:
            self._poll_locked()
            return self._index.self_guest if self._index else None

    @property
    def last_self_guest(self) -> GuestInfo | None:
        """Our guest as of the last poll, without polling again (right after a lookup)."""
        index = self._index
        return index.self_guest if index else None

    @property
    def rendezvous_dir(self) -> Path | None:
        with self._lock:
            self._poll_locked()
            return self._index.rendezvous_dir if self._index else None

    @property
    def last_rendezvous_dir(self) -> Path | None:
        """The agent's rendezvous directory as of the last poll, without polling again."""
        index = self._index
        return index.rendezvous_dir if index else None

    def lookup(self, ip: str, port: int) -> tuple[ListenerInfo | None, str]:
        """The co-resident cosock listener for ``ip:port``, or None and why not.

        Returns:
            ``(listener, "")``, or ``(None, reason)`` with reason ``"not-coresident"``,
            ``"no-listener"`` or ``"agent-unreachable: <detail>"``.
        """
        with self._lock:
            self._poll_locked()
            index = self._index
            if index is None:
                return None, f"agent-unreachable: {self._reason}"
        c = _classify(ip)
        if c is None:
            return None, "not-coresident"
        norm, loop = c
        own = loop or norm in index.self_addrs
        guest = index.self_guest if own else index.owner.get(norm)
        if guest is None:
            return None, "not-coresident"
        wildcard = None
        for info, info_loop in index.by_guest_port.get((guest.name, port), ()):
            if info.addr == norm:
                return info, ""  # the kernel, too, prefers the specific bind
            if wildcard is None and (info.addr in _WILDCARDS or (loop and info_loop)):
                wildcard = info
        return (wildcard, "") if wildcard else (None, "no-listener")

    def gone_for_sure(self, ip: str) -> bool:
        """Before a switch to TCP: the agent pushes its table, so the one we hold is it."""
        return self.guest_owning(ip) is None

    def guest_owning(self, ip: str) -> GuestInfo | None:
        """The guest on this host that owns ``ip`` (loopback: our own guest), else None."""
        with self._lock:
            self._poll_locked()
            index = self._index
        if index is None:
            return None
        c = _classify(ip)
        if c is None:
            return None
        if c[1] or c[0] in index.self_addrs:
            return index.self_guest
        return index.owner.get(c[0])

    #### Listener registration

    def listen(self, addr: str, port: int, rendezvous: str) -> None:
        """Publish a listener of this process; returns once every subscriber can see it.

        Once it succeeded, the registration is sent again after every reconnect, until
        :meth:`unlisten`.  When it raises, the listener is not registered anywhere.

        Raises:
            AgentRejected: the agent refused (bad address, caller not in a known guest).
            AgentUnavailable: no agent, or no reply within 2 s.
        """
        key = (_canonical(addr), port)
        with self._lock:
            req = {"op": "listen", "addr": key[0], "port": port, "rendezvous": rendezvous}
            self._request_locked(req)
            self._listeners[key] = rendezvous

    def unlisten(self, addr: str, port: int) -> None:
        """Withdraw a listener; a no-op when the agent is gone (it forgot it with us).

        Raises:
            AgentRejected: the agent refused.
        """
        key = (_canonical(addr), port)
        with self._lock:
            self._listeners.pop(key, None)
            if self._sock is None:
                return
            try:
                self._request_locked({"op": "unlisten", "addr": key[0], "port": port})
            except AgentRejected:
                raise
            except AgentUnavailable:
                pass  # the connection is gone, and the listener with it


#### Fork safety

_instances: weakref.WeakSet[AgentClient] = weakref.WeakSet()


_reset_in: int | None = None  # the pid whose clients were reset after its fork


def _after_fork_in_child() -> None:
    """Forget the parent's clients.  Idempotent: ``_census``'s fork hook calls it before it
    restarts the background threads (they use the client at once), whichever hook runs
    first -- a thread that took the parent's lock, held by a thread lost in the fork,
    would wait for ever."""
    global _reset_in
    if _reset_in == os.getpid():
        return
    _reset_in = os.getpid()
    AgentClient._shared = None
    AgentClient._shared_lock = threading.Lock()
    for client in list(_instances):
        client._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


#### One-shot requests (lab and admin)


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _oneshot(path: Path, req: dict[str, Any], timeout: float = _REQUEST_TIMEOUT) -> dict[str, Any]:
    sock = PLAIN_SOCKET(socket.AF_UNIX, socket.SOCK_STREAM)
    reader = LineReader(MAX_REPLY_LINE)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(encode(req))
        while True:
            line = reader.next_line()
            if line is None:
                data = sock.recv(_RECV_SIZE)
                if not data:
                    raise AgentUnavailable(f"the agent at {path} closed the connection")
                reader.feed(data)
                continue
            msg = decode(line)
            if "ok" in msg:
                break
    except WireError as exc:
        raise AgentUnavailable(f"garbage from the agent at {path}: {exc}") from exc
    except AgentUnavailable:
        raise
    except OSError as exc:
        raise AgentUnavailable(f"cannot reach the agent at {path}: {_describe(exc)}") from exc
    finally:
        sock.close()
    if msg["ok"] is not True:
        raise AgentRejected(str(msg.get("error")))
    return msg


def register_guest(
    path: Path, name: str, netns: int, addresses: Iterable[str], host: str = ""
) -> None:
    """Tell the agent that the guest ``name`` (network namespace inode ``netns``) lives here.

    Replaces a guest of the same name or namespace; subscribers see it before this returns.

    Raises:
        AgentRejected: invalid fields, or an address owned by another guest.
        AgentUnavailable: no agent answers on ``path``.
    """
    req: dict[str, Any] = {
        "op": "register_guest",
        "name": name,
        "netns": netns,
        "addresses": list(addresses),
    }
    if host:
        req["host"] = host
    _oneshot(path, req)


def unregister_guest(path: Path, name: str, disconnect: bool = False) -> int:
    """Forget a guest (idempotent).

    With ``disconnect`` (the guest migrated away), the agent also hangs up on every
    process of the guest's network namespace before replying, so their clients reconnect
    (through their agent path, re-pointed to the new host) and re-register listeners there.

    Returns:
        How many connections the agent hung up on.
    """
    req: dict[str, Any] = {"op": "unregister_guest", "name": name}
    if disconnect:
        req["disconnect"] = True
    return int(_oneshot(path, req).get("disconnected", 0))


def status(path: Path) -> dict[str, Any]:
    """The agent's full state: host, guests, listeners, subscribers, counters, uptime."""
    reply = _oneshot(path, {"op": "status"})
    del reply["ok"]
    return reply


def connections(path: Path) -> dict[str, Any]:
    """The cosock connections of this host's processes (yours only unless admin)."""
    reply = _oneshot(path, {"op": "connections"})
    del reply["ok"]
    return reply


def metrics(path: Path) -> str:
    """The agent's counters in Prometheus text format."""
    return str(_oneshot(path, {"op": "metrics"})["text"])
