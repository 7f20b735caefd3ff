"""The host agent: a single-threaded ``selectors`` loop on a Unix stream socket.

It is the Dom0/XenStore of the lab: it keeps the guests of one host and their cosock
listeners (:mod:`._registry`) and pushes a snapshot of them to every subscribed guest
process, so that processes decide co-residency locally.  It is never on the data path:
if it dies, live connections carry on and new ones fall back to plain TCP.

Peers are identified by the kernel, not by what they claim: ``SO_PEERCRED`` gives the
pid, and ``/proc/<pid>/ns/net`` names its network namespace, i.e. its guest.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._config import ENV_ENABLE
from .._errors import AgentUnavailable, CosockError
from ._connections import DIR_NAME as CENSUS_DIR
from ._connections import collect, prometheus_text
from ._owner import holds_listener
from ._plain import PLAIN_SOCKET
from ._registry import Registry, RequestError, check_name
from ._unmanaged import Scan, Tuple4, normalize, scan
from ._version import VERSION, version_path
from ._wire import LineReader, LineTooLong, WireError, decode, encode

if TYPE_CHECKING:
    from ._vmgate import VmGateway

log = logging.getLogger("cosock.agent")

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_NETNS_LINK = re.compile(r"net:\[([0-9]+)\]\Z")
#: Stop reading a connection's requests while this much output waits for it.
_PAUSE_BYTES = 1 << 20
_RECV_SIZE = 1 << 16


class AgentAlreadyRunning(CosockError):
    """Another agent already answers on the socket path."""


#### Helpers shared with ensure_agent


def agent_answers(path: Path, timeout: float = 1.0) -> bool:
    """True if something accepts connections on ``path`` (a live agent)."""
    sock = PLAIN_SOCKET(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except TimeoutError:
        return True  # backlog full: alive but busy
    except OSError:
        return False
    finally:
        sock.close()
    return True


def _prepare_dir(directory: Path, private: bool) -> None:
    """Create ``directory``; in private (per-user) mode insist it is ours and 0700.

    Why: a per-user path under /tmp could be pre-created by another user to capture the
    socket; refusing a foreign directory closes that hole.
    """
    directory.mkdir(mode=0o700 if private else 0o755, parents=True, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(directory))
    if private:
        if st.st_uid != os.geteuid():
            raise PermissionError(errno.EPERM, "directory owned by another user", str(directory))
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(directory, 0o700)


@contextlib.contextmanager
def _flocked(path: Path, timeout: float) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed), waiting at most ``timeout``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"lock {path} held for more than {timeout} s") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the lock


def _netns_of(pid: int) -> int | None:
    """Inode of ``pid``'s network namespace, or None if we cannot see the process."""
    if pid <= 0:
        return None
    try:
        match = _NETNS_LINK.match(os.readlink(f"/proc/{pid}/ns/net"))
    except OSError:
        return None
    return int(match.group(1)) if match else None


#### The server


@dataclass(eq=False)
class _Conn:
    id: int
    sock: socket.socket
    pid: int
    uid: int
    netns: int | None
    reader: LineReader = field(default_factory=LineReader)
    out: deque[tuple[bytes, bool]] = field(default_factory=deque)  # (data, is_push)
    out_off: int = 0  # bytes of out[0] already sent
    out_bytes: int = 0
    subscribed: bool = False
    eof: bool = False  # peer shut down its side; finish its requests, then close
    closing: bool = False  # close as soon as the output is flushed
    events: int = 0  # mask registered with the selector (0 = not registered)


_Handler = Callable[["AgentServer", _Conn, dict[str, Any]], dict[str, Any]]


class AgentServer:
    """One agent bound to ``path``.  Construct, then :meth:`serve_forever`, then :meth:`close`.

    Args:
        path: socket path; its directory is created, and ``<dir>/rv`` holds rendezvous sockets.
        host: this host's name, reported in snapshots.
        auto_guests: per-user mode: unknown namespaces become guests ``netns-<inode>``,
            and the socket and rendezvous directories are private (0700).
        verify_listeners: accept a ``listen`` only from a process that holds a listening
            socket on that address and port (see ``_owner``); off only for registry tests.
        vm_gateway: the VM gateway this agent runs (``--vm-gateway``): its VMs, their
            cosock listeners and their processes' census are listed too.

    Raises:
        AgentAlreadyRunning: another agent answers on ``path``.
        OSError: the path cannot be created or bound.
    """

    def __init__(
        self,
        path: Path,
        host: str,
        auto_guests: bool = False,
        verify_listeners: bool = True,
        vm_gateway: VmGateway | None = None,
    ) -> None:
        check_name(host, "host")
        self.vm_gateway = vm_gateway
        self.verify_listeners = verify_listeners
        self.path = Path(path)
        self.host = host
        self.private = auto_guests
        _prepare_dir(self.path.parent, self.private)
        self.rendezvous_dir = self.path.parent / "rv"
        self.census_dir = self.path.parent / CENSUS_DIR
        self._registry = Registry(host, str(self.rendezvous_dir), auto_guests)
        self._conns: dict[int, _Conn] = {}
        self._doomed: set[_Conn] = set()
        self._next_id = 1
        self._started = time.monotonic()
        self._counters = dict.fromkeys(
            (
                "connections",
                "requests",
                "errors",
                "malformed",
                "pushes",
                "dropped",
                "refused_listens",
            ),
            0,
        )
        self._stopping = False
        self._accept_paused_until = 0.0
        self._lsock = self._bind()
        try:
            self._ino = os.stat(self.path).st_ino
            self._version_page = self._publish_version_page()
            self.rendezvous_dir.mkdir(exist_ok=True)
            # Per-user: nobody else may even look.  Shared host: anyone may create a
            # rendezvous socket, nobody may list or remove others' (like /tmp, minus listing).
            os.chmod(self.rendezvous_dir, 0o700 if self.private else 0o1733)
            # Each process keeps its connections' file here (``cosock._census``).
            self.census_dir.mkdir(exist_ok=True)
            os.chmod(self.census_dir, 0o700 if self.private else 0o1733)
        except BaseException:
            self._lsock.close()
            raise
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._lsock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        log.info("agent for host %r listening on %s (auto=%s)", host, self.path, auto_guests)

    def _bind(self) -> socket.socket:
        # The lock makes check-stale-then-bind atomic against a second agent starting now.
        with _flocked(self.path.with_name(self.path.name + ".lock"), timeout=5.0):
            if agent_answers(self.path):
                raise AgentAlreadyRunning(f"another agent already answers on {self.path}")
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISSOCK(st.st_mode):
                    raise FileExistsError(
                        errno.EEXIST, "exists and is not a socket", str(self.path)
                    )
                os.unlink(self.path)  # stale: nothing answers
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(self.path))
                os.chmod(self.path, 0o600 if self.private else 0o666)
                sock.listen(128)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            return sock

    def _publish_version_page(self) -> mmap.mmap:
        """Map a fresh ``<socket>.version`` page holding the registry version.

        Why: a subscriber whose socket buffer filled up reads stale snapshots first; the
        page tells it, without a syscall, that a newer one is on its way (see client.py).
        Written to a temporary name and renamed, so a client never maps a half-made file
        and clients of a previous agent keep their (frozen) old page.
        """
        final = version_path(self.path)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, mmap.PAGESIZE)
            page = mmap.mmap(fd, mmap.PAGESIZE)
            VERSION.pack_into(page, 0, self._registry.version)
            os.rename(tmp, final)
        finally:
            os.close(fd)
        return page

    #### Lifecycle

    def serve_forever(self) -> None:
        """Run until :meth:`stop`."""
        while not self._stopping:
            timeout = None
            if self._accept_paused_until:
                timeout = max(0.0, self._accept_paused_until - time.monotonic())
                if timeout == 0.0:
                    self._accept_paused_until = 0.0
                    self._sel.register(self._lsock, selectors.EVENT_READ, None)
                    timeout = None
            for key, mask in self._sel.select(timeout):
                conn = key.data
                if conn is None:
                    if key.fileobj is self._lsock:
                        self._on_accept()
                    else:
                        self._drain_wakeups()
                elif conn not in self._doomed:
                    if mask & selectors.EVENT_WRITE:
                        self._flush(conn)
                        self._process(conn)
                    if mask & selectors.EVENT_READ and conn not in self._doomed:
                        self._on_readable(conn)
                    self._update(conn)
            self._close_doomed()

    def stop(self) -> None:
        """Ask the loop to return; safe from signal handlers and other threads."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def close(self) -> None:
        """Drop every connection and remove the socket, if it is still ours."""
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        self._sel.close()
        self._lsock.close()
        self._wake_r.close()
        self._wake_w.close()
        try:
            if os.stat(self.path).st_ino == self._ino:  # a newer agent may own the path now
                os.unlink(self.path)
                os.unlink(version_path(self.path))
        except OSError:
            pass
        self._version_page.close()
        log.info("agent for host %r stopped", self.host)

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    #### Connections

    def _on_accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self._lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting briefly instead of spinning.
                    log.warning("accept: %s; pausing for 100 ms", exc)
                    self._sel.unregister(self._lsock)
                    self._accept_paused_until = time.monotonic() + 0.1
                return
            sock.setblocking(False)
            pid, uid, _gid = _CRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
            )
            conn = _Conn(self._next_id, sock, pid, uid, _netns_of(pid))
            self._next_id += 1
            self._conns[conn.id] = conn
            self._counters["connections"] += 1
            self._update(conn)

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._doomed.add(conn)
            return
        if data:
            conn.reader.feed(data)
        else:
            conn.eof = True
        self._process(conn)

    def _process(self, conn: _Conn) -> None:
        """Handle buffered request lines until none is left or the output backs up."""
        while not conn.closing and conn.out_bytes < _PAUSE_BYTES and conn not in self._doomed:
            try:
                line = conn.reader.next_line()
                if line is None and conn.eof:
                    line = conn.reader.take_rest()
                    conn.closing = True  # after this last request
            except LineTooLong as exc:
                self._counters["requests"] += 1
                self._counters["malformed"] += 1
                self._counters["dropped"] += 1
                log.warning("pid %d: %s; disconnecting", conn.pid, exc)
                self._reply_error(conn, str(exc))
                conn.closing = True
                return
            if line is None:
                return
            if line.strip():
                self._handle_line(conn, line)

    def _update(self, conn: _Conn) -> None:
        """Register the events this connection waits for; close it when it is done."""
        if conn in self._doomed:
            return
        if conn.closing and not conn.out:
            self._doomed.add(conn)
            return
        want = 0
        if not (conn.eof or conn.closing or conn.out_bytes >= _PAUSE_BYTES):
            want |= selectors.EVENT_READ
        if conn.out:
            want |= selectors.EVENT_WRITE
        if want == conn.events:
            return
        if conn.events == 0:
            self._sel.register(conn.sock, want, conn)
        elif want == 0:
            self._sel.unregister(conn.sock)
        else:
            self._sel.modify(conn.sock, want, conn)
        conn.events = want

    def _close_doomed(self) -> None:
        while self._doomed:
            conn = self._doomed.pop()
            if self._conns.pop(conn.id, None) is None:
                continue
            if conn.events:
                self._sel.unregister(conn.sock)
            conn.sock.close()
            before = self._registry.version
            self._registry.drop_owner(conn.id)
            if conn.subscribed:
                self._registry.unsubscribe(conn.netns)
            if self._registry.version != before:
                self._push(exclude=None)

    #### Output

    def _send(self, conn: _Conn, data: bytes, push: bool) -> None:
        if push and len(conn.out) > 1:
            # Snapshots supersede each other: keep only the newest unsent one, so a
            # subscriber that does not read costs bounded memory.
            head = conn.out.popleft()
            kept = deque(item for item in conn.out if not item[1])
            kept.appendleft(head)
            conn.out = kept
            conn.out_bytes = sum(len(d) for d, _ in kept) - conn.out_off
        conn.out.append((data, push))
        conn.out_bytes += len(data)
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        """Write as much queued output as the socket takes now."""
        while conn.out:
            data = conn.out[0][0]
            try:
                n = conn.sock.send(memoryview(data)[conn.out_off :])
            except BlockingIOError:
                break
            except OSError:
                self._doomed.add(conn)
                conn.out.clear()
                conn.out_bytes = 0
                return
            conn.out_off += n
            conn.out_bytes -= n
            if conn.out_off == len(data):
                conn.out.popleft()
                conn.out_off = 0
        self._update(conn)

    def _reply_error(self, conn: _Conn, error: str) -> None:
        self._counters["errors"] += 1
        self._send(conn, encode({"ok": False, "error": error}), push=False)

    def _publish_version(self) -> None:
        VERSION.pack_into(self._version_page, 0, self._registry.version)

    def _push(self, exclude: _Conn | None) -> None:
        """Send the current snapshot to every subscriber (each with its own ``self``)."""
        self._publish_version()  # before any push
        cache: dict[int | None, bytes] = {}
        for conn in [c for c in self._conns.values() if c.subscribed]:
            if conn is exclude or conn.closing or conn in self._doomed:
                continue
            data = cache.get(conn.netns)
            if data is None:
                snap = self._registry.snapshot_for(conn.netns)
                data = cache[conn.netns] = encode({"push": "snapshot", "snapshot": snap})
            self._counters["pushes"] += 1
            self._send(conn, data, push=True)

    #### Requests

    def _handle_line(self, conn: _Conn, line: bytes) -> None:
        self._counters["requests"] += 1
        try:
            req = decode(line)
        except WireError as exc:
            self._counters["malformed"] += 1
            self._reply_error(conn, str(exc))
            return
        op = req.get("op")
        handler = _OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            self._reply_error(conn, f"unknown op {op!r}")
            return
        before = self._registry.version
        try:
            payload = handler(self, conn, req)
        except RequestError as exc:
            self._reply_error(conn, str(exc))
            return
        except Exception as exc:  # a bug must cost one request, not every guest's agent
            log.exception("op %r from pid %d failed", op, conn.pid)
            self._reply_error(conn, f"internal error: {type(exc).__name__}")
            return
        if self._registry.version != before:
            # Push first, reply second: once a listen() returns, every subscriber that
            # drains its socket already has the snapshot containing that listener.
            self._push(exclude=conn if op == "subscribe" else None)
        self._send(conn, encode({"ok": True, **payload}), push=False)

    def _require_admin(self, conn: _Conn) -> None:
        if conn.uid not in (0, os.geteuid()):
            raise RequestError("permission denied: only root or the agent's user may do that")

    def _op_register_guest(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any]:
        self._require_admin(conn)
        self._registry.register_guest(
            req.get("name"),  # every field is validated by the registry
            req.get("netns"),
            req.get("addresses", []),
            req.get("host") or None,
        )
        return {}

    def _op_unregister_guest(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any]:
        self._require_admin(conn)
        disconnect = req.get("disconnect", False)
        if not isinstance(disconnect, bool):
            raise RequestError("disconnect must be true or false")
        guest = self._registry.guest_named(req.get("name"))
        removed = self._registry.unregister_guest(req.get("name"))
        dropped = self._disconnect_netns(guest.netns, keep=conn) if guest and disconnect else 0
        return {"removed": removed, "disconnected": dropped}

    def _disconnect_netns(self, netns: int, keep: _Conn) -> int:
        """Hang up on every process of a guest that left this host (lab migration).

        Why: their clients then reconnect through the guest's (re-pointed) agent path and
        re-register their listeners with the agent of the host the guest now lives on.
        The shutdown happens here, before the reply, so that once the requester hears back,
        every such client already reads EOF on its next poll.
        """
        self._publish_version()  # so a woken process sees the page move, not only the EOF
        dropped = 0
        for other in list(self._conns.values()):
            if other is keep or other.netns != netns or other in self._doomed:
                continue
            with contextlib.suppress(OSError):
                other.sock.shutdown(socket.SHUT_RDWR)
            other.out.clear()
            other.out_off = other.out_bytes = 0
            self._doomed.add(other)
            dropped += 1
        return dropped

    def _op_subscribe(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any]:
        if not conn.subscribed:
            conn.subscribed = True
            self._registry.subscribe(conn.netns)
        return {"snapshot": self._registry.snapshot_for(conn.netns)}

    def _op_listen(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any]:
        if not conn.subscribed:
            raise RequestError("subscribe first")
        addr, port = req.get("addr"), req.get("port")
        if (
            self.verify_listeners
            and isinstance(addr, str)
            and type(port) is int
            and not holds_listener(conn.pid, addr, port)
        ):
            self._counters["refused_listens"] += 1
            raise RequestError(
                f"permission denied: pid {conn.pid} holds no listening socket on {addr}:{port}"
            )
        guest = self._registry.listen(
            conn.id, conn.netns, conn.pid, req.get("addr"), req.get("port"), req.get("rendezvous")
        )
        return {"guest": guest.name}

    def _op_unlisten(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any]:
        removed = self._registry.unlisten(conn.id, conn.netns, req.get("addr"), req.get("port"))
        return {"removed": removed}

    def _op_status(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any]:
        reg = self._registry
        subscribers = []
        for c in self._conns.values():
            if c.subscribed:
                guest = reg.guest_for(c.netns)
                subscribers.append(
                    {"pid": c.pid, "netns": c.netns, "guest": guest.name if guest else None}
                )
        return {
            "host": self.host,
            "pid": os.getpid(),
            "socket": str(self.path),
            "rendezvous_dir": str(self.rendezvous_dir),
            "auto_guests": reg.auto_guests,
            "version": reg.version,
            "guests": [g.to_wire() | {"auto": g.auto} for g in reg.guests()],
            "listeners": reg.listeners_wire(),
            "subscribers": subscribers,
            "counters": dict(self._counters),
            "uptime": round(time.monotonic() - self._started, 3),
            **self._vm_status(),
        }

    def _vm_status(self) -> dict[str, Any]:
        """The VM gateway's guests and published listeners (none without a gateway)."""
        gate = self.vm_gateway
        if gate is None:
            return {}
        with gate.lock:
            published = sorted(gate.listeners)
        requests: dict[str, dict[str, int]] = {}
        for (guest, op), n in list(gate.requests.items()):
            requests.setdefault(guest, {})[op] = n
        return {
            "vm_guests": gate.guests.listing(),
            "vm_listeners": [{"guest": g, "addr": a, "port": p} for g, a, p in published],
            "vm_census_rejected": dict(gate.census.rejected),
            "vm_requests": requests,
        }

    def _vm_census(self) -> list[dict[str, Any]]:
        """The processes inside this agent's VMs, as they reported to its gateway."""
        return [] if self.vm_gateway is None else self.vm_gateway.census.processes()

    def _census(self) -> list[dict[str, Any]]:
        def guest_of(pid: int) -> str | None:
            guest = self._registry.guest_for(_netns_of(pid))
            return guest.name if guest else None

        return collect(self.census_dir, guest_of)

    def _op_connections(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any]:
        """Connections of the processes on this host (only your own unless admin), and
        the TCP connections of each guest that no census lists (``"unmanaged": false``
        in the request skips those)."""
        census = processes = self._census()
        admin = conn.uid in (0, os.geteuid())
        if admin:  # a VM's user ids are not the host's: only an admin sees its processes
            processes = census + self._vm_census()
        else:
            processes = [p for p in census if p["uid"] == conn.uid]
        reply: dict[str, Any] = {"host": self.host, "processes": processes}
        if req.get("unmanaged", True) is not False:
            # Like ``ss -tnp`` without root: a non-root client (also the owner of a
            # per-user agent) gets its own uid's sockets only.
            found = self._unmanaged(conn, census, None if conn.uid == 0 else conn.uid)
            reply["unmanaged"] = found.rows
            reply["unmanaged_truncated"] = found.truncated
        return reply

    def _unmanaged(self, conn: _Conn, processes: list[Any], uid: int | None) -> Scan:
        """The kernel's established TCP connections of every guest's netns (and the
        caller's own: the loopback "guest") minus those the census lists."""
        spaces: dict[int, str | None] = {g.netns: g.name for g in self._registry.guests()}
        if conn.netns is not None and conn.netns not in spaces:
            spaces[conn.netns] = None
        known: set[tuple[int, Tuple4]] = set()
        for proc in processes:
            ns = _netns_of(proc["pid"])
            if ns is None:
                continue
            for c in proc["connections"]:
                local, peer = normalize(c["local_addr"]), normalize(c["peer_addr"])
                known.add((ns, (local, c["local_port"], peer, c["peer_port"])))
        return scan(spaces, known, uid)

    def _op_metrics(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any]:
        """Counters in Prometheus text format, for a scraper on the agent's socket."""
        return {"text": prometheus_text(self.host, self._census() + self._vm_census())}


_OPS: dict[str, _Handler] = {
    "register_guest": AgentServer._op_register_guest,
    "unregister_guest": AgentServer._op_unregister_guest,
    "subscribe": AgentServer._op_subscribe,
    "listen": AgentServer._op_listen,
    "unlisten": AgentServer._op_unlisten,
    "status": AgentServer._op_status,
    "connections": AgentServer._op_connections,
    "metrics": AgentServer._op_metrics,
}


#### Entry points


def serve(
    path: Path,
    host: str,
    auto_guests: bool = False,
    verify_listeners: bool = True,
    metrics_port: int | None = None,
    vm_gateway: VmGateway | None = None,
) -> None:
    """Run an agent on ``path`` until SIGTERM/SIGINT (or :meth:`AgentServer.stop`).

    Args:
        metrics_port: also serve ``GET /metrics`` (Prometheus text) on 127.0.0.1 at this
            port (0: any free port, logged); None: no HTTP at all.
        vm_gateway: the VM gateway started beside it (see :class:`AgentServer`).

    Raises:
        AgentAlreadyRunning: another agent answers on ``path``.
        MetricsPortError: the metrics port is not a port number or cannot be bound.
        OSError: the socket cannot be created.
    """
    from ._metrics_http import MetricsEndpoint, check_port

    if metrics_port is not None:
        check_port(metrics_port)  # before anything is created
    # Handlers go in before the socket exists: whoever sees it answer may signal us at once.
    stop_requested = False
    previous: dict[signal.Signals, Any] = {}

    def on_signal(*_: object) -> None:
        nonlocal stop_requested
        stop_requested = True
        if server is not None:
            server.stop()

    server: AgentServer | None = None
    endpoint: MetricsEndpoint | None = None
    try:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, on_signal)
        server = AgentServer(path, host, auto_guests, verify_listeners, vm_gateway)
        if metrics_port is not None:
            endpoint = MetricsEndpoint(metrics_port, server.path)
        if not stop_requested:
            server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if endpoint is not None:
            endpoint.close()
        if server is not None:
            server.close()


#: Agents this process started; kept so they are never garbage-collected while running
#: (Popen would warn) and reaped when they exit.
_children: list[subprocess.Popen[bytes]] = []


def ensure_agent(path: Path, host: str = "local", timeout: float = 5.0) -> bool:
    """Make sure an agent answers on ``path``, starting a detached per-user one if not.

    Race-safe: concurrent callers serialise on ``<path>.spawn.lock``, and the loser finds
    the winner's agent answering.

    Returns:
        True if this call started the agent.

    Raises:
        AgentUnavailable: the agent did not come up within ``timeout`` (see ``agent.log``
            next to the socket).
    """
    path = Path(path)
    _children[:] = [p for p in _children if p.poll() is None]
    if agent_answers(path):
        return False
    deadline = time.monotonic() + timeout
    try:
        _prepare_dir(path.parent, private=True)
        with _flocked(path.with_name(path.name + ".spawn.lock"), timeout):
            if agent_answers(path):
                return False
            log_path = path.with_name("agent.log")
            env = {k: v for k, v in os.environ.items() if k != ENV_ENABLE}
            # The child must import the same cosock as we did, installed or not.
            pkg_root = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
            argv = [sys.executable, "-m", "cosock.agent", "--socket", str(path), "--host", host]
            with open(log_path, "ab") as logf:
                proc = subprocess.Popen(
                    [*argv, "--auto"],
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                    cwd="/",  # hold no directory of the caller's busy
                )
            _children.append(proc)
            while not agent_answers(path):
                if proc.poll() is not None:
                    raise AgentUnavailable(
                        f"agent exited with status {proc.returncode}; see {log_path}"
                    )
                if time.monotonic() >= deadline:
                    raise AgentUnavailable(
                        f"agent did not answer within {timeout} s; see {log_path}"
                    )
                time.sleep(0.01)
            return True
    except AgentUnavailable:
        raise
    except (OSError, TimeoutError) as exc:
        raise AgentUnavailable(f"cannot start an agent on {path}: {exc}") from exc


def stop_agent(path: Path, timeout: float = 5.0) -> None:
    """Ask the agent answering at ``path`` for its pid and SIGTERM it (if any answers).

    An agent this process started (:func:`ensure_agent`) is also waited for and reaped,
    SIGKILLed if it has not exited within ``timeout``: when this returns it is gone, and
    no zombie of it is left behind (a private agent's caller owns its whole life).
    """
    from .client import status

    try:
        pid = int(status(path).get("pid", 0))
    except Exception:
        return
    if pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    for proc in [p for p in _children if p.pid == pid]:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _children.remove(proc)


@contextlib.contextmanager
def private_agent(prefix: str) -> Iterator[Path]:
    """A throw-away agent in a fresh temporary directory (demo and bench without root);
    stopped and its directory removed on exit."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    path = tmp / "agent.sock"
    try:
        ensure_agent(path)
        yield path
    finally:
        stop_agent(path)
        shutil.rmtree(tmp, ignore_errors=True)
