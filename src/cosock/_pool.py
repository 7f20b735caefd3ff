"""Channels made ahead: a per-process stock of fresh, never-offered memfd channels.

Making a channel (memfd_create, ftruncate, seals, mmap, two header page faults) is the
largest single cost of a connection's set-up.  A daemon thread makes the next few while
the process waits on the network, so ``connect()`` usually just takes one.

Security: a channel leaves the stock at most once and never comes back.  A memfd that a
peer has received may still be mapped by that peer (or by anyone it passed the fd to) long
after the connection closed, and we cannot prove otherwise; handing it to another
connection would let the first peer read the second one's bytes.  So only channels that
no other process has ever seen are kept, each connection still gets a fresh memfd (as
DESIGN.md requires), and reuse of released channels is deliberately not done.

Fork: a child must not take channels from the parent's stock (the parent may offer the
same memfd too, and two connections would share one channel), so a forked child drops
its inherited copies (``os.register_at_fork``) before any of its own code runs, and
starts its own stock and thread when it first connects.

Idle cost: the thread sleeps on a condition variable while the stock is full (no CPU)
and exits after ``linger`` seconds without a take (an idle process has no extra thread,
and a program that forks long after its last connect forks a single-threaded process);
the stock is small (``COSOCK_CHANNEL_POOL`` channels, default 2; 0 turns the thread
off and channels are made on demand, e.g. for programs that fork after connecting and
want no extra thread).  Only the header pages of a stocked channel are touched, so its
memory cost is two pages plus page tables.  Measured (docs/connection-setup.md): the
thread beats both making channels on demand and refilling synchronously after the HELLO.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import deque

from . import _config
from ._ring import new_channel

_Item = tuple[int, int, mmap.mmap]  # capacity, fd, mapping


class ChannelPool:
    """The stock and its refill thread (one per process: see :func:`take`)."""

    def __init__(self, target: int, linger: float = 2.0) -> None:
        self.target = target
        #: Seconds the thread waits for a take with a full stock before it exits (so an
        #: idle process has no extra thread; :meth:`top_up` starts a new one).
        self.linger = linger
        self._cond = threading.Condition(threading.Lock())
        self._ready: deque[_Item] = deque()
        self._capacity = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        #: Channels taken from the stock and made on demand (the stock was empty).
        self.hits = 0
        self.misses = 0

    def take(self, capacity: int) -> tuple[int, mmap.mmap]:
        """A fresh channel of ``capacity``: ``(memfd, mapping)``, both owned by the caller.

        Raises:
            OSError: no channel could be made (memfd limits, out of memory).
        """
        item: _Item | None = None
        stale: list[_Item] = []
        with self._cond:
            if capacity != self._capacity:  # the ring size changed: old stock is useless
                stale.extend(self._ready)
                self._ready.clear()
                self._capacity = capacity
            if self._ready:
                item = self._ready.popleft()
                self.hits += 1
            else:
                self.misses += 1
                if self.target > 0 and not self._closed:
                    if self._thread is None:
                        self._start_locked()
                    self._cond.notify()
        _discard(stale)
        if item is not None:
            return item[1], item[2]
        return new_channel(capacity)

    def top_up(self) -> None:
        """Let the thread replace what was taken.  Called once the caller is about to wait
        on the network, so the thread's work overlaps that wait instead of competing with
        the caller for the GIL during set-up."""
        with self._cond:
            if len(self._ready) < self.target and not self._closed:
                if self._thread is None or not self._thread.is_alive():
                    self._start_locked()
                self._cond.notify()

    def ready(self) -> int:
        with self._cond:
            return len(self._ready)

    def close(self) -> None:
        """Stop the thread and unmap and close every stocked channel."""
        with self._cond:
            self._closed = True
            stale = list(self._ready)
            self._ready.clear()
            self._cond.notify_all()
            thread = self._thread
        _discard(stale)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def _start_locked(self) -> None:
        thread = threading.Thread(target=self._refill, name="cosock-channel-pool", daemon=True)
        self._thread = thread
        thread.start()

    def _refill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._ready) >= self.target:
                    if not self._cond.wait(self.linger) and len(self._ready) >= self.target:
                        if self._thread is threading.current_thread():
                            self._thread = None
                        return
                if self._closed:
                    return
                capacity = self._capacity
            try:
                fd, mm = new_channel(capacity)
            except OSError:
                with self._cond:  # out of memfds or memory: wait for the next take
                    if not self._closed and not self._cond.wait(self.linger):
                        if self._thread is threading.current_thread():
                            self._thread = None
                        return
                continue
            with self._cond:
                if self._closed or capacity != self._capacity:
                    stale = [(capacity, fd, mm)]
                else:
                    self._ready.append((capacity, fd, mm))
                    stale = []
            _discard(stale)

    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's stock is the parent's; drop our copies unused."""
        self._cond = threading.Condition(threading.Lock())
        stale = list(self._ready)
        self._ready.clear()
        self._thread = None
        _discard(stale)


def _discard(items: list[_Item]) -> None:
    for _, fd, mm in items:
        mm.close()
        os.close(fd)


_pool: ChannelPool | None = None
_pool_lock = threading.Lock()


def pool() -> ChannelPool:
    """This process's pool (made on first use, sized by ``COSOCK_CHANNEL_POOL``)."""
    global _pool
    p = _pool
    if p is not None:
        return p
    with _pool_lock:
        if _pool is None:
            _pool = ChannelPool(_config.channel_pool())
        return _pool


def reset() -> None:
    """Close this process's pool (its stock unmapped, its thread stopped); the next
    connection makes a new one.  For leak accounting: stocked channels are not leaks."""
    global _pool
    with _pool_lock:
        p, _pool = _pool, None
    if p is not None:
        p.close()


def take(capacity: int) -> tuple[int, mmap.mmap]:
    """A fresh, never-offered channel ``(memfd, mapping)`` for one connection."""
    return pool().take(capacity)


def top_up() -> None:
    """See :meth:`ChannelPool.top_up` (a no-op before the first channel was taken)."""
    if _pool is not None:
        _pool.top_up()


def _after_fork_in_child() -> None:
    global _pool_lock
    _pool_lock = threading.Lock()
    if _pool is not None:
        _pool._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
