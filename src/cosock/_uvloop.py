"""uvloop guard: keep CoSockets that a program hands to uvloop on plain TCP.

uvloop (libuv) connects, accepts, reads and writes on raw fds, so a CoSocket's data path
and handshake never run there.  Its own sockets are harmless (they never meet the agent),
but it also takes socket objects made in Python, and under ``cosock.enable()`` those are
CoSockets:

- ``loop.sock_connect(sock, addr)`` calls ``sock.connect()``: on a CoSocket that offers a
  channel and sends the in-band HELLO, then libuv writes plain bytes on the fd (aiohttp's
  client on uvloop does this).  The guard connects a plain twin of the same fd instead,
  so the connection is plain TCP from its first byte.
- ``loop.create_server(sock=listener)``: ``listen()`` registered the CoSocket with the agent,
  but libuv accepts without ``CoSocket.accept``, so co-resident clients' offers would go
  unanswered and their HELLO would reach the application.  The guard withdraws the listener
  from the agent first: clients then choose TCP (``not-coresident``).

- ``loop.create_connection(sock=)`` (``asyncio.open_connection(sock=)``) and
  ``loop.connect_accepted_socket(factory, sock)`` with a CoSocket connected or accepted in
  Python: on a co-resident pair its bytes are in the rings, which libuv cannot read.  The
  guard downgrades it first (``CoSocket.cosock_downgrade``: both ends continue on plain
  TCP at exact offsets, the reason ``handed-over``), in an executor thread so that the
  loop keeps running while the peer answers.

:func:`install` patches ``uvloop.Loop`` (a Python subclass of the Cython loop, so the
methods can be set on it) now if uvloop is imported, else right after its import;
:func:`uninstall` undoes both exactly.
"""

from __future__ import annotations

import os
import socket
import threading
from types import ModuleType
from typing import Any

from ._downgrade import check_handed_over
from ._importhook import OnImport
from ._socket import CoSocket

_PlainSocket: type[socket.socket] = CoSocket.__mro__[1]  # socket.socket before any patching
_lock = threading.Lock()
#: Attribute name -> what ``uvloop.Loop.__dict__`` held before (None: it was inherited).
_saved: dict[str, Any] = {}
_patched: Any = None  # the uvloop.Loop class we patched


def _withdraw(sock: CoSocket) -> None:
    """Unregister a listening CoSocket from the agent (what its close() does), keeping it
    open: connections to it are plain TCP from now on."""
    registered = sock._rv
    if registered is None:
        return
    rv, addr, port = registered
    sock._rv = None
    if os.getpid() == rv._owner:
        try:
            from .agent.client import AgentClient

            client = AgentClient.current()
            if client is not None:
                client.unlisten(addr, port)
        except Exception:
            pass
    rv.release()


async def _hand_over(loop: Any, sock: CoSocket) -> None:
    """Make ``sock`` plain TCP before libuv takes its fd (see ``cosock._downgrade``)."""
    if sock._co is not None or sock._rxb is not None or sock._txb is not None:
        await loop.run_in_executor(None, sock.cosock_downgrade)
        check_handed_over(sock)


def _wrappers(base: Any) -> dict[str, Any]:
    orig_connect = base.sock_connect
    orig_server = base.create_server
    orig_create_connection = base.create_connection
    orig_accepted = base.connect_accepted_socket

    async def sock_connect(self: Any, sock: Any, address: Any) -> Any:
        if not isinstance(sock, CoSocket) or sock._co is not None:
            return await orig_connect(self, sock, address)
        twin = _PlainSocket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
        try:
            twin.setblocking(False)
            return await orig_connect(self, twin, address)
        finally:
            twin.detach()  # the fd stays the CoSocket's

    async def create_server(self: Any, *args: Any, **kwargs: Any) -> Any:
        sock = kwargs.get("sock")
        if isinstance(sock, CoSocket):
            _withdraw(sock)
        return await orig_server(self, *args, **kwargs)

    async def create_connection(self: Any, *args: Any, **kwargs: Any) -> Any:
        sock = kwargs.get("sock")
        if isinstance(sock, CoSocket):
            await _hand_over(self, sock)
        return await orig_create_connection(self, *args, **kwargs)

    async def connect_accepted_socket(
        self: Any, protocol_factory: Any, sock: Any, *args: Any, **kwargs: Any
    ) -> Any:
        if isinstance(sock, CoSocket):
            await _hand_over(self, sock)
        return await orig_accepted(self, protocol_factory, sock, *args, **kwargs)

    sock_connect.__doc__ = orig_connect.__doc__
    create_server.__doc__ = orig_server.__doc__
    create_connection.__doc__ = orig_create_connection.__doc__
    connect_accepted_socket.__doc__ = orig_accepted.__doc__
    return {
        "sock_connect": sock_connect,
        "create_server": create_server,
        "create_connection": create_connection,
        "connect_accepted_socket": connect_accepted_socket,
    }


def _patch(module: ModuleType) -> None:
    global _patched
    loop_cls = getattr(module, "Loop", None)
    if loop_cls is None:
        return
    with _lock:
        if _patched is not None:
            return
        for name, func in _wrappers(loop_cls).items():
            _saved[name] = loop_cls.__dict__.get(name)
            setattr(loop_cls, name, func)
        _patched = loop_cls


def _unpatch() -> None:
    global _patched
    with _lock:
        if _patched is None:
            return
        for name, value in _saved.items():
            if value is None:
                delattr(_patched, name)
            else:
                setattr(_patched, name, value)
        _saved.clear()
        _patched = None


_hook = OnImport("uvloop", _patch)


def install() -> None:
    """Guard uvloop now if it is imported, else as soon as it is."""
    _hook.install()


def uninstall() -> None:
    """Undo :func:`install` exactly."""
    _hook.uninstall()
    _unpatch()
