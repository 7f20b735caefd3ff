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
"""

from __future__ import annotations

import selectors
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._socket import CoSocket

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

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
        ready: dict[int, int] = {}
        for fd, key in list(self._keys.items()):
            self._sync(fd, key.events)  # a channel may have fallen back to plain TCP
            sock = channel_socket(fd)
            if sock is not None:
                events = sock._cosock_events(key.events)
                if events:
                    ready[fd] = events
        for kkey, kevents in self._inner.select(0 if ready else timeout):
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
            else:
                events = kevents & mine.events
            if events:
                ready[fd] = ready.get(fd, 0) | events
        return [(self._keys[fd], ev) for fd, ev in ready.items() if fd in self._keys]

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
