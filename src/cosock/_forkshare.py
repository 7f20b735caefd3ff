"""After ``fork()``: one process at a time on an accelerated connection, and a downgrade
to plain TCP when two processes want it.

Why: a ring's positions live in each process's ``CoSocket`` as well as in shared memory,
and the control stream is one kernel queue, so two processes using one channel duplicate
or overwrite bytes (each resumes from its own stale counters).  Plain TCP shares one
kernel queue between processes correctly; a channel cannot.  So, per channel shared by a
fork, a small shared *cell* (a memfd, locked with ``lockf``, which excludes processes)
names the process that may use the channel now:

* the first process to use the channel after the fork claims it (the usual pattern: a
  ForkingMixIn child serves the connection, the parent closes its copy);
* a process claiming a channel whose owner has exited or closed its copy takes it over,
  after re-reading the ring positions from shared memory (the previous owner published
  every one of them);
* a process claiming a channel whose owner is alive asks the owner to downgrade it (the
  cell says so, and an eventfd wakes the owner's residency watch), then both continue on
  plain TCP, exactly as two processes sharing a TCP socket do.  If the owner does not
  answer within ``WANT_TIMEOUT``, the claimer gets a clear ``TimeoutError``.

A channel that left the rings in the owner (a path switch) cannot be taken over: the
claimer gets ``ConnectionResetError``.

Contents: ``prepare()`` / ``after_fork()`` (fork hooks), ``claim()``, ``serve()`` (the
owner's watch), ``noted_fin()`` / ``noted_shutdown()`` / ``left()`` / ``closing()``.
"""

from __future__ import annotations

import errno
import os
import time
from typing import TYPE_CHECKING, Final

from . import _socket as _s  # (a cycle: _socket imports us; names are looked up at call time)
from ._errors import FallbackReason
from ._sharedwords import SharedWords

if TYPE_CHECKING:
    from ._socket import CoSocket, _Channel

#: How long a second process waits for the owner to hand the connection over.
WANT_TIMEOUT: Final = 30.0
# Cell slots (u64): owner pid (0: nobody now), state, the peer's FIN + 1, our FIN sent,
# and the last owner (0: nobody since the fork, when every process's positions are true).
_OWNER, _STATE, _PEER_FIN, _WR_SHUT, _LAST = 0, 1, 2, 3, 4
#: Cell states: on the rings; another process wants it; downgraded; left the rings.
_SHM, _WANTED, _PLAIN, _LEFT = 0, 1, 2, 3


class Cell(SharedWords):
    """The shared cell of one channel (see the module docstring), with the eventfd on which
    a claimer wakes the owner's residency watch."""

    __slots__ = ("efd",)

    def __init__(self) -> None:
        super().__init__("cosock-fork", 64)
        try:
            self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            super().close()
            raise

    def close(self) -> None:
        super().close()
        os.close(self.efd)


#### Fork hooks


def prepare(ch: _Channel) -> None:
    """Before the fork (parent): give an accelerated channel its cell, once."""
    if ch.fork_cell is None and ch.phase is _s._SHM and not ch.released:
        try:
            ch.fork_cell = Cell()
        except OSError:
            return  # no descriptors left: the channel is shared as before (documented)
        # Owner 0: parent and child hold the same positions now; whoever uses the channel
        # first owns it (a ForkingMixIn child, typically, while the parent closes it).


def after_fork(ch: _Channel) -> None:
    """In both processes: the channel must be claimed before its next use."""
    if ch.fork_cell is not None and ch.phase is _s._SHM:
        ch.phase = _s._FORKED


#### Claiming


def claim(sock: CoSocket, ch: _Channel) -> None:
    """Make this process the channel's user, or continue plain TCP with the owner.

    Raises:
        TimeoutError: the owner (alive) did not hand the connection over in time.
        ConnectionResetError: the owner left the rings (a path switch); nothing to take.
    """
    cell = ch.fork_cell
    assert cell is not None
    me = os.getpid()
    deadline: float | None = None
    while True:
        with cell.locked() as w:
            owner, state = int(w[_OWNER]), int(w[_STATE])
            if state == _PLAIN:
                break
            if state == _LEFT:
                raise ConnectionResetError(
                    errno.ECONNRESET,
                    "cosock: this connection, shared by fork(), changed path in process "
                    f"{owner}; it cannot continue here",
                )
            if owner == me or owner == 0 or not _alive(owner):
                _take(ch, w, me)
                w[_STATE] = _SHM
                ch.phase = _s._SHM
                return
            if state != _WANTED:
                w[_STATE] = _WANTED
                os.eventfd_write(cell.efd, 1)
        now = time.monotonic()
        if deadline is None:
            deadline = now + WANT_TIMEOUT
        elif now >= deadline:
            raise TimeoutError(
                f"cosock: process {owner} uses this accelerated connection (shared by "
                f"fork()) and did not hand it over to plain TCP within {WANT_TIMEOUT:g} s"
            )
        time.sleep(0.005)
    # The owner downgraded it: the kernel's queue is the stream now, for both of us.
    from ._downgrade import _detach_all

    _detach_all(sock, ch, FallbackReason.HANDED_OVER)


def try_claim(sock: CoSocket, ch: _Channel) -> bool:
    """Residency watch, for the peer's downgrade request on a channel shared by fork():
    claim it unless another live process owns it (that one's watch answers)."""
    cell = ch.fork_cell
    if cell is None:
        return False
    me = os.getpid()
    with cell.locked() as w:
        owner, state = int(w[_OWNER]), int(w[_STATE])
        if state != _SHM or not (owner == me or owner == 0 or not _alive(owner)):
            return False
        _take(ch, w, me)
    if ch.phase is _s._FORKED:
        ch.phase = _s._SHM
    return True


def may_serve(ch: _Channel) -> bool:
    """May this process's watch answer the peer for ``ch`` (shared by fork())?"""
    cell = ch.fork_cell
    if cell is None or ch.released:
        return False
    owner = int(cell.words[_OWNER])
    return owner == 0 or owner == os.getpid()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie uses nothing
    except OSError:
        return False


def _take(ch: _Channel, w: memoryview, me: int) -> None:
    """Own the channel; after another process used it, start from what it published."""
    last = int(w[_LAST])
    if last not in (0, me):
        _resync(ch, w)
    w[_OWNER] = w[_LAST] = me


def _resync(ch: _Channel, w: memoryview) -> None:
    """Take over from another process: what it did is in shared memory and the cell."""
    for end in (ch.tx, ch.rx):
        if end is not None:
            end.resync()
    if w[_PEER_FIN] and ch.fin is None:
        ch.fin = int(w[_PEER_FIN]) - 1
    if w[_WR_SHUT]:
        ch.wr_shut = True  # its FIN went out: sends fail as after our own shutdown()


#### The owner's side


def serve(sock: CoSocket) -> None:
    """Residency watch of the owner: another process wants the channel: downgrade it
    (both continue on plain TCP), then say so in the cell."""
    ch = sock._co
    cell = None if ch is None else ch.fork_cell
    if ch is None or cell is None:
        return
    try:
        os.eventfd_read(cell.efd)
    except OSError:
        pass
    with cell.locked() as w:
        wanted = int(w[_STATE]) == _WANTED and int(w[_OWNER]) == os.getpid()
    if not wanted:
        return
    try:
        sock.cosock_downgrade()  # (``downgraded()`` marks the cell when it is done)
    except OSError:
        if sock._co is ch:
            left(ch)  # the peer is gone or broken: the claimer gets a clear error


def owned_efd(ch: _Channel) -> int | None:
    """The eventfd the owner's watch polls for requests, if this process owns ``ch``."""
    cell = ch.fork_cell
    if cell is None or ch.released:
        return None
    return cell.efd if int(cell.words[_OWNER]) == os.getpid() else None


def noted_fin(ch: _Channel) -> None:
    """The peer's FIN arrived here: a process taking over later must know it."""
    if ch.fork_cell is not None and ch.fin is not None:
        ch.fork_cell.words[_PEER_FIN] = ch.fin + 1


def noted_shutdown(ch: _Channel) -> None:
    if ch.fork_cell is not None:
        ch.fork_cell.words[_WR_SHUT] = 1


def left(ch: _Channel) -> None:
    """This process switched the channel off the rings (framed TCP after a migration)."""
    _set_state(ch, _LEFT)


def downgraded(ch: _Channel) -> None:
    """This process downgraded the channel: every process continues on plain TCP."""
    _set_state(ch, _PLAIN)


def _set_state(ch: _Channel, state: int) -> None:
    cell = ch.fork_cell
    if cell is not None:
        with cell.locked() as w:
            w[_STATE] = state


def closing(ch: _Channel) -> None:
    """This process closes its last socket on ``ch``: another may take it over at once."""
    cell = ch.fork_cell
    if cell is not None:
        with cell.locked() as w:
            if int(w[_OWNER]) == os.getpid():
                w[_OWNER] = 0
