"""Census: publish this process's cosock connections for ``cosock status`` and the agent.

Why a file: the agent is never on the data path and must not be asked anything per
connection; a process that has connections instead keeps one small JSON file,
``<agent dir>/conn/<pid>.json``, up to date (at most once a second, only when something
changed, written to a temporary name and renamed so readers never see half a file). The
agent reads these files when asked for ``connections`` or ``metrics``; a file whose
process died (``/proc/<pid>`` gone, or a new process with that pid) is ignored and removed
by the reader.

Listed: every connection that has a channel (shm, handshake, switching, tcp after a
switch, upgrading) and every connection or listener that fell back to plain TCP with a
reason (``CoSocket`` reports each reason here: :func:`noted`), plus this process's count
of fallbacks by reason since it started.

One daemon thread per process, started on demand, wakes once a second and ends (removing
the file) when nothing has been listed for a while; ``atexit`` removes the file too.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _residency

if TYPE_CHECKING:
    from ._errors import FallbackReason
    from ._socket import CoSocket

log = logging.getLogger("cosock.census")

#: Format of the published file (bumped on incompatible changes).
FORMAT = 1
#: Name of the directory beside the agent's rendezvous directory.
DIR_NAME = "conn"
#: Publication period: a connection shows up (or changes) this soon.
_PERIOD_S = 1.0
#: With nothing to list for this long, the thread removes the file and ends.
_RETIRE_S = 2.0

_BaseSocket = socket.socket

#: Reentrant: a garbage collection inside it may close a socket that reports a reason.
_lock = threading.RLock()
_started_pid: int | None = None
#: Sockets that got a fallback reason (weakly held: closing and dropping one is enough).
_noted: weakref.WeakKeyDictionary[CoSocket, bool] = weakref.WeakKeyDictionary()
#: Fallbacks of this process by reason (connections only, each socket counted once).
_fallbacks: collections.Counter[str] = collections.Counter()
#: 4-tuples of connected sockets (they never change once known).
_ends: weakref.WeakKeyDictionary[CoSocket, tuple[str, int, str, int]] = weakref.WeakKeyDictionary()
#: The file this process wrote last (removed when the thread retires or the process exits).
_written: Path | None = None
#: Where this process (or the parent it was forked from) last published.
_last_directory: Path | None = None


def noted(sock: CoSocket, why: FallbackReason, listening: bool | None = None) -> None:
    """``sock`` uses plain TCP because of ``why``: count it once and list it while open.
    ``listening``: whether it is a listener, if the caller knows (else the kernel says)."""
    if listening is None:
        try:
            listening = bool(_BaseSocket.getsockopt(sock, socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        except OSError:
            listening = False
    with _lock:
        if sock in _noted:
            return
        _noted[sock] = listening
        if not listening:
            _fallbacks[why.value] += 1
    ensure_publishing()


def ensure_publishing() -> None:
    """Start this process's census thread (again after a fork) if it is not running."""
    global _started_pid
    pid = os.getpid()
    if _started_pid == pid:  # the common case, without the lock
        return
    with _lock:
        if _started_pid == pid:
            return
        # The thread's modules are imported here, not in the thread: a fork while the
        # thread was still importing one (a ForkingMixIn server accepting its first
        # connection; a QEMU guest under TCG takes seconds to import) left the child that
        # module half initialized for good, and its fork hook failed on it.
        from . import _vmchannel

        if _vmchannel.active():
            from . import _vmcensus  # noqa: F401
        threading.Thread(target=_run, name="cosock-census", daemon=True).start()
        _started_pid = pid


def proc_start(pid: int) -> int | None:
    """Start time of ``pid`` (clock ticks since boot), telling a process from a later one
    that reuses its pid; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def snapshot() -> dict[str, Any]:
    """This process's connections, fallback listeners and fallback counts, as published."""
    with _lock:
        noted = list(_noted.items())
        fallbacks = dict(_fallbacks)
    rows: dict[tuple[str, int, str, int], dict[str, Any]] = {}
    for sock in _residency._live():
        _add(rows, sock)
    listeners = []
    for sock, listening in noted:
        if listening:
            listener = _listener(sock)
            if listener is not None:
                listeners.append(listener)
        else:
            _add(rows, sock)
    return {
        "format": FORMAT,
        "pid": os.getpid(),
        "start": proc_start(os.getpid()),
        "comm": _comm(),
        "connections": [rows[k] for k in sorted(rows)],
        "listeners": sorted(listeners, key=lambda x: (x["addr"], x["port"])),
        "fallbacks": fallbacks,
    }


def _add(rows: dict[tuple[str, int, str, int], dict[str, Any]], sock: CoSocket) -> None:
    ends = _ends_of(sock)
    if ends is None or ends in rows:
        return  # closed, not connected (yet), or a dup of a socket already listed
    info = sock.cosock_info()
    if sock._co is None:  # plain TCP: the kernel counts its bytes, not we
        info["bytes_sent"] = info["bytes_received"] = None
    rows[ends] = {
        "local_addr": ends[0],
        "local_port": ends[1],
        "peer_addr": ends[2],
        "peer_port": ends[3],
        "accelerated": sock._co is not None,
        "path": info["path"],
        "fallback_reason": info["fallback_reason"],
        "error": info["error"],
        "bytes_sent": info["bytes_sent"],
        "bytes_received": info["bytes_received"],
        "switches": info.get("switches", 0),
        "upgrades": info.get("upgrades", 0),
        "upgrades_refused": info.get("upgrades_refused", 0),
    }


def _ends_of(sock: CoSocket) -> tuple[str, int, str, int] | None:
    ends = _ends.get(sock)
    if ends is not None:
        return ends if sock.fileno() != -1 else None
    try:
        local = _BaseSocket.getsockname(sock)
        peer = _BaseSocket.getpeername(sock)
    except OSError:
        return None
    ends = (str(local[0]), int(local[1]), str(peer[0]), int(peer[1]))
    with contextlib.suppress(TypeError):
        _ends[sock] = ends
    return ends


def _listener(sock: CoSocket) -> dict[str, Any] | None:
    try:
        addr = _BaseSocket.getsockname(sock)
    except OSError:
        return None  # closed
    reason = sock.cosock_fallback_reason
    return {
        "addr": str(addr[0]),
        "port": int(addr[1]),
        "fallback_reason": None if reason is None else reason.value,
    }


def _comm() -> str:
    try:
        with open("/proc/self/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _directory() -> Path | None:
    """``conn/`` beside the rendezvous directory of the agent we last heard from."""
    from .agent.client import AgentClient

    global _last_directory
    from . import _vmchannel

    if _vmchannel.active():  # a QEMU guest: no agent here, `cosock status` reads the files
        return _vmchannel.census_dir()
    client = AgentClient.current()  # made by the connections we list
    rv = None if client is None else client.last_rendezvous_dir
    if rv is not None:
        _last_directory = rv.parent / DIR_NAME
    # A forked child has no agent client (it is never inherited) until it connects
    # again: it publishes where its parent did, the host it was forked on.
    directory = _last_directory
    return directory if directory is not None and directory.is_dir() else None


def _write(directory: Path, doc: dict[str, Any]) -> Path | None:
    """Atomically replace ``<directory>/<pid>.json``; None if the directory refuses us."""
    global _written
    final = directory / f"{doc['pid']}.json"
    tmp = directory / f".{doc['pid']}.{os.urandom(4).hex()}.tmp"
    data = json.dumps(doc, separators=(",", ":")).encode()
    if _written is not None and _written != final:
        # The guest moved to another host's agent.  The old agent's file goes first: no
        # reader may find this process listed by two agents at once (a scraper summing
        # the hosts would count its connections twice); for a moment it is listed by none.
        _unlink(_written)
        _written = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            os.fchmod(fd, 0o644)  # the agent may run as another user (root)
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return None
    _written = final
    return final


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _remove_file() -> None:
    """Remove this process's file (at exit, and when the thread retires)."""
    global _written
    path, _written = _written, None
    if path is not None and path.name == f"{os.getpid()}.json":
        _unlink(path)


def _retire() -> bool:
    """Nothing to list: end the thread (True) unless something just came."""
    global _started_pid
    with _lock:
        if snapshot_is_empty():
            _started_pid = None
            _remove_file()
            return True
    return False


def snapshot_is_empty() -> bool:
    """No channel and no open fallback socket (called with ``_lock`` held)."""
    if _residency._live():
        return False
    return all(sock.fileno() == -1 for sock in list(_noted.keys()))


def _run() -> None:
    from . import _vmchannel

    in_vm = _vmchannel.active()
    if in_vm:
        from . import _vmcensus
    last: tuple[Path, str] | None = None
    idle_since: float | None = None
    while True:
        try:
            doc = snapshot()
            now = time.monotonic()
            if not doc["connections"] and not doc["listeners"]:
                idle_since = idle_since or now
                if now - idle_since >= _RETIRE_S and _retire():
                    if in_vm:
                        _vmcensus.clear()
                    return
            else:
                idle_since = None
            directory = _directory()
            key = json.dumps(doc, sort_keys=True)
            if directory is not None and last != (directory, key):
                doc["updated"] = time.time()
                if _write(directory, doc) is not None:
                    last = (directory, key)
            if in_vm:  # the host's `cosock status` learns it from the VM gateway
                _vmcensus.report(doc, key)
        except Exception:  # never let a status file take a process down
            log.debug("census failed", exc_info=True)
        time.sleep(_PERIOD_S)


#: The child-side fork resets of other modules, in order, all before this module restarts
#: threads: the channels are marked forked, with fresh locks (a restarted watch waited for
#: good on a lock the forking thread held); the parent's VM gateway connection and agent
#: client are forgotten (a thread would speak on the one, or wait on the other's lock); the
#: parent's VM census report is the parent's.  The first two also run from their own hooks,
#: once per fork whichever comes first.
_FORK_RESETS = (
    ("cosock._socket", "_channels_after_fork_in_child"),
    ("cosock._vmchannel", "_after_fork_in_child"),
    ("cosock._vmcensus", "_after_fork_in_child"),
    ("cosock.agent.client", "_after_fork_in_child"),
)


def _after_fork_in_child() -> None:
    global _started_pid, _written, _lock
    _lock = threading.RLock()
    _started_pid = None
    _written = None  # the parent's file
    _fallbacks.clear()
    for module, hook in _FORK_RESETS:
        # (getattr: never let a half-imported module stop the restarts below)
        reset = getattr(sys.modules.get(module), hook, None)
        if reset is not None:
            reset()
    # A forked child (socketserver.ForkingMixIn, multiprocessing) inherits the parent's
    # accelerated connections but not its threads: restart the residency thread (it
    # services path switches the peer starts) and this one, or ``cosock status`` would not
    # list the connections the child serves.  (The child has no agent client until it
    # connects again, so residency news from the agent reaches it only then.)
    _residency._after_fork_in_child()
    if _residency._live():
        _residency.ensure_watching()  # starts this module's thread too


def _before_fork() -> None:
    """Note where we publish before a fork even if this process's census thread has not
    looked yet (a ForkingMixIn server forks right after its first accept): the child has
    no agent client to ask."""
    global _last_directory
    module = sys.modules.get("cosock.agent.client")  # no import inside a fork hook
    client = None if module is None else module.AgentClient.current()
    rv = None if client is None else client.last_rendezvous_dir
    if rv is not None:
        _last_directory = rv.parent / DIR_NAME


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
atexit.register(_remove_file)
