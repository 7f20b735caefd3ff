"""The host agent's door for QEMU guests: JSON lines over TCP on the host's bridge address.

A VM cannot reach the agent's Unix socket (another kernel), and its source address proves
nothing (root in a VM can claim any IP on the bridge). So a VM speaks to this gateway on the
lab's own L2 segment (no route out of the lab) and proves who it is with the per-guest token the
host handed it through fw_cfg. The gateway hands out slots of the host's ivshmem pool for
connections between its VMs (``cosock._ivshmem.SlotTable``). See docs/vm-backend.md, 2-4.

Guests file (JSON, root-only, written by the lab): ``{"guests": {NAME: {"token", "address",
"leaving"?}}, "moved": {NAME: {"token", "gateway"}}}``, re-read when it changes; a guest marked
``leaving`` (about to migrate) is listed to nobody and sees no neighbours, so the residency
watches switch its connections to TCP. A guest that migrated away is ``moved``: every request
of its (still open) connections, and a new ``hello`` with its token, is answered ``{"ok":
false, "moved": "ADDR:PORT"}`` (its new host's gateway) and the connection is closed, so the
guest's library follows it (``cosock._vmchannel``); a guest that is neither here nor moved gets
``gone`` and is hung up on. Requests: ``hello {token}`` first, then ``guests``, ``alloc_slot
{peer, key}``, ``claim_slot {slot, generation, key}``, ``free_slot {slot, generation}``,
``grants`` (how many slots the caller's connections hold), ``watch`` (the connection
becomes a push channel: the guest list now and whenever it changes, ``cosock._vmwatch``),
``census {census}`` (the sending
process's connections for the host's ``cosock status``: ``agent/_vmcensus.py``); ``key`` is the
connection's 4-tuple ``[client ip, port, server ip, port]``.

Two pool modes. Shared: one pool file per host, every VM maps all of it (one tenant per host).
Per pair (``pair_prefix``; ``agent/_pairpool.py``): a grant names its pool (``"pool"``: the
pair's pool id, hex) and that pool is plugged into the two VMs of the connection only; requests
about a slot (``claim_slot``, ``free_slot``) then carry the same ``pool``. The guests file also
gives each VM's QMP socket (``"qmp"``), through which the pair pools are hot-plugged.

A ``CoSocket`` in a VM (``cosock._vmchannel``) uses the listener directory and offers:
``listen {addr, port}`` / ``unlisten {addr, port}`` (a listener lives as long as the gateway
connection that registered it), ``offer {key, nonce}`` (the client: a slot for its connection
to a registered listener of a VM of this host, the nonce kept with the grant) and ``claim_offer
{key}`` (the server, on accept: the grant for exactly that connection, with its nonce, which the
client's in-band HELLO must repeat).
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import select
import socket
import socketserver
import threading
import time
from pathlib import Path
from typing import Any

from .._errors import CosockError
from .._ivshmem import Pool, PoolError, SlotTable
from ._pairpool import MAX_POOLS, PairPool, PairPools, PlugError, Qmp
from ._vmcensus import VmCensus

log = logging.getLogger("cosock.agent.vm")

PORT = 7071
#: Size of a per-pair pool (a power of two: a PCI BAR): 7 channels of 1 MiB rings.
PAIR_POOL_SIZE = 16 << 20
#: How often a watch (``watch`` request) checks whether its guest list changed.
WATCH_PERIOD_S = 0.2
#: A watch gets its list again after this long without a change: the guest's sign that the
#: gateway is still there (a host that vanished sends no FIN; see ``_vmwatch``).
WATCH_KEEPALIVE_S = 5.0
#: Longest request line (a census report of 1000 connections is about 400 KB).
MAX_LINE = 1 << 20

Key = tuple[str, int, str, int]


class GatewayError(CosockError):
    """A request the gateway refuses (reason in the message, sent back to the guest)."""


class NotHere(GatewayError):
    """The guest no longer runs on this host: the reply says where it went (``moved``, its
    new host's gateway) or that it is ``gone``; the connection is closed after it."""

    def __init__(self, guest: str, gateway: str | None) -> None:
        super().__init__(
            f"moved: {guest} runs on the host of gateway {gateway} now"
            if gateway
            else f"gone: {guest} is not a VM of this host"
        )
        self.gateway = gateway


class _Guests:
    """The guests file, re-read when its mtime changes (a migration rewrites it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime = -1.0
        self._by_token: dict[str, tuple[str, str]] = {}
        #: Guests about to migrate away: no neighbours for them, no new slots with them.
        self.leaving: set[str] = set()
        #: Guests that left the file since the last :meth:`take_gone` (migrated, stopped).
        self._gone: set[str] = set()
        #: Guests that migrated to another host: token -> (guest, that host's gateway).
        self._moved: dict[str, tuple[str, str]] = {}
        #: Each VM's QMP socket (per-pair pools are hot-plugged through it).
        self._qmp: dict[str, Path] = {}

    def qmp_of(self, guest: str) -> Path | None:
        """The QMP socket of a VM running on this host (None: not here, or not given)."""
        self._reload()
        here = any(g == guest for g, _ in self._by_token.values())
        return self._qmp.get(guest) if here else None

    def names(self) -> set[str]:
        """The VMs running on this host now."""
        self._reload()
        return {g for g, _ in self._by_token.values()}

    def status_of(self, guest: str) -> str:
        """ "here", "leaving" or "gone" (not a VM of this host now)."""
        self._reload()
        if not any(g == guest for g, _ in self._by_token.values()):
            return "gone"
        return "leaving" if guest in self.leaving else "here"

    def take_gone(self) -> set[str]:
        """Guests that left since the last call and are still away: one that came back
        meanwhile (migrated away and home again before any request) may hold grants of its
        new stay already, which are not to be dropped (a migration waits until the leaving
        guest holds none, so it left none of its old stay behind)."""
        self._reload()
        here = {g for g, _ in self._by_token.values()}
        gone, self._gone = self._gone - here, set()
        return gone

    def lookup(self, token: str) -> tuple[str, str] | None:
        """(guest, address) for a token, compared in constant time."""
        self._reload()
        for known, who in self._by_token.items():
            if hmac.compare_digest(known, token):
                return who
        return None

    def moved(self, token: str) -> tuple[str, str] | None:
        """(guest, gateway ADDR:PORT) if the token's guest migrated to another host."""
        self._reload()
        for known, where in self._moved.items():
            if hmac.compare_digest(known, token):
                return where
        return None

    def owner_of(self, address: str) -> str | None:
        """The VM of this host with ``address``, unless it is leaving."""
        self._reload()
        return next(
            (g for g, a in self._by_token.values() if a == address and g not in self.leaving),
            None,
        )

    def addresses(self, viewer: str | None = None) -> dict[str, str]:
        """The VMs of this host and their addresses, as ``viewer`` may see them: a leaving
        VM has no neighbours, and nobody sees a leaving VM."""
        self._reload()
        if viewer is not None and viewer in self.leaving:
            return {}
        return {g: a for g, a in self._by_token.values() if g not in self.leaving}

    def listing(self) -> list[dict[str, Any]]:
        """Every VM of this host, leaving ones marked (the host's ``cosock status``)."""
        self._reload()
        return sorted(
            (
                {"name": g, "address": a, "leaving": g in self.leaving}
                for g, a in self._by_token.values()
            ),
            key=lambda x: str(x["name"]),
        )

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
            if mtime == self._mtime:
                return
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        before = {g for g, _ in self._by_token.values()}
        self._by_token = {
            str(rec["token"]): (str(name), str(rec["address"]))
            for name, rec in data.get("guests", {}).items()
            if isinstance(rec, dict) and rec.get("token")
        }
        self.leaving = {
            str(name)
            for name, rec in data.get("guests", {}).items()
            if isinstance(rec, dict) and rec.get("leaving")
        }
        self._qmp = {
            str(name): Path(str(rec["qmp"]))
            for name, rec in data.get("guests", {}).items()
            if isinstance(rec, dict) and rec.get("qmp")
        }
        self._moved = {
            str(rec["token"]): (str(name), str(rec.get("gateway", "")))
            for name, rec in data.get("moved", {}).items()
            if isinstance(rec, dict) and rec.get("token")
        }
        self._gone |= before - {g for g, _ in self._by_token.values()}
        self._mtime = mtime


class VmGateway(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        bind: tuple[str, int],
        pool_path: Path | None,
        guests_path: Path,
        pair_prefix: str | None = None,
        pair_size: int = PAIR_POOL_SIZE,
        capacity: int | None = None,
        pair_max_pools: int = MAX_POOLS,
        qmp: Qmp | None = None,
    ) -> None:
        """``pool_path``: the host's pool shared by all its VMs; or ``pair_prefix``: per-pair
        pools ``<prefix>A-B.ivshmem`` hot-plugged into A and B only, more of them
        (``A-B.2.ivshmem``, ...) while a pair's are full, up to ``pair_max_pools``
        (docs/vm-backend.md, 4). ``qmp``: how QEMU is asked (tests give their own)."""
        from .._config import ring_size

        if (pool_path is None) == (pair_prefix is None):
            raise ValueError("give either a shared pool or a per-pair pool prefix")
        self.guests = _Guests(guests_path)
        self.pool: Pool | None = None
        self.pairs: PairPools | None = None
        if pool_path is not None:
            self.pool = Pool(pool_path)
            self.layout = self.pool.layout()
        self.table = SlotTable(self.layout.slot_count if self.pool is not None else 0)
        if pair_prefix is not None:
            self.pairs = PairPools(
                pair_prefix,
                pair_size,
                capacity or ring_size(),
                self.guests.qmp_of,
                self.guests.status_of,
                qmp,
                pair_max_pools,
                self.guests.names,
            )
        self.lock = threading.Lock()
        #: (guest, addr, port) -> how many gateway connections registered that listener.
        self.listeners: dict[tuple[str, str, int], int] = {}
        #: The census reports of the VMs' processes (listed by the host agent).
        self.census = VmCensus()
        #: Requests served, by (guest, op) (``cosock status --json``: ``vm_requests``).
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        super().__init__(bind, _Handler, bind_and_activate=False)
        # FREEBIND: the agent may start before the lab gives the bridge its address.
        self.socket.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_FREEBIND", 15), 1)
        try:
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def server_close(self) -> None:
        super().server_close()
        if self.pool is not None:
            self.pool.close()
        if self.pairs is not None:
            self.pairs.close()

    #### Operations (called with the guest's identity established)

    def forget_gone(self) -> None:
        """Release every slot of a guest that left this host (its grants die with it)."""
        for guest in self.guests.take_gone():
            self.census.drop_guest(guest)
            with self.lock:
                dropped: list[Any] = self.table.drop_guest(guest)
                if self.pairs is not None:
                    dropped += self.pairs.drop_guest(guest)
            if dropped:
                log.info("guest %s left: slots %s released", guest, dropped)

    def alloc(self, guest: str, address: str, req: dict[str, Any]) -> dict[str, Any]:
        key = _key(req)
        if key[0] != address:
            raise GatewayError(f"client address {key[0]} is not {guest}'s")
        peer = self.guests.owner_of(str(req.get("peer", key[2])))
        if peer is None or key[2] != self.guests.addresses().get(peer):
            raise GatewayError(f"{key[2]} is not a VM of this host")
        if peer == guest and self.pairs is not None:
            raise GatewayError("a connection inside one VM has no slot")
        return self._grant(guest, peer, key, "")

    def _grant(self, guest: str, peer: str, key: Key, nonce: str) -> dict[str, Any]:
        """A formatted slot for ``guest``'s connection ``key`` to ``peer``: of the shared
        pool, or of the pair's own pool (made and hot-plugged into both on first use)."""
        if self.pairs is None:
            assert self.pool is not None
            avoid = self.pool.slots_in_use(self.layout)
            with self.lock:
                try:
                    slot, generation = self.table.alloc(guest, peer, key, nonce, avoid)
                except PoolError as exc:
                    raise GatewayError(f"resource: {exc}") from None
                stamp = self.table.stamp_of(slot)
            self.pool.format_slot(self.layout, slot, stamp)
            return {
                "slot": slot,
                "generation": generation,
                "capacity": self.layout.capacity,
                "pool": "",
                "stamp": stamp,
            }
        try:
            pair = self.pairs.acquire(guest, peer)
        except PlugError as exc:
            log.warning("pair pool %s-%s: %s", guest, peer, exc)
            raise GatewayError(f"resource: hot-plug of the {guest}-{peer} pool: {exc}") from None
        except PoolError as exc:  # the pair has its maximum of pools, all full
            raise GatewayError(f"resource: {exc}") from None
        try:
            avoid = pair.pool.slots_in_use(pair.layout)
            with self.lock:
                try:
                    slot, generation = pair.table.alloc(guest, peer, key, nonce, avoid)
                except PoolError as exc:
                    raise GatewayError(f"resource: {exc}") from None
                stamp = pair.table.stamp_of(slot)
            pair.idle_since = None
        finally:
            pair.lock.release()
        pair.pool.format_slot(pair.layout, slot, stamp)
        return {
            "slot": slot,
            "generation": generation,
            "capacity": pair.layout.capacity,
            "pool": pair.pool_id.hex(),
            "stamp": stamp,
        }

    def _table(self, pool: str) -> tuple[SlotTable, PairPool | None]:
        """The slot table a request's ``pool`` names ("" or absent: the shared pool)."""
        if not pool:
            return self.table, None
        try:
            pair = self.pairs.find(bytes.fromhex(pool)) if self.pairs is not None else None
        except ValueError:
            pair = None
        if pair is None:
            raise GatewayError(f"no such pool {pool[:32]!r}")
        return pair.table, pair

    def grants_of(self, guest: str) -> int:
        """Slots granted to connections of ``guest`` not given back yet (the lab waits for
        none before it unplugs a migrating VM's pool)."""
        with self.lock:
            shared = self.table.count_of(guest)
        return shared + (self.pairs.count_of(guest) if self.pairs is not None else 0)

    def listen(self, guest: str, address: str, req: dict[str, Any]) -> tuple[str, str, int]:
        addr, port = str(req.get("addr")), int(req["port"])
        if addr not in (address, *_WILDCARDS):
            raise GatewayError(f"{addr} is not {guest}'s address")
        if not 0 < port < 65536:
            raise GatewayError(f"port {port} outside 1..65535")
        entry = (guest, addr, port)
        with self.lock:
            self.listeners[entry] = self.listeners.get(entry, 0) + 1
        return entry

    def unlisten(self, entry: tuple[str, str, int]) -> None:
        with self.lock:
            left = self.listeners.get(entry, 0) - 1
            if left > 0:
                self.listeners[entry] = left
            else:
                self.listeners.pop(entry, None)

    def offer(self, guest: str, address: str, req: dict[str, Any]) -> dict[str, Any]:
        """A slot for the client's connection ``key`` to a cosock listener on another VM of
        this host, with the client's nonce (checked against the in-band HELLO).

        An ``upgrade`` (a live connection back on TCP asking for shared memory again) needs
        no listener: a server that accepted once and closed its listening socket still
        speaks cosock on the connection, and it claims the slot by the connection's key
        (``claim_offer``) or rejects the upgrade in-band. The peer must still be a VM of
        this host, and the slot limits still apply.
        """
        key = _key(req)
        nonce = str(req.get("nonce", ""))
        if len(nonce) != 32 or not all(c in "0123456789abcdef" for c in nonce):
            raise GatewayError("nonce must be 32 hex digits")
        if key[0] != address:
            raise GatewayError(f"client address {key[0]} is not {guest}'s")
        peer = self.guests.owner_of(key[2])
        if peer is None:
            raise GatewayError(f"not-coresident: {key[2]} is not a VM of this host")
        if peer == guest:
            raise GatewayError("not-coresident: a connection inside one VM has no slot")
        if guest in self.guests.leaving:
            raise GatewayError("not-coresident: this VM is leaving the host")
        with self.lock:
            if not req.get("upgrade") and not any(
                (peer, a, key[3]) in self.listeners for a in (key[2], *_WILDCARDS)
            ):
                raise GatewayError(f"no-listener: no cosock listener on {key[2]}:{key[3]}")
        return self._grant(guest, peer, key, nonce)

    def claim_offer(self, guest: str, address: str, req: dict[str, Any]) -> dict[str, Any]:
        key = _key(req)
        if key[2] != address:
            raise GatewayError(f"server address {key[2]} is not {guest}'s")
        client = self.guests.owner_of(key[0])
        pools = self.pairs.of(guest, client) if self.pairs and client else []
        pair: PairPool | None = None
        stamp = 0
        with self.lock:
            if self.pairs is None:
                found = self.table.claim_key(guest, key)
                stamp = self.table.stamp_of(found[0]) if found is not None else 0
            else:
                found = None
                for pair in pools:  # the grant is in one of the pair's pools
                    if (found := pair.table.claim_key(guest, key)) is not None:
                        stamp = pair.table.stamp_of(found[0])
                        break
        if found is None:
            raise GatewayError("no-offer: no grant for this connection")
        slot, generation, nonce = found
        return {
            "slot": slot,
            "generation": generation,
            "nonce": nonce,
            "capacity": self.layout.capacity if pair is None else pair.layout.capacity,
            "pool": "" if pair is None else pair.pool_id.hex(),
            "stamp": stamp,
        }

    def claim(self, guest: str, address: str, req: dict[str, Any]) -> dict[str, Any]:
        key = _key(req)
        if key[2] != address:
            raise GatewayError(f"server address {key[2]} is not {guest}'s")
        table, pair = self._table(str(req.get("pool") or ""))
        with self.lock:
            ok = table.claim(int(req["slot"]), int(req["generation"]), guest, key)
            stamp = table.stamp_of(int(req["slot"]))
        if not ok:
            raise GatewayError("no such grant for this connection")
        capacity = self.layout.capacity if pair is None else pair.layout.capacity
        return {"slot": int(req["slot"]), "capacity": capacity, "stamp": stamp}

    def free(self, guest: str, req: dict[str, Any]) -> dict[str, Any]:
        table, _ = self._table(str(req.get("pool") or ""))
        with self.lock:
            ok = table.free(int(req["slot"]), int(req["generation"]), guest)
        if not ok:
            raise GatewayError("no such grant")
        return {}


_WILDCARDS = ("0.0.0.0", "::")


def _held(req: dict[str, Any]) -> tuple[str, int, int]:
    return (str(req.get("pool") or ""), int(req["slot"]), int(req["generation"]))


def _key(req: dict[str, Any]) -> Key:
    raw = req.get("key")
    if not isinstance(raw, list) or len(raw) != 4:
        raise GatewayError("key must be [client ip, port, server ip, port]")
    return (str(raw[0]), int(raw[1]), str(raw[2]), int(raw[3]))


class _Handler(socketserver.StreamRequestHandler):
    server: VmGateway

    def _still_here(self, token: str, who: tuple[str, str]) -> None:
        """Raise NotHere once the guest of this connection left the host (a migration)."""
        guests = self.server.guests
        if guests.lookup(token) != who:
            moved = guests.moved(token)
            raise NotHere(who[0], moved[1] if moved is not None else None)

    def handle(self) -> None:
        who: tuple[str, str] | None = None
        token = ""
        held: set[tuple[str, int, int]] = set()  # (pool, slot, generation)
        listening: list[tuple[str, str, int]] = []
        try:
            while line := self.rfile.readline(MAX_LINE):
                if len(line) == MAX_LINE and not line.endswith(b"\n"):
                    self._send({"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                    return  # the rest of it cannot be told from a next request
                self.server.forget_gone()
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise GatewayError("request is not an object")
                    op = req.get("op")
                    if who is not None and op != "hello":
                        self._still_here(token, who)
                        self.server.requests[who[0], str(op)[:16]] += 1
                    if op == "hello":
                        token = str(req.get("token", ""))
                        who = self.server.guests.lookup(token)
                        if who is None:
                            moved = self.server.guests.moved(token)
                            if moved is not None:
                                raise NotHere(*moved)
                            raise GatewayError("bad token")
                        reply: dict[str, Any] = {
                            "guest": who[0],
                            "address": who[1],
                            "pools": "shared" if self.server.pairs is None else "pair",
                        }
                    elif who is None:
                        raise GatewayError("say hello with your token first")
                    elif op == "guests":
                        reply = {"guests": self.server.guests.addresses(who[0])}
                    elif op == "grants":
                        reply = {"grants": self.server.grants_of(who[0])}
                    elif op == "alloc_slot":
                        reply = self.server.alloc(who[0], who[1], req)
                        held.add((reply["pool"], reply["slot"], reply["generation"]))
                    elif op == "claim_slot":
                        reply = self.server.claim(who[0], who[1], req)
                        held.add(_held(req))
                    elif op == "offer":
                        reply = self.server.offer(who[0], who[1], req)
                        held.add((reply["pool"], reply["slot"], reply["generation"]))
                    elif op == "claim_offer":
                        reply = self.server.claim_offer(who[0], who[1], req)
                        held.add((reply["pool"], reply["slot"], reply["generation"]))
                    elif op == "listen":
                        listening.append(self.server.listen(who[0], who[1], req))
                        reply = {}
                    elif op == "unlisten":
                        entry = (who[0], str(req.get("addr")), int(req["port"]))
                        if entry in listening:
                            listening.remove(entry)
                            self.server.unlisten(entry)
                        reply = {}
                    elif op == "watch":
                        self._watch(token, who)
                        return
                    elif op == "census":
                        self.server.census.report(
                            id(self),
                            who[0],
                            who[1],
                            req.get("census"),
                            self.server.guests.addresses(),
                        )
                        reply = {}
                    elif op == "free_slot":
                        reply = self.server.free(who[0], req)
                        held.discard(_held(req))
                    else:
                        raise GatewayError(f"unknown op {op!r}")
                    self._send({"ok": True, **reply})
                except NotHere as exc:
                    self._send({"ok": False, "error": str(exc), "moved": exc.gateway})
                    return  # the finally below drops its listeners and slots here
                except (GatewayError, ValueError, KeyError, TypeError) as exc:
                    self._send({"ok": False, "error": str(exc) or type(exc).__name__})
        except OSError:
            pass
        finally:
            # A process that vanished frees what it held (as a closed channel would).
            self.server.census.drop(id(self))
            for entry in listening:
                self.server.unlisten(entry)
            if who is not None:
                for pool, slot, generation in held:
                    try:
                        table, _ = self.server._table(pool)
                    except GatewayError:
                        continue  # that pair's pool is gone already
                    with self.server.lock:
                        table.free(slot, generation, who[0])

    def _watch(self, token: str, who: tuple[str, str]) -> None:
        """This connection is a watch now: push the guest list as ``who`` sees it at once and
        whenever it changes (the guests file is checked every ``WATCH_PERIOD_S``: one
        ``stat``), and at least every ``WATCH_KEEPALIVE_S``; end with the redirect when the
        guest moves, and when the peer hangs up."""
        sent: dict[str, str] | None = None
        sent_at = 0.0
        while True:
            self._still_here(token, who)  # NotHere: the caller sends the redirect
            view = self.server.guests.addresses(who[0])
            now = time.monotonic()
            if view != sent or now - sent_at >= WATCH_KEEPALIVE_S:
                self._send({"ok": True, "guests": view})
                sent, sent_at = view, now
            ready, _, _ = select.select([self.connection], [], [], WATCH_PERIOD_S)
            if ready and not self.connection.recv(4096):
                return  # the guest closed its watch
            if self.server.socket.fileno() == -1:
                return  # the gateway is shutting down

    def _send(self, msg: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(msg).encode() + b"\n")


def start(
    bind: tuple[str, int],
    pool_path: Path | None,
    guests_path: Path,
    pair_prefix: str | None = None,
    pair_size: int = PAIR_POOL_SIZE,
    pair_max_pools: int = MAX_POOLS,
    qmp: Qmp | None = None,
    capacity: int | None = None,
) -> VmGateway:
    """Serve in a daemon thread; returns the server (``shutdown()`` + ``server_close()``).
    ``pool_path``: one pool shared by the host's VMs; ``pair_prefix``: per-pair pools."""
    gate = VmGateway(
        bind, pool_path, guests_path, pair_prefix, pair_size, capacity, pair_max_pools, qmp
    )
    threading.Thread(target=gate.serve_forever, name="cosock-vm-gateway", daemon=True).start()
    where = pool_path if pair_prefix is None else f"per pair: {pair_prefix}A-B.ivshmem"
    log.info("VM gateway on %s:%d, pool %s", *bind, where)
    return gate


def parse_bind(raw: str) -> tuple[str, int]:
    host, _, port = raw.rpartition(":")
    return host or "0.0.0.0", int(port or PORT)


__all__ = ["PORT", "GatewayError", "NotHere", "VmGateway", "parse_bind", "start"]
