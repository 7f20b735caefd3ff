"""Transparent interception: make ``socket.socket`` a :class:`CoSocket`, and undo it exactly.

A gevent-style registry (first original wins, so patching twice is harmless) holds every
replaced attribute; :func:`disable` puts each one back.  ``socket.create_connection``,
``socket.create_server``, ``socket.socketpair`` and asyncio all look ``socket.socket`` up at
call time, so patching the one class covers them; ``socket.fromfd`` is wrapped so that the
fd of an accelerated connection gives a socket sharing its channel.  Code that did ``from
socket import socket`` before :func:`enable` keeps the original class (see
:func:`stale_references`).
``ssl.SSLContext.sslsocket_class`` (TLS over the CoSocket data path, ``_ssl``) and
``select.select``/``poll``/``epoll`` (ring-aware readiness, ``_select``) are replaced too,
and ``uvloop.Loop`` gets a guard that keeps CoSockets handed to libuv on plain TCP
(``_uvloop``; installed on uvloop's import if it comes later); ``multiprocessing`` gets a
reducer for CoSockets (``_mpreduce``, likewise).
"""

from __future__ import annotations

import gc
import os
import select
import selectors
import socket
import ssl
import stat
import threading
from typing import Any

from . import _mpreduce, _residency, _uvloop
from ._select import CoEpoll, co_poll, co_select
from ._selectors import REPLACEMENTS
from ._socket import CoSocket
from ._ssl import CoSSLSocket

_stdlib_fromfd = socket.fromfd


def co_fromfd(fd: int, family: int, type: int, proto: int = 0) -> socket.socket:
    """``socket.fromfd``, except for an fd of a connection this process accelerates: the
    new socket shares its channel (as ``dup()`` does) instead of being a plain socket on
    the control stream, whose sends would reach the peer as frames and reset it."""
    try:
        st = os.fstat(fd)
    except OSError:
        st = None
    if st is not None and stat.S_ISSOCK(st.st_mode):
        for sock in _residency._live():
            try:
                other = os.fstat(sock.fileno())
            except OSError:
                continue
            same = (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)
            if same and (sock.family, sock.type) == (family, type):
                twin = sock.dup()
                twin.settimeout(socket.getdefaulttimeout())  # as fromfd: a fresh socket's
                return twin
    return _stdlib_fromfd(fd, family, type, proto)


#: (module or class, attribute name) -> the original value.
_saved: dict[tuple[Any, str], Any] = {}
_lock = threading.RLock()
#: What ``enable()`` replaces: (module, attribute) -> replacement.
__implements__: tuple[tuple[Any, str, Any], ...] = (
    (socket, "socket", CoSocket),
    # fromfd of an accelerated connection's fd shares its channel.
    (socket, "fromfd", co_fromfd),
    # SSLContext.wrap_socket builds its sockets from this class attribute.
    (ssl.SSLContext, "sslsocket_class", CoSSLSocket),
    # Raw readiness calls answer for accelerated fds from the rings.
    (select, "select", co_select),
    (select, "poll", co_poll),
    (select, "epoll", CoEpoll),
    *((selectors, name, cls) for name, cls in REPLACEMENTS.items()),
)


def patch_item(module: Any, name: str, value: Any) -> None:
    """Replace ``module.name``, remembering the first original."""
    with _lock:
        _saved.setdefault((module, name), getattr(module, name))
        setattr(module, name, value)


def remove_item(module: Any, name: str) -> None:
    """Restore ``module.name`` to its original, if we replaced it."""
    with _lock:
        if (module, name) in _saved:
            setattr(module, name, _saved.pop((module, name)))


def get_original(module: Any, name: str) -> Any:
    """The attribute as it was before cosock touched it."""
    with _lock:
        return _saved.get((module, name), getattr(module, name))


def enable() -> None:
    """Route every new AF_INET/AF_INET6 stream socket of this process through cosock."""
    for module, name, value in __implements__:
        patch_item(module, name, value)
    # uvloop drives fds in C: CoSockets handed to it must stay plain (see _uvloop).
    _uvloop.install()
    # multiprocessing pickles sockets for other processes: CoSockets too (see _mpreduce).
    _mpreduce.install()


def disable() -> None:
    """Undo :func:`enable` exactly; open CoSockets keep working until closed."""
    with _lock:
        for module, name in list(_saved):
            remove_item(module, name)
        _uvloop.uninstall()
        _mpreduce.uninstall()


def enabled() -> bool:
    return socket.socket is CoSocket


def stale_references() -> list[str]:
    """Names bound to the original ``socket.socket`` elsewhere (imported before enable())."""
    original = get_original(socket, "socket")
    found = []
    for ref in gc.get_referrers(original):
        if isinstance(ref, dict) and ref is not socket.__dict__:
            for key, value in ref.items():
                if value is original and isinstance(key, str):
                    found.append(f"{ref.get('__name__', '?')}.{key}")
    return found
