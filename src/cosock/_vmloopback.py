"""Inside a QEMU guest: loopback connections through the VM's own agent, the rest through
the host's VM gateway.

Two processes of one VM share a kernel, so their loopback connections can take the memfd
provider exactly as on a host (a fresh memfd per connection, passed with SCM_RIGHTS to the
listener's rendezvous socket; ``cosock run`` starts a per-user agent in the VM as it does on a
host). A memfd lives in guest RAM, so such a channel also survives a live migration untouched:
it never needs a switch, a slot or a gateway. Connections to other VMs keep the ivshmem
provider (``_vmchannel``). This object stands in for ``AgentClient`` in ``_socket`` and
``_residency`` and routes each question: the local agent first (its table is a pushed dict,
so asking costs no round trip), the gateway when the local agent knows no listener. The
residency watch judges by the gateway, as before: loopback connections are never judged.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from ._errors import AgentUnavailable
from ._rendezvous import Rendezvous
from ._vmagent import Key
from ._vmchannel import RENDEZVOUS_PREFIX, VmDirectory, VmListener


class VmWithLoopback:
    """``AgentClient``'s interface over a VM's local agent (``local``, may be down) and its
    gateway directory (``vm``)."""

    def __init__(self, local: Any, vm: VmDirectory) -> None:
        self.local = local
        self.vm = vm
        self._answered: Any = vm  # who answered the last lookup (its self guest counts)

    # The residency watch: as in any VM, the gateway's list decides; pushes from the
    # local agent concern only loopback connections, which are never judged.
    @property
    def available(self) -> bool:
        return self.vm.available

    @property
    def version(self) -> int:
        return self.vm.version

    def poll(self) -> None:
        self.vm.poll()

    def wait_fileno(self) -> int | None:
        return self.vm.wait_fileno()

    @property
    def self_guest(self) -> Any:
        """Ours per the gateway; per the VM's own agent while the gateway is unreachable
        (a loopback listener needs only that one: ``_socket`` asks before it registers)."""
        me = self.vm.self_guest
        if me is None and self._local_up():
            return self.local.self_guest
        return me

    @property
    def last_self_guest(self) -> Any:
        return self._answered.last_self_guest

    @property
    def rendezvous_dir(self) -> Path | None:
        found = self.vm.rendezvous_dir
        if found is None and self._local_up():
            return self.local.rendezvous_dir  # type: ignore[no-any-return]
        return found

    def _local_up(self) -> bool:
        try:
            return bool(self.local.available)
        except Exception:
            return False

    def lookup(self, ip: str, port: int) -> tuple[Any, str]:
        if self._local_up():
            listener, why = self.local.lookup(ip, port)
            if listener is not None:
                self._answered = self.local
                return listener, why
        self._answered = self.vm
        return self.vm.lookup(ip, port)

    def guest_owning(self, ip: str) -> Any:
        if self._local_up():
            guest = self.local.guest_owning(ip)
            if guest is not None:
                return guest
        return self.vm.guest_owning(ip)

    def gone_for_sure(self, ip: str) -> bool:
        return self.guest_owning(ip) is None and self.vm.gone_for_sure(ip)

    # Listeners: published to both, so loopback clients and other VMs' clients find them.
    def listener(self) -> BothListeners:
        local_rv = None
        if self._local_up():
            directory = self.local.rendezvous_dir
            if directory is not None and self.local.self_guest is not None:
                local_rv = Rendezvous(directory)
        return BothListeners(local_rv, self.vm.listener())

    def listen(self, addr: str, port: int, rendezvous: str = "") -> None:
        """Publish to the local agent (when ``rendezvous`` is a local socket) and to the
        gateway (unless on a loopback address, which no other VM can reach); published
        when either took it.

        Raises:
            AgentUnavailable: neither did (the gateway's reason).
        """
        local_ok = False
        if rendezvous and not rendezvous.startswith(RENDEZVOUS_PREFIX):
            try:
                self.local.listen(addr, port, rendezvous)
                local_ok = True
            except (AgentUnavailable, OSError):
                pass
        if local_ok and _is_loopback(addr):
            return
        try:
            self.vm.listen(addr, port)
        except AgentUnavailable:
            if not local_ok:
                raise

    def unlisten(self, addr: str, port: int) -> None:
        try:
            self.local.unlisten(addr, port)
        except (AgentUnavailable, OSError):
            pass
        self.vm.unlisten(addr, port)


class BothListeners:
    """A listener's rendezvous in a VM: the local memfd socket (if the VM's agent is up) and
    the gateway's stand-in. An accepted connection's offer is looked for locally first (it is
    already queued there: a local client sends its offer before it connects), then at the
    gateway (one round trip, as for any accept in a VM)."""

    def __init__(self, local: Rendezvous | None, vm: VmListener) -> None:
        self.local = local
        self.vm = vm
        self._owner = vm._owner
        #: What ``_socket`` checks a memfd offer's sender against (ours: one kernel).
        self.netns = local.netns if local is not None else vm.netns
        # The path published to the local agent; the gateway needs none.
        self.path: Any = local.path if local is not None else vm.path
        self.dropped = local.dropped if local is not None else vm.dropped

    def take(self, key: Key) -> Any:
        if self.local is not None:
            pending = self.local.take(key)
            if pending is not None:
                return pending
        return self.vm.take(key)

    def drain(self) -> None:
        if self.local is not None:
            self.local.drain()

    def hold(self) -> None:
        if self.local is not None:
            self.local.hold()

    def release(self) -> None:
        if self.local is not None:
            self.local.release()

    def close(self) -> None:
        if self.local is not None:
            self.local.close()


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


_combined: VmWithLoopback | None = None


def combined(local: Any, vm: VmDirectory) -> VmWithLoopback:
    """The process's router for this local client and gateway directory (one object while
    neither is replaced: ``_socket._agent()`` asks for it on every connect)."""
    global _combined
    c = _combined
    if c is None or c.local is not local or c.vm is not vm:
        c = _combined = VmWithLoopback(local, vm)
    return c
