"""Inside a QEMU guest: talk to the host agent's VM gateway (``agent/_vmgate.py``).

The guest proves who it is with the token its host passed through fw_cfg (readable by root in
the guest only). The gateway's address (``ADDR:PORT``: the host's bridge address) comes from
fw_cfg too, read at every (re)connect: after a live migration the guest reads the fw_cfg of the
QEMU that runs it now, so it finds its new host's gateway even when the old host is gone;
``COSOCK_VM_GATEWAY`` (set by the lab at boot) is the fallback. Used by the ivshmem provider to
get, claim and free slots.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from ._errors import AgentUnavailable, CosockError

ENV_GATEWAY = "COSOCK_VM_GATEWAY"
#: Where the token is read from instead of fw_cfg (tests on the host: a 0600 file).
ENV_TOKEN_FILE = "COSOCK_VM_TOKEN_FILE"
TOKEN_PATH = Path("/sys/firmware/qemu_fw_cfg/by_name/opt/cosock/token/raw")
#: Where the current host's gateway is read instead of fw_cfg (tests on the host).
ENV_GATEWAY_FILE = "COSOCK_VM_GATEWAY_FILE"
GATEWAY_PATH = Path("/sys/firmware/qemu_fw_cfg/by_name/opt/cosock/gateway/raw")

Key = tuple[str, int, str, int]
#: Longest reply line read from the gateway.
MAX_REPLY = 1 << 16
#: File objects of gateway connections a forked child inherited (see VmAgent.abandon).
_ABANDONED: list[Any] = []
#: A watch with no push for this long is dead (the gateway repeats its list every 5 s).
WATCH_TIMEOUT_S = 15.0


class SlotRefused(CosockError):
    """The gateway refused a slot request (the connection stays on TCP)."""


class GatewayMoved(AgentUnavailable):
    """This VM migrated: the gateway it asked is its old host's, which names the new one
    (``address``) and hangs up. Callers that do not follow it see the gateway unavailable."""

    def __init__(self, message: str, address: tuple[str, int]) -> None:
        super().__init__(message)
        self.address = address


def parse_address(raw: str) -> tuple[str, int]:
    """``ADDR:PORT`` (the environment's or a gateway's redirect) as a socket address.

    Raises:
        AgentUnavailable: not ADDR:PORT.
    """
    host, _, port = raw.rpartition(":")
    if not host or not port.isdigit():
        raise AgentUnavailable(f"VM gateway address {raw!r} is not ADDR:PORT")
    return host.strip("[]"), int(port)


def gateway_address() -> tuple[str, int]:
    """The gateway of the host running this VM now (fw_cfg), else the boot-time one.

    Raises:
        AgentUnavailable: neither names ADDR:PORT.
    """
    path = Path(os.environ.get(ENV_GATEWAY_FILE) or GATEWAY_PATH)
    try:
        raw = path.read_text().strip()
    except OSError:
        raw = ""
    if raw:
        return parse_address(raw)
    try:
        return parse_address(os.environ.get(ENV_GATEWAY, ""))
    except AgentUnavailable:
        raise AgentUnavailable(f"{ENV_GATEWAY} is not set to ADDR:PORT (not a lab VM?)") from None


def read_token(path: Path | None = None) -> str:
    if path is None:
        path = Path(os.environ.get(ENV_TOKEN_FILE) or TOKEN_PATH)
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise AgentUnavailable(f"no VM token at {path} ({exc.strerror})") from None


class VmAgent:
    """One connection to the gateway; slots it obtained are freed by the gateway if it drops."""

    def __init__(
        self,
        address: tuple[str, int] | None = None,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        addr = address or gateway_address()
        self.gateway = addr
        self._lock = threading.Lock()  # one request at a time: replies come in order
        try:
            # The original socket class: under `cosock run` this process's socket.socket
            # is a CoSocket, which must not ask the gateway about the gateway connection.
            self._sock = _BaseSocket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
            self._sock.settimeout(timeout)
            self._sock.connect(addr)
        except OSError as exc:
            self._sock.close()
            raise AgentUnavailable(f"VM gateway {addr[0]}:{addr[1]}: {exc}") from None
        self._file = self._sock.makefile("rwb")
        try:
            hello = self._call(
                {"op": "hello", "token": token if token is not None else read_token()}
            )
        except BaseException:
            self.close()
            raise
        self.guest: str = hello["guest"]
        self.address: str = hello["address"]
        #: "shared" (one pool per host, plugged at boot) or "pair" (plugged per pair).
        self.pools: str = str(hello.get("pools") or "shared")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def abandon(self) -> None:
        """After fork, in the child: close this process's copy of the connection's fd without
        touching the file object. A parent's thread may have held its buffer lock at the
        fork (a watch always sits in ``readline``): closing it, or letting the collector
        close it, would wait for that lock forever (a ForkingMixIn child hung so in a VM)."""
        _ABANDONED.append(self._file)  # never collected, so never closed
        fd = self._sock.detach()
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> VmAgent:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            with self._lock:
                self._file.write(json.dumps(req).encode() + b"\n")
                self._file.flush()
                line = self._file.readline(MAX_REPLY)
        except (OSError, ValueError) as exc:  # ValueError: closed by another thread
            raise AgentUnavailable(f"VM gateway: {exc}") from None
        return self._reply(line)

    def _reply(self, line: bytes) -> dict[str, Any]:
        if not line:
            raise AgentUnavailable("VM gateway closed the connection")
        try:
            reply = json.loads(line)
        except ValueError:
            raise AgentUnavailable("VM gateway: a reply that is not JSON") from None
        if not isinstance(reply, dict):
            raise AgentUnavailable("VM gateway: a reply that is not an object")
        if not reply.get("ok"):
            if reply.get("moved"):
                self.close()  # the old gateway hangs up after saying so
                raise GatewayMoved(str(reply.get("error")), parse_address(str(reply["moved"])))
            if str(reply.get("error", "")).startswith("gone:"):
                self.close()
                raise AgentUnavailable(f"VM gateway: {reply['error']}")
            raise SlotRefused(str(reply.get("error")))
        return dict(reply)

    def guests(self) -> dict[str, str]:
        """The VMs of this host and their addresses: who is co-resident."""
        return dict(self._call({"op": "guests"})["guests"])

    def alloc_slot(self, key: Key) -> tuple[int, int]:
        """A formatted slot for our connection ``key`` (we are the client); (slot, generation)."""
        r = self._call({"op": "alloc_slot", "peer": key[2], "key": list(key)})
        return int(r["slot"]), int(r["generation"])

    def alloc_slot_in(self, key: Key) -> tuple[int, int, str]:
        """As :meth:`alloc_slot`, with the pool the slot is in (hex id; "" for the host's
        shared pool; see ``_ivshmem.find_device``)."""
        r = self._call({"op": "alloc_slot", "peer": key[2], "key": list(key)})
        return int(r["slot"]), int(r["generation"]), str(r.get("pool") or "")

    def claim_slot(self, slot: int, generation: int, key: Key, pool: str = "") -> None:
        """We are the server of ``key``: may we map ``slot``? Raises SlotRefused if not."""
        self._call(
            {
                "op": "claim_slot",
                "slot": slot,
                "generation": generation,
                "key": list(key),
                "pool": pool,
            }
        )

    def free_slot(self, slot: int, generation: int, pool: str = "") -> None:
        self._call({"op": "free_slot", "slot": slot, "generation": generation, "pool": pool})

    def census(self, doc: dict[str, Any] | None) -> None:
        """This process's census for the host's ``cosock status`` (None: nothing to list);
        it lasts as long as this connection. Raises SlotRefused if the gateway refuses it."""
        self._call({"op": "census", "census": doc})

    def watch(self) -> dict[str, str]:
        """Turn this connection into a watch: the gateway answers with the guest list (as
        :meth:`guests`) and pushes it again whenever it changes (:meth:`next_push`); no other
        request may be sent on it afterwards."""
        guests = dict(self._call({"op": "watch"})["guests"])
        # The gateway repeats the list every few seconds: silence this long means it (or
        # its host) is gone without a word, as after a migration away from a vanished host.
        self._sock.settimeout(WATCH_TIMEOUT_S)
        return guests

    def next_push(self) -> dict[str, str]:
        """Block until the gateway pushes the guest list again.

        Raises:
            AgentUnavailable: the connection closed (GatewayMoved: this VM migrated).
            SlotRefused: the gateway sent an error.
        """
        try:
            line = self._file.readline(MAX_REPLY)
        except (OSError, ValueError) as exc:
            raise AgentUnavailable(f"VM gateway watch: {exc}") from None
        return dict(self._reply(line)["guests"])

    #### CoSocket offers (see cosock._vmchannel)

    def listen(self, addr: str, port: int) -> None:
        """Publish a cosock listener of ours (until unlisten or this connection closes)."""
        self._call({"op": "listen", "addr": addr, "port": port})

    def unlisten(self, addr: str, port: int) -> None:
        self._call({"op": "unlisten", "addr": addr, "port": port})

    def offer(self, key: Key, nonce: bytes) -> tuple[int, int, int]:
        """A slot for our connection ``key`` to a listener on a co-resident VM; (slot,
        generation, capacity). Raises SlotRefused (reason first: "no-listener: ...")."""
        return self.offer_in(key, nonce)[:3]

    def offer_in(self, key: Key, nonce: bytes, upgrade: bool = False) -> tuple[int, int, int, str]:
        """As :meth:`offer`, with the pool the slot is in (hex pool id, "" if shared).
        ``upgrade``: for a live connection back on TCP (its listener may be closed)."""
        return self.offer_grant(key, nonce, upgrade)[:4]

    def offer_grant(
        self, key: Key, nonce: bytes, upgrade: bool = False
    ) -> tuple[int, int, int, str, int]:
        """As :meth:`offer_in`, with the grant's stamp (``_ivshmem.read_stamp``; 0 from a
        gateway without stamps)."""
        req: dict[str, Any] = {"op": "offer", "key": list(key), "nonce": nonce.hex()}
        if upgrade:
            req["upgrade"] = True
        r = self._call(req)
        return (
            int(r["slot"]),
            int(r["generation"]),
            int(r["capacity"]),
            str(r.get("pool") or ""),
            int(r.get("stamp") or 0),
        )

    def claim_offer(self, key: Key) -> tuple[int, int, bytes, int]:
        """We accepted ``key``: the slot its client was granted; (slot, generation, nonce,
        capacity). Raises SlotRefused if there is none."""
        return self.claim_offer_in(key)[:4]

    def claim_offer_in(self, key: Key) -> tuple[int, int, bytes, int, str]:
        """As :meth:`claim_offer`, with the pool the slot is in."""
        return self.claim_offer_grant(key)[:5]

    def claim_offer_grant(self, key: Key) -> tuple[int, int, bytes, int, str, int]:
        """As :meth:`claim_offer_in`, with the grant's stamp (0: none)."""
        r = self._call({"op": "claim_offer", "key": list(key)})
        return (
            int(r["slot"]),
            int(r["generation"]),
            bytes.fromhex(r["nonce"]),
            int(r["capacity"]),
            str(r.get("pool") or ""),
            int(r.get("stamp") or 0),
        )


#: The stdlib socket class, even if interception replaced ``socket.socket`` before this
#: module was imported (a CoSocket subclasses it).
_BaseSocket: type[socket.socket] = next(
    c for c in socket.socket.__mro__ if (c.__module__, c.__name__) == ("socket", "socket")
)
