"""Per-pair pools in the gateway without VMs: a pair's capacity grows by extra pools up to its
maximum, each extra pool is reaped on its own, a stopping gateway unplugs only the pools no
connection uses, and a new gateway unplugs what a crashed or stopped one left plugged.

A real gateway, real pool files and real guests' requests (``VmAgent`` over TCP); the QEMU side
is :class:`FakeQemu`, which keeps each VM's devices and memory backends by QOM id and refuses a
duplicate id as QEMU does (``Duplicate ID``). The same behaviour against real QEMU guests is in
test_vm_pairpool.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cosock._ivshmem import Pool
from cosock._vmagent import SlotRefused, VmAgent
from cosock.agent import _pairpool, _vmgate

A, B, C = "10.77.1.11", "10.77.1.12", "10.77.1.13"
NONCE = b"\x02" * 16
#: 1 MiB pools of 64 KiB rings: a few slots each, so that a pair fills its pools quickly.
SIZE, CAPACITY = 1 << 20, 64 << 10


class FakeQemu(_pairpool.Qmp):
    """The VMs' QEMUs as the gateway sees them through QMP: ids of devices and backends."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.devs: dict[Path, set[str]] = {}
        self.objs: dict[Path, set[str]] = {}
        self.files: dict[tuple[Path, str], Path] = {}  # (VM, backend) -> the file it maps
        self.calls: list[tuple[str, str, str]] = []  # (op, VM's QMP socket name, id)
        self.refuse: dict[Path, str] = {}  # VM -> QEMU's words refusing any hot-plug

    def plug(self, qmp: Path, pool: Path, size: int, obj: str, dev: str) -> None:
        with self.lock:
            if qmp in self.refuse:
                raise _pairpool.PlugError(f"object-add {obj}: {self.refuse[qmp]}")
            if obj in self.objs.setdefault(qmp, set()):
                raise _pairpool.PlugError(f"object-add {obj}: Duplicate ID '{obj}' for object")
            if dev in self.devs.setdefault(qmp, set()):
                raise _pairpool.PlugError(f"device_add {dev}: Duplicate ID '{dev}' for device")
            self.objs[qmp].add(obj)
            self.devs[qmp].add(dev)
            self.files[qmp, obj] = pool
            self.calls.append(("plug", qmp.name, dev))

    def unplug(self, qmp: Path, devs: set[str], objs: set[str], timeout: float = 1.0) -> None:
        with self.lock:
            for dev in devs & self.devs.get(qmp, set()):
                self.devs[qmp].discard(dev)
                self.calls.append(("unplug", qmp.name, dev))
            for obj in objs & self.objs.get(qmp, set()):
                self.objs[qmp].discard(obj)
                self.files.pop((qmp, obj), None)

    def ours(self, qmp: Path) -> tuple[set[str], dict[str, str]]:
        with self.lock:
            devs = {d for d in self.devs.get(qmp, set()) if d.startswith("cpaird-")}
            objs = {
                o: str(self.files.get((qmp, o), ""))
                for o in self.objs.get(qmp, set())
                if o.startswith("cpair-")
            }
            return devs, objs

    def plugged(self, qmp: Path) -> set[str]:
        with self.lock:
            return set(self.devs.get(qmp, set()))


class QmpSockets:
    """A QMP socket per VM speaking QEMU's protocol (greeting, negotiation, one command per
    JSON object) over a :class:`FakeQemu`'s ids, for an agent in another process, which
    reaches it with the real QMP client (``qemu.qmp``). A ``device_del`` is done at once (a
    guest acks it at once)."""

    def __init__(self, qemu: FakeQemu, paths: list[Path]) -> None:
        self.qemu = qemu
        self.stop = threading.Event()
        self.threads = []
        for path in paths:
            srv = socket.socket(socket.AF_UNIX)
            srv.bind(str(path))
            srv.listen()
            thread = threading.Thread(target=self._serve, args=(srv, path))
            thread.start()
            self.threads.append(thread)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)

    def _serve(self, srv: socket.socket, qmp: Path) -> None:
        with srv:
            while not self.stop.is_set():
                if select.select([srv], [], [], 0.1)[0]:
                    conn, _ = srv.accept()
                    with conn:
                        self._session(conn, qmp)

    def _session(self, conn: socket.socket, qmp: Path) -> None:
        version = {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}
        conn.sendall(json.dumps({"QMP": {"version": version, "capabilities": []}}).encode() + b"\n")
        buf, decoder = "", json.JSONDecoder()
        while not self.stop.is_set():  # the client sends JSON objects without separators
            if not select.select([conn], [], [], 0.1)[0]:
                continue
            data = conn.recv(65536)
            if not data:
                return
            buf += data.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break  # the rest of the object is still on its way
                buf = buf.lstrip()[end:]
                reply = self._execute(qmp, str(msg["execute"]), msg.get("arguments") or {})
                if "id" in msg:
                    reply["id"] = msg["id"]
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def _execute(self, qmp: Path, name: str, args: dict[str, Any]) -> dict[str, Any]:
        q = self.qemu
        with q.lock:
            devs, objs = q.devs.setdefault(qmp, set()), q.objs.setdefault(qmp, set())
            if name == "qmp_capabilities":
                return {"return": {}}
            if name == "object-add":
                objs.add(args["id"])
                q.files[qmp, args["id"]] = Path(args["mem-path"])
                return {"return": {}}
            if name == "device_add":
                devs.add(args["id"])
                q.calls.append(("plug", qmp.name, args["id"]))
                return {"return": {}}
            if name == "device_del":
                devs.discard(args["id"])
                q.calls.append(("unplug", qmp.name, args["id"]))
                return {"return": {}}
            if name == "object-del":
                objs.discard(args["id"])
                q.files.pop((qmp, args["id"]), None)
                return {"return": {}}
            if name == "query-pci":
                found = [
                    {"qdev_id": d, "id": {"device": _pairpool.IVSHMEM_DEVICE_ID}} for d in devs
                ]
                return {"return": [{"bus": 0, "devices": found}]}
            if name == "qom-list":
                return {"return": [{"name": o, "type": "child<memory-backend-file>"} for o in objs]}
            if name == "qom-get":
                return {"return": str(q.files.get((qmp, args["path"].rpartition("/")[2]), ""))}
        return {
            "error": {"class": "CommandNotFound", "desc": f"The command {name} has not been found"}
        }


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, FakeQemu, str]]:
    guests = tmp_path / "vm-guests.json"
    guests.write_text(
        json.dumps(
            {
                "guests": {
                    name: {"token": f"tok-{name}", "address": addr, "qmp": str(tmp_path / name)}
                    for name, addr in (("h1g1", A), ("h1g2", B), ("h1g3", C))
                }
            }
        )
    )
    for name in ("h1g1", "h1g2", "h1g3"):
        (tmp_path / name).touch()  # stands for the VM's QMP socket
    yield guests, FakeQemu(), str(tmp_path / "cosock-grow-")


def _start(guests: Path, qemu: FakeQemu, prefix: str, max_pools: int = 2) -> _vmgate.VmGateway:
    return _vmgate.start(
        ("127.0.0.1", 0),
        None,
        guests,
        pair_prefix=prefix,
        pair_size=SIZE,
        pair_max_pools=max_pools,
        qmp=qemu,
        capacity=CAPACITY,
    )


def _stop(gate: _vmgate.VmGateway) -> None:
    gate.shutdown()
    gate.server_close()


def _until(what: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not after {timeout} s: {what}"
        time.sleep(0.05)


def test_a_full_pair_gets_another_pool_up_to_its_maximum_then_tcp(
    setup: tuple[Path, FakeQemu, str],
) -> None:
    guests, qemu, prefix = setup
    qa, qb, qc = (guests.parent / g for g in ("h1g1", "h1g2", "h1g3"))
    gate = _start(guests, qemu, prefix, max_pools=2)
    try:
        addr = gate.server_address[:2]
        with VmAgent(addr, token="tok-h1g1") as a, VmAgent(addr, token="tok-h1g2") as b:
            b.listen(B, 8000)
            grants = []
            port = 40000
            while True:  # bounded by the refusal below: 2 pools of a few slots
                assert port < 40100
                key = (A, port, B, 8000)
                try:
                    slot, gen, _, pool = a.offer_in(key, NONCE)
                except SlotRefused as exc:
                    refusal = str(exc)
                    break
                got = b.claim_offer_in(key)
                assert (got[0], got[1], got[4]) == (slot, gen, pool)  # the same pool's grant
                grants.append((slot, gen, pool, key))
                port += 1
            pools = sorted({g[2] for g in grants}, key=[g[2] for g in grants].index)
            first = gate.pairs.of("h1g1", "h1g2") if gate.pairs else []
            per_pool = first[0].layout.slot_count
            assert len(pools) == 2 and len(grants) == 2 * per_pool, (pools, grants)
            assert refusal == (
                f"resource: all 2 pools of the pair h1g1-h1g2 are full ({2 * per_pool} channels)"
            )
            files = {Path(f"{prefix}h1g1-h1g2.ivshmem"), Path(f"{prefix}h1g1-h1g2.2.ivshmem")}
            assert set(Path(prefix).parent.glob("cosock-grow-*")) == files
            for path, pool in zip(sorted(files, key=lambda f: len(f.name)), pools, strict=True):
                with Pool(path) as p:  # the first file is the first pool, the .2 the second
                    assert p.identity() == (bytes.fromhex(pool), "h1g1-h1g2")
            # Two devices in A and in B, each named after the peer and its pool; none in C.
            tags = [p[:8] for p in pools]
            assert qemu.plugged(qa) == {f"cpaird-h1g2-{t}" for t in tags}
            assert qemu.plugged(qb) == {f"cpaird-h1g1-{t}" for t in tags}
            assert qemu.plugged(qc) == set()
            # The second pool's connections close: it is unplugged on its own, the first stays.
            for slot, gen, pool, _ in grants:
                if pool == pools[1]:
                    a.free_slot(slot, gen, pool)
                    b.free_slot(slot, gen, pool)
            _until(lambda: qemu.plugged(qa) == {f"cpaird-h1g2-{tags[0]}"}, 10)
            assert qemu.plugged(qb) == {f"cpaird-h1g1-{tags[0]}"}
            assert not Path(f"{prefix}h1g1-h1g2.2.ivshmem").exists()
            # A connection now gets a third pool (a new id) in the second's place.
            slot, gen, _, pool = a.offer_in((A, 41000, B, 8000), NONCE)
            assert pool not in pools
            assert Path(f"{prefix}h1g1-h1g2.2.ivshmem").exists()
            assert qemu.plugged(qa) == {f"cpaird-h1g2-{tags[0]}", f"cpaird-h1g2-{pool[:8]}"}
        _until(lambda: gate.grants_of("h1g1") == 0)  # the closed agents' slots are freed
    finally:
        _stop(gate)
    # The gateway going away removes every pool no connection uses: all of them here.
    assert qemu.plugged(qa) == qemu.plugged(qb) == set()
    assert list(Path(prefix).parent.glob("cosock-grow-*")) == []


def test_concurrent_connections_of_a_full_pair_make_one_extra_pool_not_many(
    setup: tuple[Path, FakeQemu, str],
) -> None:
    """A pool's worth of connections at once, one slot short: one more pool, not one each."""
    guests, qemu, prefix = setup
    gate = _start(guests, qemu, prefix, max_pools=4)
    assert gate.pairs is not None
    addr = gate.server_address[:2]
    agents: list[VmAgent] = []
    try:
        b = VmAgent(addr, token="tok-h1g2")
        agents.append(b)
        b.listen(B, 8000)
        first = VmAgent(addr, token="tok-h1g1")
        agents.append(first)
        results = [first.offer_in((A, 40000, B, 8000), NONCE)[3]]
        per_pool = gate.pairs.of("h1g1", "h1g2")[0].layout.slot_count
        clients = [VmAgent(addr, token="tok-h1g1") for _ in range(per_pool)]
        agents += clients  # each holds its grant while its gateway connection is open

        def connect(a: VmAgent, port: int) -> None:
            try:
                results.append(a.offer_in((A, port, B, 8000), NONCE)[3])
            except SlotRefused as exc:
                results.append(f"refused: {exc}")

        threads = [
            threading.Thread(target=connect, args=(a, 40001 + i)) for i, a in enumerate(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not [t for t in threads if t.is_alive()]
        # per_pool + 1 grants: the first pool full, one in a second pool; no third.
        assert not [r for r in results if r.startswith("refused")], results
        assert len(results) == per_pool + 1 and len(set(results)) == 2
        assert len(gate.pairs.of("h1g1", "h1g2")) == 2
    finally:
        for a in agents:
            a.close()
        _stop(gate)


@pytest.mark.parametrize("how", ["crash", "stop", "stop-marked"])
def test_a_new_gateway_unplugs_the_pools_an_old_one_left_once_unused_and_plugs_afresh(
    setup: tuple[Path, FakeQemu, str], how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first gateway goes away while a connection has its slot mapped: it 'crashes'
    (stops without removing its pools: the devices stay in the QEMUs and the file on disk,
    as after a SIGKILL), or it stops (``close``, as on SIGTERM) and leaves that pool plugged
    with its file because a slot of it is in use: granted in its table and marked mapped
    (``stop``), or only marked mapped, its gateway connections closed (``stop-marked``);
    an idle pool (A-C, its connection over) it unplugs and removes. The next gateway finds
    the devices by our id prefix, leaves devices that are not ours alone, gives the pair a
    new pool at once (new ids, another file), and unplugs the old pool only once its slot
    is marked released (``mark_use``, as the guests' library does on close), then removes
    its file."""
    from cosock._ivshmem import CLIENT, MAPPED, RELEASED, SERVER, mark_use

    monkeypatch.setattr(_pairpool, "LINGER_S", 600.0)  # only close() removes an idle pool
    guests, qemu, prefix = setup
    qa, qb, qc = (guests.parent / g for g in ("h1g1", "h1g2", "h1g3"))
    first_file, ac_file = Path(f"{prefix}h1g1-h1g2.ivshmem"), Path(f"{prefix}h1g1-h1g3.ivshmem")
    with contextlib.ExitStack() as cleanup:  # what is left open also when a check fails
        old = _start(guests, qemu, prefix)
        cleanup.callback(_stop, old)
        assert old.pairs is not None
        addr = old.server_address[:2]
        agents = cleanup.enter_context(contextlib.ExitStack())  # guests' connections to it
        a = agents.enter_context(VmAgent(addr, token="tok-h1g1"))
        b = agents.enter_context(VmAgent(addr, token="tok-h1g2"))
        b.listen(B, 8000)
        slot, gen, _, old_pool = a.offer_in((A, 40000, B, 8000), NONCE)
        assert b.claim_offer_in((A, 40000, B, 8000))[:2] == (slot, gen)
        c = agents.enter_context(VmAgent(addr, token="tok-h1g3"))
        c.listen(C, 8000)
        ac_slot, ac_gen, _, ac_pool = a.offer_in((A, 40002, C, 8000), NONCE)
        a.free_slot(ac_slot, ac_gen, ac_pool)  # A-C's connection is over: its pool idle
        assert qemu.plugged(qc) == {f"cpaird-h1g1-{ac_pool[:8]}"}
        with Pool(first_file) as p:  # both ends of the A-B connection map the slot
            live = p.map_slot(p.layout(), slot)
        cleanup.callback(live.close)
        mark_use(live, CLIENT, MAPPED)
        mark_use(live, SERVER, MAPPED)
        if how == "crash":
            for pair in old.pairs._all():
                pair.pool.close()  # a dead process's mappings go with it, its file stays
            old.pairs._closing.set()  # and its reaper stops; nothing is unplugged or removed
            old.pairs._reaper.join(5)
            old.pairs._pairs.clear()
        elif how == "stop-marked":  # the gateway connections end first: slots freed
            agents.close()
            _until(lambda: old.grants_of("h1g1") == old.grants_of("h1g2") == 0)
        _stop(old)
        agents.close()  # a gateway's connections end with its process
        tag = old_pool[:8]
        left = {f"cpaird-h1g2-{tag}"}, {f"cpaird-h1g1-{tag}"}
        assert (qemu.plugged(qa) - {f"cpaird-h1g3-{ac_pool[:8]}"}, qemu.plugged(qb)) == left
        assert first_file.exists()
        if how != "crash":  # the idle A-C pool is gone from both VMs, with its file
            assert qemu.plugged(qa) == left[0] and qemu.plugged(qc) == set()
            assert not ac_file.exists()
            with pytest.raises(_pairpool.PlugError, match="the gateway is stopping"):
                old.pairs.acquire("h1g2", "h1g3")  # a request still being served gets TCP
        qemu.devs[qa].add("pool")  # a device of someone else (the lab's shared pool's id)
        gate = _start(guests, qemu, prefix)
        cleanup.callback(_stop, gate)
        assert gate.pairs is not None
        addr = gate.server_address[:2]
        with VmAgent(addr, token="tok-h1g1") as a, VmAgent(addr, token="tok-h1g2") as b:
            b.listen(B, 8000)
            pool = a.offer_in((A, 40001, B, 8000), NONCE)[3]
            assert pool != old_pool
            assert f"cpaird-h1g2-{pool[:8]}" in qemu.plugged(qa)
            assert {"pool", f"cpaird-h1g2-{tag}"} <= qemu.plugged(qa)
            assert first_file.exists()  # the old pool's file: not reused, not removed
            with Pool(Path(f"{prefix}h1g1-h1g2.2.ivshmem")) as p:
                assert p.identity()[0].hex() == pool
            time.sleep(1.0)  # sweeps every 0.25 s: the old pool is in use, it stays
            assert f"cpaird-h1g2-{tag}" in qemu.plugged(qa)
            assert [x for x in gate.pairs.swept if tag in x] == []
            mark_use(live, CLIENT, RELEASED)
            time.sleep(0.6)
            assert f"cpaird-h1g2-{tag}" in qemu.plugged(qa)  # the server still has it
            mark_use(live, SERVER, RELEASED)
            live.close()
            _until(lambda: qemu.plugged(qa) == {"pool", f"cpaird-h1g2-{pool[:8]}"})
            _until(lambda: qemu.plugged(qb) == {f"cpaird-h1g1-{pool[:8]}"})
            _until(lambda: not first_file.exists())
            swept = [
                f"h1g1:cpair-h1g2-{tag}",
                f"h1g1:cpaird-h1g2-{tag}",
                f"h1g2:cpair-h1g1-{tag}",
                f"h1g2:cpaird-h1g1-{tag}",
            ]
            if how == "crash":  # the crashed gateway's idle A-C pool goes at once
                ac = ac_pool[:8]
                swept += [f"h1g1:cpair-h1g3-{ac}", f"h1g1:cpaird-h1g3-{ac}"]
                swept += [f"h1g3:cpair-h1g1-{ac}", f"h1g3:cpaird-h1g1-{ac}"]
            _until(lambda: sorted(gate.pairs.swept) == sorted(swept))  # type: ignore[union-attr]
            assert qemu.objs[qa] == {f"cpair-h1g2-{pool[:8]}"}
        _until(lambda: gate.grants_of("h1g1") == 0)
    assert qemu.plugged(qa) == {"pool"} and qemu.plugged(qb) == qemu.plugged(qc) == set()
    assert list(Path(prefix).parent.glob("cosock-grow-*")) == []


def test_a_stopped_agent_process_leaves_the_pool_in_use_plugged_and_removes_the_idle_one(
    tmp_path: Path,
) -> None:
    """``python -m cosock.agent`` with a per-pair VM gateway, SIGTERMed while A holds a
    connection to B through their pool (granted, both ends' slot marked mapped) and A's
    connection to C is over: it exits 0, and on the way unplugs and removes the A-C pool
    and leaves the A-B pool plugged into both VMs with its file, saying so. (Before, the
    agent exited without closing its gateway at all.) Its QEMUs are :class:`QmpSockets`."""
    from cosock._ivshmem import CLIENT, MAPPED, SERVER, mark_use

    short = Path(tempfile.mkdtemp(prefix="csq-", dir="/tmp"))  # Unix socket paths: 108 bytes
    qemu = FakeQemu()
    names = {"h1g1": A, "h1g2": B, "h1g3": C}
    qmps = {name: short / name for name in names}
    guests = tmp_path / "vm-guests.json"
    guests.write_text(
        json.dumps(
            {
                "guests": {
                    n: {"token": f"tok-{n}", "address": addr, "qmp": str(qmps[n])}
                    for n, addr in names.items()
                }
            }
        )
    )
    prefix = str(short / "cosock-stop-")
    with socket.socket() as probe:  # a free port for the gateway (bound again at once)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSOCK_")}
    argv = [sys.executable, "-m", "cosock.agent", "--socket", str(short / "agent.sock")]
    argv += ["--host", "h1", "--vm-gateway", f"127.0.0.1:{port}", "--vm-pair-pools", prefix]
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, short, ignore_errors=True)
        sockets = QmpSockets(qemu, list(qmps.values()))
        cleanup.callback(sockets.close)
        with open(log, "wb") as out:
            proc = subprocess.Popen([*argv, "--vm-guests", str(guests)], stderr=out, env=env)
        cleanup.callback(proc.wait)
        cleanup.callback(lambda: proc.poll() is None and proc.kill())
        addr = ("127.0.0.1", port)
        deadline = time.monotonic() + 20
        while True:  # the gateway listens before the agent's socket does
            try:
                a = cleanup.enter_context(VmAgent(addr, token="tok-h1g1"))
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        b = cleanup.enter_context(VmAgent(addr, token="tok-h1g2"))
        c = cleanup.enter_context(VmAgent(addr, token="tok-h1g3"))
        b.listen(B, 8000)
        c.listen(C, 8000)
        slot, gen, _, pool = a.offer_in((A, 40000, B, 8000), NONCE)
        assert b.claim_offer_in((A, 40000, B, 8000))[:2] == (slot, gen)
        ac_slot, ac_gen, _, ac_pool = a.offer_in((A, 40001, C, 8000), NONCE)
        a.free_slot(ac_slot, ac_gen, ac_pool)
        ab_file, ac_file = Path(f"{prefix}h1g1-h1g2.ivshmem"), Path(f"{prefix}h1g1-h1g3.ivshmem")
        with Pool(ab_file) as p:
            live = p.map_slot(p.layout(), slot)
        cleanup.callback(live.close)
        mark_use(live, CLIENT, MAPPED)
        mark_use(live, SERVER, MAPPED)
        qa, qb, qc = qmps.values()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        said = log.read_text()
        assert f"pair pool {ab_file.name} left plugged: 1 slot(s) in use" in said, said
        assert f"pair pool {ac_file.name} unplugged and removed" in said, said
        assert qemu.plugged(qa) == {f"cpaird-h1g2-{pool[:8]}"}
        assert qemu.plugged(qb) == {f"cpaird-h1g1-{pool[:8]}"}
        assert qemu.plugged(qc) == set() and qemu.objs[qc] == set()
        assert qemu.objs[qa] == {f"cpair-h1g2-{pool[:8]}"}
        assert ab_file.exists() and not ac_file.exists()
        with Pool(ab_file) as p:  # the connection's slot, as its ends left it
            assert p.slot_use(p.layout(), slot) == (MAPPED, MAPPED)


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("gone", r"its QMP socket .*/h1g2 is gone"),
        ("refused", r"object-add cpair-h1g1-[0-9a-f]{8}: Out of PCI slots"),
    ],
)
def test_a_refused_or_impossible_hot_plug_leaves_tcp_with_the_reason_and_nothing_behind(
    setup: tuple[Path, FakeQemu, str], how: str, words: str
) -> None:
    """B's QEMU refuses the hot-plug, or is gone (its QMP socket removed: the offer is refused
    at once, not after the QMP client's 10 s wait for a socket, which outlasts the guest's
    request): the half plugged into A is unplugged, no file is left, the reason is sent."""
    guests, qemu, prefix = setup
    if how == "gone":
        (guests.parent / "h1g2").unlink()
    else:
        qemu.refuse[guests.parent / "h1g2"] = "Out of PCI slots"
    gate = _start(guests, qemu, prefix)
    try:
        addr = gate.server_address[:2]
        with VmAgent(addr, token="tok-h1g1") as a, VmAgent(addr, token="tok-h1g2") as b:
            b.listen(B, 8000)
            with pytest.raises(
                SlotRefused,
                match=r"^resource: hot-plug of the h1g1-h1g2 pool: hot-plug into h1g2: " + words,
            ):
                a.offer((A, 40000, B, 8000), NONCE)
            assert a._call({"op": "grants"})["grants"] == 0
        assert [c[0] for c in qemu.calls] == ["plug", "unplug"]  # A's half, undone
        assert qemu.plugged(guests.parent / "h1g1") == set()
        assert list(Path(prefix).parent.glob("cosock-grow-*")) == []
    finally:
        _stop(gate)


def test_the_pools_per_pair_must_be_at_least_one(setup: tuple[Path, FakeQemu, str]) -> None:
    guests, qemu, prefix = setup
    with pytest.raises(ValueError, match="at least one pool, not 0"):
        _vmgate.VmGateway(
            ("127.0.0.1", 0), None, guests, pair_prefix=prefix, pair_max_pools=0, qmp=qemu
        )


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--vm-pair-max-pools", "0"], "", "--vm-pair-max-pools must be 1..8, not 0"),
        (["--vm-pair-max-pools", "9"], "", "--vm-pair-max-pools must be 1..8, not 9"),
        ([], "lots", "COSOCK_VM_PAIR_MAX_POOLS must be a whole number, not 'lots'"),
    ],
)
def test_the_agent_refuses_a_bad_maximum_with_a_reason(
    argv: list[str],
    env: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cosock.agent.__main__ import main

    monkeypatch.setenv("COSOCK_VM_PAIR_MAX_POOLS", env)
    with pytest.raises(SystemExit) as exit_:
        main(["--socket", "/nonexistent/x.sock", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
