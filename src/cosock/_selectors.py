"""Selectors that know about shared-memory channels.

The kernel sees only a CoSocket's TCP fd, which carries control frames, not data: bytes
left in a ring after a partial read, or written before the peer's verdict, make no fd
readable, and the TCP fd is writable even when the ring is full.  These selectors answer
readiness for accelerated sockets from the rings themselves and use the kernel only to
sleep: such a socket is registered for EVENT_READ, which every doorbell, SPACE, verdict
and EOF frame triggers; on a kernel event its control frames are consumed, then its
readiness is computed again (a wake-up that turns out to carry no readiness, a stale
doorbell, does not end the call early: it waits on until the caller's timeout).  Other
file objects (plain sockets, pipes, timers, and CoSockets on the TCP path) pass straight
through to the wrapped kernel selector.

asyncio's selector loop and ``socketserver`` create ``selectors.DefaultSelector()`` at
run time, so ``cosock.enable()`` replacing the module attributes reaches them.

Before sleeping in the kernel, a selector spins on the rings of its readable channels
(flagging them ``spinning``, so the peer's writes ring no doorbell) for about twice the
time its channels usually take to answer: an event loop in a request/response exchange
then takes the peer's answer without a doorbell send, a wake-up and a doorbell read.
When answers take longer than ``COSOCK_SPIN_MAX_US`` (an idle loop, a slow peer, a
loaded machine) it does not spin at all.
"""

from __future__ import annotations

import selectors
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from . import _config
from ._errors import RingCorrupted
from ._ring import CONTENDED_NS, YIELD_MASK, yield_cpu

if TYPE_CHECKING:
    from ._ring import RingReader
    from ._socket import CoSocket

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

#: fd -> CoSocket with an attached channel.  asyncio registers bare fds, so the selector
#: must find the socket object from the number.
_channels: dict[int, weakref.ref[CoSocket]] = {}
#: Bumped whenever a socket gets a channel: a selector then looks for it among its fds
#: (so that on every select() it visits only its channel fds, not every fd).
_generation = 0


def track(sock: CoSocket) -> None:
    global _generation
    _channels[sock.fileno()] = weakref.ref(sock)
    _generation += 1


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


def _disarm(rx: RingReader) -> None:
    """Let the peer ring again for a ring we no longer watch (if it is still mapped)."""
    try:
        rx.set_spinning(False)
    except ValueError:
        pass  # the channel was released: nobody waits on it


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
        #: Moving average of the time our channels take to answer (see ``_learn``).
        self._wait_ns = self._spin_min
        #: Rings flagged ``spinning`` while the loop runs between select() calls.
        self._awake: dict[int, RingReader] = {}
        #: Our fds that had a channel when last looked (see ``_channel_fds``).
        self._co_fds: set[int] = set()
        self._generation = -1

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
        if fd in _channels:
            self._co_fds.add(fd)
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = _fd_of(fileobj)
        try:
            key = self._keys.pop(fd)
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        del self._kernel[fd]
        self._co_fds.discard(fd)
        self._release(fd)
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
        if not events & EVENT_READ:
            self._release(fd)
        self._sync(fd, events)
        return key

    def _sync(self, fd: int, events: int) -> None:
        kernel = self._kernel_events(fd, events)
        if kernel != self._kernel[fd]:
            self._inner.modify(fd, kernel)
            self._kernel[fd] = kernel

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        sleepy = timeout is None or timeout > 0  # may sleep: arm the peers' wake-ups
        end = None  # perf_counter_ns() deadline, computed once a wake-up proved stale
        while True:
            ready, watched = self._ring_ready(sleepy)
            readers = [] if ready or not sleepy else list(watched.values())
            t0 = time.perf_counter_ns()
            answered = False  # a ring we wait on became readable during this call
            if readers and self._spin_ok() and self._spin(readers, timeout):
                ready, watched = self._ring_ready(True)
                answered = bool(ready)
            kernel = self._inner.select(0 if ready else timeout)
            stale = sleepy and bool(kernel)  # only frames that make nothing ready woke us
            for kkey, kevents in kernel:
                fd = kkey.fd
                mine = self._keys.get(fd)
                if mine is None:
                    stale = False
                    continue
                sock = channel_socket(fd) if fd in self._co_fds else None
                if sock is not None:
                    if not sock._cosock_pump():
                        stale = False  # nothing taken: sleeping again could spin on the fd
                    # Not armed: we return now, and the next select() arms before it sleeps.
                    events = sock._cosock_events(mine.events, False) if sock._co is not None else 0
                    if sock._co is None:  # fell back while pumping: the kernel is right again
                        self._sync(fd, mine.events)
                        events = mine.events & (EVENT_READ | EVENT_WRITE)
                    answered = answered or bool(events & EVENT_READ)
                else:
                    events = kevents & mine.events
                    stale = False
                if events:
                    ready[fd] = ready.get(fd, 0) | events
            if readers and (answered or not kernel):  # an answer, or nothing at all: learn
                self._learn(time.perf_counter_ns() - t0)
            if sleepy:
                self._stay_awake(watched)  # (without sleeping, the flags were left as they were)
            if ready or not stale:
                return [(self._keys[fd], ev) for fd, ev in ready.items() if fd in self._keys]
            # Only doorbells for bytes already read woke us (a writer that looked at the
            # spinning flag after we had taken its bytes and armed); their frames are
            # consumed now.  That is neither an answer nor the timeout: sleep on for what is
            # left, as co_select does.  (Returning [] looked like a timeout, with the
            # writer's next bytes landing in the ring just after:
            # test_a_stale_doorbell_does_not_end_select_early.)
            if timeout is not None:
                if end is None:
                    end = t0 + int(timeout * 1e9)
                timeout = (end - time.perf_counter_ns()) / 1e9
                if timeout <= 0:
                    return []

    def _channel_fds(self) -> set[int]:
        if self._generation != _generation:  # a socket got a channel: is it one of ours?
            self._generation = _generation
            self._co_fds.update(fd for fd in self._keys if fd in _channels)
        return self._co_fds

    def _ring_ready(self, arm: bool) -> tuple[dict[int, int], dict[int, RingReader]]:
        """Readiness of every channel from its rings (with ``arm``, arming the peer's
        wake-ups where there is nothing to read or no room), and the rings of channels we
        watch for reading."""
        ready: dict[int, int] = {}
        watched: dict[int, RingReader] = {}
        keys, kernel = self._keys, self._kernel
        for fd in list(self._channel_fds()):
            key = keys[fd]
            sock = channel_socket(fd)
            if sock is None:  # fell back to plain TCP (or closed): the kernel is right
                self._sync(fd, key.events)
                self._co_fds.discard(fd)
                continue
            # Frames queued for TCP (after a path switch) need the kernel's writability.
            want = EVENT_READ | (EVENT_WRITE if sock._cosock_kernel_write() else 0)
            if want != kernel[fd]:
                self._inner.modify(fd, want)
                kernel[fd] = want
            events = sock._cosock_events(key.events, arm)
            if events:
                ready[fd] = events
            if key.events & EVENT_READ:
                rx = sock._cosock_spin_reader()
                if rx is not None:
                    watched[fd] = rx
        return ready, watched

    def _stay_awake(self, watched: dict[int, RingReader]) -> None:
        """Flag the watched rings ``spinning`` until our next select() looks at them.

        Between two select() calls the event loop is running, not asleep, and every
        select() looks at the rings (and arms the doorbells, fenced) before it sleeps: so
        the peer need not ring for what it writes meanwhile.  That saves a doorbell's
        send, the wake-up and its read whenever bytes arrive while the loop is busy
        (pipelined and streaming traffic).  Rings we stop watching are armed again.
        """
        for fd, rx in self._awake.items():
            if fd not in watched:
                _disarm(rx)
        for fd, rx in watched.items():
            try:
                rx.set_spinning(True)
                sock = channel_socket(fd)
                if sock is None or sock._cosock_spin_reader() is not rx:
                    rx.set_spinning(False)  # a thread of ours went to sleep on it meanwhile
            except ValueError:
                pass  # released meanwhile (closed, or downgraded while we pumped): no ring
        self._awake = watched

    def _release(self, fd: int) -> None:
        rx = self._awake.pop(fd, None)
        if rx is not None:
            _disarm(rx)

    def _spin_ok(self) -> bool:
        """COSOCK_SPIN_US=0 turns spinning off; else spin while answers come quickly."""
        return self._spin_min > 0 and self._wait_ns <= self._spin_max

    def _spin(self, readers: list[RingReader], timeout: float | None) -> bool:
        """Poll ``readers``, flagged ``spinning`` meanwhile, for about twice the usual wait
        (never past ``timeout``).  True: a ring has bytes, or the kernel has an event for
        another file; look again."""
        budget = min(self._spin_max, max(self._spin_min, 2 * self._wait_ns))
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
                if spins & YIELD_MASK == 0:
                    if self._inner.select(0):
                        return True  # a plain fd, a timer, the loop's self-pipe
                    # On time-shared vCPUs the peer may wait for *our* CPU; if another
                    # task ran long, the CPUs are oversubscribed: sleep, and spin less.
                    # (A fixed cadence here, unlike _sleep's adaptive one: with the peer a
                    # thread of this process, yielding at every turn became a GIL ping-pong
                    # that gave up the spin more often under load -- test_selectors' spin
                    # test failed 1 run in 12 at load ~6, 0 in 12 with this cadence.)
                    if yield_cpu() > CONTENDED_NS:
                        self._learn(4 * self._spin_max)
                        break
        except (RingCorrupted, ValueError):
            # Corrupted: the readiness pass reports it on the socket.  Released (closed or
            # downgraded by another thread): the readiness pass finds the socket plain.
            return True
        finally:
            for rx in readers:
                _disarm(rx)
        # A write published after our last look saw the flag and rang no doorbell: look
        # once more now that it is cleared (the clear is fenced; see RingReader.arm).
        try:
            return any(rx.available() for rx in readers)
        except (RingCorrupted, ValueError):
            return True

    def _learn(self, waited_ns: int) -> None:
        """Moving average of how long our channels take to answer (capped, so a long idle
        spell is forgotten after a few quick answers).  Spinning pays only while that is
        short: on a loaded machine answers come late and the CPU is better left to the
        peer that has to produce them."""
        waited_ns = min(waited_ns, 4 * self._spin_max)
        self._wait_ns += (waited_ns - self._wait_ns) // 4

    def close(self) -> None:
        for fd in list(self._awake):
            self._release(fd)
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
