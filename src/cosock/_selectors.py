"""Selectors that know about shared-memory channels.

The kernel sees only a CoSocket's TCP fd, which carries control frames, not data: bytes
left in a ring after a partial read, or written before the peer's verdict, make no fd
readable, and the TCP fd is writable even when the ring is full.  These selectors answer
readiness for accelerated sockets from the rings themselves and use the kernel only to
sleep: such a socket is registered for EVENT_READ, which every doorbell, SPACE, verdict
and EOF frame triggers; on a kernel event its control frames are consumed, then its
readiness is computed again.  Other file objects (plain sockets, pipes, timers, and
CoSockets on the TCP path) pass straight through to the wrapped kernel selector.

asyncio's selector loop and ``socketserver`` create ``selectors.DefaultSelector()`` at
run time, so ``cosock.enable()`` replacing the module attributes reaches them.

Before sleeping in the kernel, a selector spins on the rings of its readable channels
(flagging them ``spinning``, so the peer's writes ring no doorbell) for an adaptive
budget, as a blocking ``recv`` does: an event loop in a request/response exchange then
takes the peer's answer without a doorbell send, a wake-up and a doorbell read.  The
budget grows while answers come soon after the spin gave up and shrinks while the loop
idles, so an idle loop spins only ``COSOCK_SPIN_US`` per call.
"""

from __future__ import annotations

import os
import selectors
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from . import _config
from ._errors import RingCorrupted

if TYPE_CHECKING:
    from ._ring import RingReader
    from ._socket import CoSocket

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
#: Spin iterations between two looks at the kernel (and a sched_yield): a power of 2 - 1.
_YIELD_MASK: Final = int(os.environ.get("COSOCK_YIELD_MASK", "15"))

#: fd -> CoSocket with an attached channel.  asyncio registers bare fds, so the selector
#: must find the socket object from the number.
_channels: dict[int, weakref.ref[CoSocket]] = {}


def track(sock: CoSocket) -> None:
    _channels[sock.fileno()] = weakref.ref(sock)


def untrack(sock: CoSocket, fd: int) -> None:
    ref = _channels.get(fd)
    if ref is not None and ref() in (sock, None):
        del _channels[fd]


def channel_socket(fd: int) -> CoSocket | None:
    """The accelerated socket behind ``fd``, if it still has a channel."""
    ref = _channels.get(fd)
    sock = ref() if ref is not None else None
    if sock is None or sock._co is None or sock.fileno() != fd:
        return None
    return sock


def _fd_of(fileobj: Any) -> int:
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        try:
            fd = int(fileobj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"Invalid file object: {fileobj!r}") from None
    if fd < 0:
        raise ValueError(f"Invalid file descriptor: {fd}")
    return fd


class _Map(Mapping[Any, selectors.SelectorKey]):
    def __init__(self, keys: dict[int, selectors.SelectorKey]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, fileobj: Any) -> selectors.SelectorKey:
        try:
            return self._keys[_fd_of(fileobj)]
        except (KeyError, ValueError):
            raise KeyError(f"{fileobj!r} is not registered") from None

    def __iter__(self) -> Iterator[Any]:
        return iter(self._keys)


class CoSelector(selectors.BaseSelector):
    """Wraps one kernel selector (``_inner_cls``); see the module docstring."""

    _inner_cls: type[selectors.BaseSelector] = selectors.DefaultSelector

    def __init__(self) -> None:
        self._inner = self._inner_cls()
        self._keys: dict[int, selectors.SelectorKey] = {}
        self._kernel: dict[int, int] = {}  # fd -> events registered with the kernel
        self._map = _Map(self._keys)
        self._spin_min = _config.spin_ns()
        self._spin_max = _config.spin_max_ns()
        self._spin_ns = self._spin_min

    def _kernel_events(self, fd: int, events: int) -> int:
        sock = channel_socket(fd)
        if sock is None:
            return events
        # Frames queued for TCP (after a path switch) need the kernel's writability.
        return EVENT_READ | (EVENT_WRITE if sock._cosock_kernel_write() else 0)

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if not events or events & ~(EVENT_READ | EVENT_WRITE):
            raise ValueError(f"Invalid events: {events!r}")
        fd = _fd_of(fileobj)
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        key = selectors.SelectorKey(fileobj, fd, events, data)
        kernel = self._kernel_events(fd, events)
        self._inner.register(fd, kernel)
        self._keys[fd] = key
        self._kernel[fd] = kernel
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = _fd_of(fileobj)
        try:
            key = self._keys.pop(fd)
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        del self._kernel[fd]
        try:
            self._inner.unregister(fd)
        except (KeyError, OSError, ValueError):
            pass  # closed before unregister, as the stdlib selectors tolerate
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = _fd_of(fileobj)
        if fd not in self._keys:
            raise KeyError(f"{fileobj!r} is not registered")
        if not events or events & ~(EVENT_READ | EVENT_WRITE):
            raise ValueError(f"Invalid events: {events!r}")
        key = self._keys[fd]._replace(events=events, data=data)
        self._keys[fd] = key
        self._sync(fd, events)
        return key

    def _sync(self, fd: int, events: int) -> None:
        kernel = self._kernel_events(fd, events)
        if kernel != self._kernel[fd]:
            self._inner.modify(fd, kernel)
            self._kernel[fd] = kernel

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._ring_ready()
        spun = False
        if not ready and (timeout is None or timeout > 0) and self._spin_ns:
            spun = True
            if self._spin(timeout):
                ready = self._ring_ready()
        t0 = time.perf_counter_ns()
        kernel = self._inner.select(0 if ready else timeout)
        channel_woke = False
        for kkey, kevents in kernel:
            fd = kkey.fd
            mine = self._keys.get(fd)
            if mine is None:
                continue
            sock = channel_socket(fd)
            if sock is not None:
                sock._cosock_pump()
                events = sock._cosock_events(mine.events) if sock._co is not None else 0
                if sock._co is None:  # fell back while pumping: the kernel is right again
                    self._sync(fd, mine.events)
                    events = mine.events & (EVENT_READ | EVENT_WRITE)
                channel_woke = channel_woke or bool(events)
            else:
                events = kevents & mine.events
            if events:
                ready[fd] = ready.get(fd, 0) | events
        if spun and (channel_woke or not ready):
            self._adapt(time.perf_counter_ns() - t0, channel_woke)
        return [(self._keys[fd], ev) for fd, ev in ready.items() if fd in self._keys]

    def _ring_ready(self) -> dict[int, int]:
        ready: dict[int, int] = {}
        for fd, key in list(self._keys.items()):
            self._sync(fd, key.events)  # a channel may have fallen back to plain TCP
            sock = channel_socket(fd)
            if sock is not None:
                events = sock._cosock_events(key.events)
                if events:
                    ready[fd] = events
        return ready

    def _spin(self, timeout: float | None) -> bool:
        """Poll the rings of channels we wait to read, flagged ``spinning`` meanwhile, for
        up to the spin budget (never past ``timeout``).  True: a ring has bytes, or the
        kernel has an event for another file; look again."""
        readers: list[RingReader] = []
        for fd, key in self._keys.items():
            if key.events & EVENT_READ:
                sock = channel_socket(fd)
                rx = None if sock is None else sock._cosock_spin_reader()
                if rx is not None:
                    readers.append(rx)
        if not readers:
            return False
        budget = self._spin_ns
        if timeout is not None:
            budget = min(budget, int(timeout * 1e9))
        clock = time.perf_counter_ns
        end = clock() + budget
        spins = 0
        try:
            for rx in readers:
                rx.set_spinning(True)
            while clock() < end:
                for rx in readers:
                    if rx.available():
                        return True
                spins += 1
                if spins & _YIELD_MASK == 0:
                    if self._inner.select(0):
                        return True  # a plain fd, a timer, the loop's self-pipe
                    # On time-shared vCPUs the peer may wait for *our* CPU.
                    os.sched_yield()
            # A write published after our last look saw the flag and rang no doorbell:
            # look once more after clearing it (the clear is fenced; see RingReader.arm).
            for rx in readers:
                rx.set_spinning(False)
            return any(rx.available() for rx in readers)
        except RingCorrupted:
            return True  # the readiness pass reports it on the socket
        finally:
            for rx in readers:
                rx.set_spinning(False)

    def _adapt(self, slept_ns: int, channel_woke: bool) -> None:
        """Like an adaptive mutex: a channel that answered soon after we gave up spinning
        would have been caught by a longer spin; a long or idle sleep shrinks it back."""
        if channel_woke and slept_ns < self._spin_max:
            self._spin_ns = min(self._spin_ns * 2, self._spin_max)
        elif not channel_woke or slept_ns > 2 * self._spin_max:
            self._spin_ns = max(self._spin_ns // 2, self._spin_min)

    def close(self) -> None:
        self._keys.clear()
        self._kernel.clear()
        self._inner.close()

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._map

    def fileno(self) -> int:
        return int(self._inner.fileno()) if hasattr(self._inner, "fileno") else -1


def _make(name: str) -> type[CoSelector] | None:
    inner = getattr(selectors, name, None)
    if inner is None:
        return None
    return type(f"Co{name}", (CoSelector,), {"_inner_cls": inner, "__doc__": CoSelector.__doc__})


#: Replacements for the stdlib selector classes that exist on this platform.
REPLACEMENTS: dict[str, type[CoSelector]] = {
    name: cls
    for name in ("SelectSelector", "PollSelector", "EpollSelector", "DevpollSelector")
    if (cls := _make(name)) is not None
}
REPLACEMENTS["DefaultSelector"] = (
    REPLACEMENTS.get("EpollSelector") or REPLACEMENTS["SelectSelector"]
)
