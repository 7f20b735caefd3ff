"""Finish what a closed connection still owes its peer, in the background.

A plain ``close()`` returns at once and the kernel keeps sending what the socket queued.
A cosock connection can owe more than the kernel holds: bytes written before the verdict
(resent over TCP only if the peer REJECTs), bytes owed after a fallback, a path switch
whose resend lives in our memory.  ``close()`` hands such a connection to a thread here
(on a ``dup`` of its fd, so the application's fd is closed at once), which finishes the
work and then closes; the peer sees EOF only after the last owed byte, as with TCP.

At interpreter exit we wait (bounded) for these threads: the owed bytes live in this
process, unlike a kernel's send queue.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any, Final

log = logging.getLogger("cosock.linger")

#: How long a closed connection may take to hand over what it owes (a slow reader).
LINGER_S: Final = 60.0
#: How long interpreter exit waits for lingering connections, all together.
EXIT_WAIT_S: Final = 10.0

_threads: set[threading.Thread] = set()
_lock = threading.Lock()


def start(heir: Any) -> None:
    """Run ``heir._cosock_finish_owed`` on a thread of its own, then close ``heir``."""

    def run() -> None:
        try:
            heir._cosock_finish_owed(time.monotonic() + LINGER_S)
        except Exception:  # a lingering close must never raise into nowhere
            log.debug("lingering close failed", exc_info=True)
        finally:
            try:
                heir.close()
            finally:
                with _lock:
                    _threads.discard(threading.current_thread())

    thread = threading.Thread(target=run, name="cosock-linger", daemon=True)
    with _lock:
        _threads.add(thread)
    thread.start()


def pending() -> int:
    with _lock:
        return len(_threads)


def _wait_at_exit() -> None:
    end = time.monotonic() + EXIT_WAIT_S
    while True:
        with _lock:
            left = list(_threads)
        if not left:
            return
        for thread in left:
            thread.join(max(0.0, end - time.monotonic()))
        if time.monotonic() >= end:
            log.warning("%d closed connection(s) still owed bytes at exit", pending())
            return


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # the parent's lingering threads do not exist here
    _threads.clear()


atexit.register(_wait_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
