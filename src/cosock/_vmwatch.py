"""Inside a QEMU guest: the gateway pushes this VM's guest list instead of being asked.

Without it, the residency watch of every process with cosock connections or listeners asks
its gateway for the list once a second (``guests``), which under TCG costs each idle process
a round trip and its Python a second. With it, a process keeps one more gateway connection
turned into a *watch* (``watch`` request): the gateway sends the list at once and again only
when it changes (a VM came, left, is leaving, or this VM moved), and a daemon thread blocked
on that socket stores it and wakes the residency watch through an eventfd (``fileno``).
When the watch ends (the gateway closed it, said this VM moved, or is gone, or sent nothing for
15 s: it repeats the list every 5 s, so a host that vanished without a FIN is noticed too) the
directory goes back to asking, which follows the redirect or redials the gateway fw_cfg names,
and opens a new watch at the new gateway.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

from ._errors import AgentUnavailable
from ._vmagent import SlotRefused, VmAgent


class GuestWatch:
    """One watch connection and its reader thread.

    Raises (constructor):
        AgentUnavailable, SlotRefused: no gateway, or one that does not push (an older one).
    """

    def __init__(self, address: tuple[str, int]) -> None:
        self._agent = VmAgent(address, timeout=5.0)
        try:
            self._guests: dict[str, str] | None = self._agent.watch()
        except BaseException:
            self._agent.close()
            raise
        self.gateway = address
        #: Lists received (the residency watch re-judges when it changes).
        self.version = 1
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False
        self._thread = threading.Thread(target=self._read, name="cosock-vm-watch", daemon=True)
        self._thread.start()

    def current(self) -> dict[str, str] | None:
        """The last list pushed; None once the watch ended (ask the gateway instead)."""
        return self._guests

    def fileno(self) -> int:
        """Readable when a list came or the watch ended (:meth:`drain` resets it)."""
        return self._efd

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_read(self._efd)

    def _read(self) -> None:
        try:
            while True:
                guests = self._agent.next_push()
                if guests != self._guests:  # not the gateway's keepalive repeat
                    self._guests = guests
                    self.version += 1
                    self._wake()
        except (AgentUnavailable, SlotRefused, OSError):
            pass
        self._guests = None
        self.version += 1
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            if not self._closed:
                os.eventfd_write(self._efd, 1)

    def close(self) -> None:
        """End the watch: its thread returns and the eventfd is closed."""
        if self._closed:
            return
        with contextlib.suppress(OSError):
            self._agent._sock.shutdown(socket.SHUT_RDWR)  # the reader's readline returns
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self._closed = True
        self._agent.close()
        os.close(self._efd)

    def forget(self) -> None:
        """After fork, in the child: the parent's watch is the parent's; never shut its
        socket down (that would end the parent's too), only drop this process's fds."""
        self._closed = True
        self._guests = None
        self._agent.abandon()  # not shutdown(): the parent's socket stays open
        with contextlib.suppress(OSError):
            os.close(self._efd)


__all__ = ["GuestWatch"]
