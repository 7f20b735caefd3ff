"""multiprocessing guard: CoSockets can be pickled for another process, as sockets can.

``multiprocessing.reduction`` registers its socket reducer (which sends a duplicate of
the fd) for the class ``socket.socket`` names when it is imported.  Imported before
``cosock.enable()``, that is the stdlib class, and a CoSocket given to a spawned
``Process``, a ``Pool`` or a ``Queue`` failed with "cannot pickle 'CoSocket' object".
Registered here for ``CoSocket`` too, with one step first: an accelerated connection is
downgraded (``cosock._downgrade``), because the receiving process has no channel and its
fd carries control frames; both processes then share plain TCP.

:func:`install` registers now if ``multiprocessing.reduction`` is imported, else right
after its import (a ``sys.meta_path`` hook); :func:`uninstall` undoes both exactly.
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType
from typing import Any

from ._downgrade import check_handed_over
from ._importhook import OnImport
from ._socket import CoSocket

_MODULE = "multiprocessing.reduction"
_lock = threading.Lock()
_registered: Any = None  # the ForkingPickler class we registered with
_saved: Any = None  # what its registry held for CoSocket before


def _reduce(sock: CoSocket) -> Any:
    if sock._co is not None or sock._rxb is not None or sock._txb is not None:
        sock.cosock_downgrade()
        check_handed_over(sock)
    reduce_socket = sys.modules[_MODULE]._reduce_socket
    return reduce_socket(sock)


def _register(module: ModuleType) -> None:
    global _registered, _saved
    pickler = getattr(module, "ForkingPickler", None)
    if pickler is None or not hasattr(module, "_reduce_socket"):
        return
    with _lock:
        if _registered is not None:
            return
        _saved = pickler._extra_reducers.get(CoSocket)
        pickler.register(CoSocket, _reduce)
        _registered = pickler


def _unregister() -> None:
    global _registered, _saved
    with _lock:
        if _registered is None:
            return
        if _saved is None:
            _registered._extra_reducers.pop(CoSocket, None)
        else:
            _registered._extra_reducers[CoSocket] = _saved
        _registered = _saved = None


_hook = OnImport(_MODULE, _register)


def install() -> None:
    _hook.install()


def uninstall() -> None:
    _hook.uninstall()
    _unregister()
