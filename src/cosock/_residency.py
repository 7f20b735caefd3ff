"""Residency watch: move live connections off shared memory when their peer stops being
co-resident (a live migration), also while the application is not calling into them.

One daemon thread per process, started with the first accelerated connection. It sleeps
on the agent client's wake-up fd (every pushed snapshot, every reconnect to another agent
makes it readable), and when the agent's table changed it asks each connection whether
its peer is still on this host; those whose peer left switch to TCP (``CoSocket``'s path
switch), clients whose peer is back ask for an upgrade. Until a switch or an upgrade is
complete it also finishes it for idle applications: it reads the peer's SWITCH, or the
upgrade's UPGRADE, ACCEPT/REJECT and RINGMARK (only control frames: data stays in the
kernel, so the application's own readiness is untouched) and hands what they queued to
the kernel.

The agent is never on the data path: when it is unreachable nothing is decided, and live
connections carry on as they are.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import TYPE_CHECKING, Any

from . import _selectors

if TYPE_CHECKING:
    from ._socket import CoSocket

log = logging.getLogger("cosock.residency")
#: The kernel's poll, taken before ``cosock.enable()`` can make select.poll ring-aware.
_kernel_poll = select.poll

#: Sleep bound while nothing is switching (a missed wake-up costs at most this).
_IDLE_MS = 1000
#: Sleep bound while a switch is in progress (the peer's answer, room for the resend).
_BUSY_MS = 50
#: How often connections are judged again without news from the agent (an upgrade that
#: was refused because the server's agent had not caught up yet is retried this soon).
_RECHECK_MS = 200
#: With no accelerated connection left for this long, the thread ends (restarted on demand).
_RETIRE_S = 2.0

#: What the watch answers on an fd it polls for the peer's downgrade request: the urgent
#: byte, and what ``poll`` reports whatever was asked (so that it is acted on, not spun on).
_POKED = select.POLLPRI | select.POLLERR | select.POLLHUP

_lock = threading.Lock()
_started_pid: int | None = None
#: The watch's eventfd for ``wake()``: made with the first thread, kept for the process.
_wake_fd: int | None = None


def ensure_watching() -> None:
    """Start the watch thread of this process (again after a fork) if it is not running."""
    global _started_pid, _wake_fd
    from . import _census

    _census.ensure_publishing()  # ``cosock status`` lists the connections we watch
    pid = os.getpid()
    with _lock:  # the thread clears _started_pid under it when it retires
        if _started_pid == pid:
            return
        if _wake_fd is None:
            try:
                _wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            except OSError:
                pass  # no descriptor left: a close waits for the watch's next round
        thread = threading.Thread(target=_run, name="cosock-residency", daemon=True)
        thread.start()
        _started_pid = pid


def _after_fork_in_child() -> None:
    """Forget the parent's thread (its lock may have been held at the fork); called by
    ``_census``'s fork hook, which then restarts both threads if connections are live."""
    global _lock, _started_pid, _wake_fd
    _lock = threading.Lock()
    _started_pid = None
    if _wake_fd is not None:
        try:
            os.close(_wake_fd)  # the parent's thread's
        except OSError:
            pass
        _wake_fd = None


def wake() -> None:
    """End the watch's current sleep now.

    Its poll holds a reference to every fd it watches, so a socket the application closes
    stays open in the kernel -- no FIN, no RST for the peer -- until that poll returns.
    ``CoSocket.close()`` calls this right after closing its fd.
    """
    with _lock:  # (a fork's child closes and replaces it under the lock)
        if _wake_fd is not None:
            try:
                os.eventfd_write(_wake_fd, 1)
            except OSError:
                pass


def _retire() -> bool:
    """No accelerated connection is left: end the thread (True) unless one just came."""
    global _started_pid
    with _lock:
        if _live():
            return False
        _started_pid = None
        return True


def _live() -> list[CoSocket]:
    out = []
    for ref in list(_selectors._channels.values()):
        sock = ref()
        if sock is not None and sock._co is not None:
            out.append(sock)
    return out


def _agent() -> Any:
    from . import _vmchannel
    from .agent.client import AgentClient

    vm = _vmchannel.directory()
    if vm is not None:  # in a VM the host's gateway, not a local agent, says who is near
        return vm

    # Only the client the connections were made with: never open a new one (after a
    # test's reset_shared(), or the application's close(), the watch must not revive it).
    client = AgentClient.current()
    if client is None:
        raise LookupError("no agent client in this process")
    return client


def _run() -> None:
    # No CoSocket is referenced from this frame while it sleeps: the helpers below take
    # the live sockets from their weak registry and drop them when they return.  Held
    # across the poll (or in a loop variable), an application's socket dropped without
    # close() would never be freed: its fds, memfd and mapping would stay open for as long
    # as the thread runs, and the thread would run for ever, watching it.
    seen: int | None = None
    checked = 0.0
    idle_since: float | None = None
    while True:
        now = time.monotonic()
        if not _live():
            # Nothing to watch: do not keep the agent connection busy; retire soon.
            idle_since = idle_since or now
            if now - idle_since >= _RETIRE_S and _retire():
                return
            time.sleep(_BUSY_MS / 1000)
            continue
        idle_since = None
        try:
            agent = _agent()
            wait_fd: int | None = agent.wait_fileno()
        except Exception:  # no agent now: connections carry on; try again later
            agent = wait_fd = None
        watched, timeout_ms = _plan()
        poller = _kernel_poll()
        if wait_fd is not None:
            poller.register(wait_fd, select.POLLIN)
        woken_by = _wake_fd
        if woken_by is not None:
            poller.register(woken_by, select.POLLIN)
        for fd, events in watched:
            poller.register(fd, events)
        try:
            ready = poller.poll(timeout_ms)
        except InterruptedError:
            ready = []
        if woken_by is not None and any(fd == woken_by for fd, _ in ready):
            try:
                os.eventfd_read(woken_by)
            except OSError:
                pass
        if agent is not None:
            seen, checked = _judge(agent, seen, checked)
        _serve()
        _answer_pokes([fd for fd, events in ready if events & _POKED])
        _hand_over_forked({fd for fd, events in ready if events & select.POLLIN})


def _plan() -> tuple[list[tuple[int, int]], int]:
    """The fds (and events) of the connections that need service, or may be asked to
    downgrade (POLLPRI: the peer's urgent byte, ``_downgrade``), and how long to sleep."""
    socks = _live()
    watched: dict[int, int] = {}
    busy = False
    for sock in socks:
        try:
            fd = sock.fileno()
            if sock._cosock_needs_service():
                watched[fd] = watched.get(fd, 0) | sock._cosock_service_events()
                busy = True
            if sock._cosock_pokeable():
                watched[fd] = watched.get(fd, 0) | select.POLLPRI
            want = sock._cosock_fork_requests()
            if want is not None:
                watched[want] = select.POLLIN
        except (OSError, ValueError):
            continue
    # A switched connection may be upgraded (and a refused upgrade retried) soon; one in
    # the middle of an upgrade is looked at each round (_serve).
    framed = any(s.cosock_path in ("tcp", "upgrading") for s in socks)
    return list(watched.items()), _BUSY_MS if busy else _RECHECK_MS if framed else _IDLE_MS


def _hand_over_forked(ready: set[int]) -> None:
    """Another process that shares a channel with us by fork() wants to use it."""
    if ready:
        for sock in _live():
            if sock._cosock_fork_requests() in ready:
                sock._cosock_fork_serve()


def _answer_pokes(fds: list[int]) -> None:
    """A peer asks to downgrade a connection whose application may not be reading."""
    for fd in fds:
        ref = _selectors._channels.get(fd)
        sock = None if ref is None else ref()
        if sock is not None:
            sock._cosock_poked()


def _judge(agent: Any, seen: int | None, checked: float) -> tuple[int | None, float]:
    """Ask each connection whether its peer is still co-resident, when the agent's table
    changed (or every _RECHECK_MS); returns the table version and time judged."""
    try:
        agent.poll()
        version = agent.version
        now = time.monotonic()
        # Also once a second: a connection that just finished an upgrade or a
        # switch must be judged against the table it missed while busy.
        if version != seen or now - checked >= _RECHECK_MS / 1000:
            seen, checked = version, now
            for sock in _live():
                sock._cosock_check_residency(agent)
    except Exception:
        log.debug("residency check failed", exc_info=True)
        _trace_failure("residency check failed")
    return seen, checked


def _trace_failure(what: str) -> None:
    """``COSOCK_TRACE=PATH`` (see ``_socket``): a failure the watch swallows (it must go on
    watching the other connections) still leaves its traceback there."""
    path = os.environ.get("COSOCK_TRACE")
    if path:
        import traceback

        with open(path, "a") as f:
            f.write(f"{time.monotonic():.6f} {os.getpid()} watch: {what}: {traceback.format_exc()}")


def _serve() -> None:
    """Let the connections that are mid-switch or mid-upgrade move on."""
    for sock in _live():
        if sock._cosock_needs_service() or sock._cosock_upgrade_waits():
            sock._cosock_service()
