"""Ring-aware ``select.select`` and ``select.poll`` for programs that poll raw fds.

An accelerated CoSocket's fd carries control frames: the kernel calls it readable when a
doorbell is queued and always writable.  These replacements answer for such fds from the
rings (``CoSocket._cosock_events``, as the selectors in ``_selectors`` do) and use the
kernel only to sleep, with the channel's fd watched for reading (every doorbell, SPACE,
verdict and EOF frame wakes it).  A wake-up that turns out to carry no readiness (a stale
doorbell) does not end the call early: it waits on until the caller's timeout.  Calls
without accelerated fds go straight to the originals.

``select.epoll`` is emulated the same way.  Level-triggered and EPOLLONESHOT are exact;
EPOLLET reports a ring fd when it becomes ready after having been seen not ready (or on a
doorbell), which serves the usual read-until-EAGAIN loop; the epoll fd itself, nested in
another poller, reflects only kernel readiness.
"""

from __future__ import annotations

import errno
import select
import time
from collections.abc import Iterable
from typing import Any

from ._selectors import EVENT_READ, EVENT_WRITE, channel_socket

_select = select.select
_poll = select.poll
_epoll = select.epoll
_RING_MASK = select.POLLIN | select.POLLOUT
_KERNEL_ONLY = select.POLLHUP | select.POLLERR | select.POLLNVAL


def _fd(obj: Any) -> int:
    return obj if isinstance(obj, int) else int(obj.fileno())


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def co_select(
    rlist: Iterable[Any], wlist: Iterable[Any], xlist: Iterable[Any], timeout: float | None = None
) -> tuple[list[Any], list[Any], list[Any]]:
    """``select.select`` with accelerated CoSockets ready exactly when their rings are."""
    rl, wl, xl = list(rlist), list(wlist), list(xlist)
    try:
        fds_r = [_fd(o) for o in rl]
        fds_w = [_fd(o) for o in wl]
    except (AttributeError, TypeError, ValueError):
        return _select(rl, wl, xl, timeout)  # let the original raise its own error
    if not any(channel_socket(fd) for fd in (*fds_r, *fds_w) if fd >= 0):
        return _select(rl, wl, xl, timeout)
    if timeout is not None and timeout < 0:
        raise ValueError("timeout must be non-negative")
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        ring_r: set[int] = set()
        ring_w: set[int] = set()
        wake: set[int] = set()
        for fds, out, event in ((fds_r, ring_r, EVENT_READ), (fds_w, ring_w, EVENT_WRITE)):
            for fd in fds:
                sock = channel_socket(fd)
                if sock is not None:
                    wake.add(fd)
                    if sock._cosock_events(event):
                        out.add(fd)
        kr = [o for o, fd in zip(rl, fds_r, strict=True) if fd not in wake] + list(wake)
        kw = [o for o, fd in zip(wl, fds_w, strict=True) if fd not in wake]
        left = 0.0 if ring_r or ring_w else _remaining(deadline)
        r, w, x = _select(kr, kw, xl, left)
        kernel_r = {_fd(o) for o in r}
        kernel_w = {_fd(o) for o in w}
        for fd in kernel_r & wake:
            sock = channel_socket(fd)
            if sock is not None:
                sock._cosock_pump()
        woke = bool(kernel_r & wake)
        out_r = [
            o
            for o, fd in zip(rl, fds_r, strict=True)
            if fd in ring_r or (fd not in wake and fd in kernel_r)
        ]
        out_w = [
            o
            for o, fd in zip(wl, fds_w, strict=True)
            if fd in ring_w or (fd not in wake and fd in kernel_w)
        ]
        if out_r or out_w or x or not woke:
            return out_r, out_w, x
        # Only a channel's control frames woke us: they are consumed; look at the rings
        # again (a fallback to TCP makes the fd plain again) and wait out the timeout.


class CoPoll:
    """``select.poll()`` with accelerated CoSockets ready exactly when their rings are."""

    def __init__(self) -> None:
        self._inner = _poll()
        self._masks: dict[int, int] = {}
        self._kernel: dict[int, int] = {}

    def _kernel_mask(self, fd: int, mask: int) -> int:
        if channel_socket(fd) is None:
            return mask
        return (mask & ~_RING_MASK) | (select.POLLIN if mask & _RING_MASK else 0)

    def _sync(self, fd: int) -> None:
        want = self._kernel_mask(fd, self._masks[fd])
        if self._kernel.get(fd) != want:
            self._inner.register(fd, want)  # register() on a registered fd modifies it
            self._kernel[fd] = want

    def register(
        self, fd: Any, eventmask: int = select.POLLIN | select.POLLPRI | select.POLLOUT
    ) -> None:
        n = _fd(fd)
        self._masks[n] = eventmask
        self._kernel.pop(n, None)
        self._sync(n)

    def modify(self, fd: Any, eventmask: int) -> None:
        n = _fd(fd)
        if n not in self._masks:
            raise FileNotFoundError(2, "No such file or directory")
        self._masks[n] = eventmask
        self._sync(n)

    def unregister(self, fd: Any) -> None:
        n = _fd(fd)
        self._inner.unregister(n)  # KeyError if unknown, like the original
        del self._masks[n]
        self._kernel.pop(n, None)

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout / 1000
        while True:
            ready: dict[int, int] = {}
            for fd, mask in self._masks.items():
                self._sync(fd)
                sock = channel_socket(fd)
                if sock is not None:
                    wanted = (EVENT_READ if mask & select.POLLIN else 0) | (
                        EVENT_WRITE if mask & select.POLLOUT else 0
                    )
                    ev = sock._cosock_events(wanted) if wanted else 0
                    bits = (select.POLLIN if ev & EVENT_READ else 0) | (
                        select.POLLOUT if ev & EVENT_WRITE else 0
                    )
                    if bits:
                        ready[fd] = bits
            left = _remaining(deadline)
            wait = 0 if ready else (None if left is None else int(left * 1000 + 0.999))
            woke = False
            for fd, revents in self._inner.poll(wait):
                sock = channel_socket(fd)
                if sock is None:
                    ready[fd] = ready.get(fd, 0) | revents
                    continue
                sock._cosock_pump()
                woke = True
                extra = revents & _KERNEL_ONLY
                if extra:
                    ready[fd] = ready.get(fd, 0) | extra
            if ready or (left is not None and left <= 0) or (not woke and wait is not None):
                return list(ready.items())


def co_poll() -> CoPoll:
    return CoPoll()


_E_RING = select.EPOLLIN | select.EPOLLOUT
_E_MODE = select.EPOLLET | select.EPOLLONESHOT
_E_KERNEL_ONLY = select.EPOLLHUP | select.EPOLLERR


class CoEpoll:
    """``select.epoll`` with accelerated CoSockets ready exactly when their rings are."""

    def __init__(self, sizehint: int = -1, flags: int = 0, *, _inner: Any = None) -> None:
        self._inner = _epoll(sizehint, flags) if _inner is None else _inner
        self._masks: dict[int, int] = {}
        self._kernel: dict[int, int | None] = {}  # None: not registered with the kernel
        self._seen: dict[int, int] = {}  # EPOLLET: ring events reported and still ready
        self._spent: set[int] = set()  # EPOLLONESHOT fds that fired
        self._carry: dict[int, int] = {}  # found ready, cut off by maxevents: next time

    @classmethod
    def fromfd(cls, fd: int) -> CoEpoll:
        return cls(_inner=_epoll.fromfd(fd))

    @property
    def closed(self) -> bool:
        return bool(self._inner.closed)

    def fileno(self) -> int:
        return int(self._inner.fileno())

    def close(self) -> None:
        self._inner.close()

    def __enter__(self) -> CoEpoll:
        if self.closed:
            raise ValueError("I/O operation on closed epoll object")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kernel_mask(self, fd: int) -> int | None:
        mask = self._masks[fd]
        if channel_socket(fd) is None:
            return None if fd in self._spent else mask
        if fd in self._spent:
            return None
        # Wake-ups only: every control frame is an edge, and each is consumed (pumped).
        wake = select.EPOLLIN | select.EPOLLET if mask & _E_RING else select.EPOLLET
        return (mask & ~(_E_RING | _E_MODE)) | wake

    def _sync(self, fd: int, force: bool = False) -> None:
        want = self._kernel_mask(fd)
        have = self._kernel.get(fd)
        if want == have and not force:
            return
        if have is None:
            if want is not None:
                self._inner.register(fd, want)
        elif want is None:
            self._inner.unregister(fd)
        else:
            self._inner.modify(fd, want)  # also re-arms a kernel EPOLLONESHOT
        self._kernel[fd] = want

    def register(self, fd: Any, eventmask: int = _E_RING | select.EPOLLPRI) -> None:
        n = _fd(fd)
        if self.closed:
            raise ValueError("I/O operation on closed epoll object")
        if n in self._masks:
            raise FileExistsError(errno.EEXIST, "File exists")
        self._inner.register(n, eventmask)  # the kernel validates fd and mask
        self._masks[n] = eventmask
        self._kernel[n] = eventmask
        self._sync(n)

    def modify(self, fd: Any, eventmask: int) -> None:
        n = _fd(fd)
        if n not in self._masks:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        self._masks[n] = eventmask
        self._spent.discard(n)
        self._seen.pop(n, None)
        self._sync(n, force=True)

    def unregister(self, fd: Any) -> None:
        n = _fd(fd)
        if n not in self._masks:
            self._inner.unregister(n)  # raises as the original does
            return
        if self._kernel.get(n) is not None:
            self._inner.unregister(n)
        del self._masks[n]
        self._kernel.pop(n, None)
        self._seen.pop(n, None)
        self._spent.discard(n)

    def _carried(self) -> dict[int, int]:
        """Edges cut off by ``maxevents`` last time, if their fds are still ready."""
        ready: dict[int, int] = {}
        for fd, ev in self._carry.items():
            mask = self._masks.get(fd)
            if mask is None:
                continue
            sock = channel_socket(fd)
            if sock is not None:
                ev &= self._ring(mask, sock) | _E_KERNEL_ONLY
            else:
                probe = _poll()
                probe.register(fd, ev)
                now = probe.poll(0)
                ev &= now[0][1] if now else 0
            if ev:
                ready[fd] = ev
        self._carry.clear()
        return ready

    def _ring(self, mask: int, sock: Any) -> int:
        wanted = (EVENT_READ if mask & select.EPOLLIN else 0) | (
            EVENT_WRITE if mask & select.EPOLLOUT else 0
        )
        ev = sock._cosock_events(wanted) if wanted else 0
        return (select.EPOLLIN if ev & EVENT_READ else 0) | (
            select.EPOLLOUT if ev & EVENT_WRITE else 0
        )

    def poll(self, timeout: float | None = None, maxevents: int = -1) -> list[tuple[int, int]]:
        if self.closed:
            raise ValueError("I/O operation on closed epoll object")
        for fd in list(self._masks):
            self._sync(fd)  # a channel may have come or gone (fallback) since
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        rang: set[int] = set()  # ring fds whose control stream had news: an edge
        while True:
            ready = self._carried()
            for fd, mask in self._masks.items():
                sock = channel_socket(fd)
                if sock is None or fd in self._spent:
                    continue
                bits = self._ring(mask, sock)
                if mask & select.EPOLLET:
                    seen = self._seen.get(fd, 0)
                    self._seen[fd] = bits
                    if fd not in rang:
                        bits &= ~seen  # reported before and not seen unready since
                if bits:
                    ready[fd] = bits
            left = _remaining(deadline)
            wait = 0.0 if ready else (-1.0 if left is None else left)
            woke = False
            for fd, revents in self._inner.poll(wait, -1):
                if fd not in self._masks:
                    continue
                sock = channel_socket(fd)
                if sock is None:
                    ready[fd] = ready.get(fd, 0) | revents
                    continue
                sock._cosock_pump()
                woke = True
                rang.add(fd)
                if revents & _E_KERNEL_ONLY:
                    ready[fd] = ready.get(fd, 0) | (revents & _E_KERNEL_ONLY)
            if ready or not woke or (left is not None and left <= 0):
                events = list(ready.items())
                if maxevents > 0:
                    # Level-triggered ones come back by themselves; edges must not be lost.
                    rest = events[maxevents:]
                    self._carry = {fd: ev for fd, ev in rest if self._masks[fd] & select.EPOLLET}
                    events = events[:maxevents]
                for fd, _ in events:
                    if self._masks[fd] & select.EPOLLONESHOT:
                        self._spent.add(fd)
                        self._sync(fd)
                return events
