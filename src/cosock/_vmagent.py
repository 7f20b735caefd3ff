"""Inside a QEMU guest: talk to the host agent's VM gateway (``agent/_vmgate.py``).

The guest proves who it is with the token its host passed through fw_cfg (readable by root in
the guest only); the gateway's address comes from ``COSOCK_VM_GATEWAY`` (``ADDR:PORT``, set by
the lab: the host's bridge address). Used by the ivshmem provider to get, claim and free slots.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from ._errors import AgentUnavailable, CosockError

ENV_GATEWAY = "COSOCK_VM_GATEWAY"
TOKEN_PATH = Path("/sys/firmware/qemu_fw_cfg/by_name/opt/cosock/token/raw")

Key = tuple[str, int, str, int]


class SlotRefused(CosockError):
    """The gateway refused a slot request (the connection stays on TCP)."""


def gateway_address() -> tuple[str, int]:
    raw = os.environ.get(ENV_GATEWAY, "")
    host, _, port = raw.rpartition(":")
    if not host or not port.isdigit():
        raise AgentUnavailable(f"{ENV_GATEWAY} is not set to ADDR:PORT (not a lab VM?)")
    return host, int(port)


def read_token(path: Path = TOKEN_PATH) -> str:
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
        try:
            self._sock = socket.create_connection(addr, timeout=timeout)
        except OSError as exc:
            raise AgentUnavailable(f"VM gateway {addr[0]}:{addr[1]}: {exc}") from None
        self._file = self._sock.makefile("rwb")
        hello = self._call({"op": "hello", "token": token if token is not None else read_token()})
        self.guest: str = hello["guest"]
        self.address: str = hello["address"]

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> VmAgent:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            self._file.write(json.dumps(req).encode() + b"\n")
            self._file.flush()
            line = self._file.readline(1 << 16)
        except OSError as exc:
            raise AgentUnavailable(f"VM gateway: {exc}") from None
        if not line:
            raise AgentUnavailable("VM gateway closed the connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise SlotRefused(str(reply.get("error")))
        return dict(reply)

    def guests(self) -> dict[str, str]:
        """The VMs of this host and their addresses: who is co-resident."""
        return dict(self._call({"op": "guests"})["guests"])

    def alloc_slot(self, key: Key) -> tuple[int, int]:
        """A formatted slot for our connection ``key`` (we are the client); (slot, generation)."""
        r = self._call({"op": "alloc_slot", "peer": key[2], "key": list(key)})
        return int(r["slot"]), int(r["generation"])

    def claim_slot(self, slot: int, generation: int, key: Key) -> None:
        """We are the server of ``key``: may we map ``slot``? Raises SlotRefused if not."""
        self._call({"op": "claim_slot", "slot": slot, "generation": generation, "key": list(key)})

    def free_slot(self, slot: int, generation: int) -> None:
        self._call({"op": "free_slot", "slot": slot, "generation": generation})
