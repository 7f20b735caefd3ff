"""The stdlib socket class, whatever interception later does to ``socket.socket``.

The agent client runs inside intercepted processes; its Unix sockets must never go
through cosock's own ``socket.socket`` replacement, so it uses the class captured here.
"""

from __future__ import annotations

import socket


def _stdlib_socket_class() -> type[socket.socket]:
    # If cosock's subclass is already installed, the stdlib class is in its MRO.
    for cls in socket.socket.__mro__:
        if cls.__module__ == "socket" and cls.__name__ == "socket":
            return cls
    return socket.socket


PLAIN_SOCKET: type[socket.socket] = _stdlib_socket_class()
