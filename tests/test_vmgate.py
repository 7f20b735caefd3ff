"""The agent's VM gateway on loopback with a real pool file: tokens, slot grants, refusals.

The VM side of the same protocol runs in real guests in test_lab_qemu.py; here the identities
are tokens in a guests file, which is all the gateway ever sees of a VM.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cosock._errors import AgentUnavailable
from cosock._ivshmem import Pool
from cosock._vmagent import SlotRefused, VmAgent
from cosock.agent import _vmgate

A, B, C = "10.77.1.11", "10.77.1.12", "10.77.1.13"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[tuple[str, int], Path]]:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    pool = base / f"cosock-gw-test-{os.getpid()}-{id(tmp_path)}.ivshmem"
    with open(pool, "wb") as f:
        f.truncate(1 << 20)
    with Pool(pool) as p:
        p.format(64 << 10)
    guests = tmp_path / "vm-guests.json"
    guests.write_text(
        json.dumps(
            {
                "guests": {
                    "h1g1": {"token": "tok-a", "address": A},
                    "h1g2": {"token": "tok-b", "address": B},
                    "h1g3": {"token": "tok-c", "address": C},
                }
            }
        )
    )
    gate = _vmgate.start(("127.0.0.1", 0), pool, guests)
    try:
        yield gate.server_address[:2], pool
    finally:
        gate.shutdown()
        gate.server_close()
        pool.unlink()


def test_a_bad_token_is_refused(gateway: tuple[tuple[str, int], Path]) -> None:
    addr, _ = gateway
    with pytest.raises(SlotRefused, match="bad token"):
        VmAgent(addr, token="tok-x")
    with VmAgent(addr, token="tok-a") as a:
        assert (a.guest, a.address) == ("h1g1", A)
        assert a.guests() == {"h1g1": A, "h1g2": B, "h1g3": C}


def test_a_slot_goes_to_exactly_the_connection_it_was_granted_for(
    gateway: tuple[tuple[str, int], Path],
) -> None:
    addr, pool = gateway
    key = (A, 40000, B, 8000)
    with VmAgent(addr, token="tok-a") as a, VmAgent(addr, token="tok-b") as b:
        with VmAgent(addr, token="tok-c") as c:
            with pytest.raises(SlotRefused, match="not h1g1's"):
                a.alloc_slot((C, 40000, B, 8000))  # a client address that is not A's
            slot, gen = a.alloc_slot(key)
            with pytest.raises(SlotRefused, match="not h1g3's"):
                c.claim_slot(slot, gen, key)  # a third VM cannot claim it
            with pytest.raises(SlotRefused, match="no such grant"):
                b.claim_slot(slot, gen, (A, 40001, B, 8000))  # another connection
            b.claim_slot(slot, gen, key)
            with pytest.raises(SlotRefused):
                b.claim_slot(slot, gen, key)  # once only
        with Pool(pool) as p:
            assert p.slot_ok(p.layout(), slot)  # formatted by the gateway
        a.free_slot(slot, gen)
        b.free_slot(slot, gen)
        with pytest.raises(SlotRefused):
            a.free_slot(slot, gen)


def test_a_vanished_client_frees_its_slots(gateway: tuple[tuple[str, int], Path]) -> None:
    """Its slot is free again, and handed out last: the slot freed longest ago goes first,
    so a process that may still map a slot taken back meets a stranger's grant late."""
    addr, pool = gateway
    with Pool(pool) as p:
        count = p.layout().slot_count
    with VmAgent(addr, token="tok-a") as a:
        first = a.alloc_slot((A, 1, B, 2))
    with VmAgent(addr, token="tok-a") as a:
        # The handler thread frees on disconnect; it may lag a moment.
        for _ in range(100):  # bounded: 5 s for a loaded machine's handler thread
            if a._call({"op": "grants"})["grants"] == 0:
                break
            time.sleep(0.05)
        slots = [a.alloc_slot((A, 3 + i, B, 4))[0] for i in range(count)]
        assert sorted(slots) == list(range(count)) and slots[-1] == first[0]


def test_a_guest_that_leaves_the_host_loses_its_slots(
    gateway: tuple[tuple[str, int], Path], tmp_path: Path
) -> None:
    """The lab rewrites the guests file when a VM migrates away: it is done with its grants.
    The other party of one may not have noticed yet and still use the slot: it stays that
    party's until it frees it (or its connection drops), and only then is it free again."""
    addr, _ = gateway
    guests = tmp_path / "vm-guests.json"
    with VmAgent(addr, token="tok-a") as a:
        slot, gen = a.alloc_slot((A, 1, B, 2))
        data = json.loads(guests.read_text())
        del data["guests"]["h1g2"]
        guests.write_text(json.dumps(data))
        os.utime(guests, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))  # a new mtime
        with pytest.raises(SlotRefused, match="not a VM of this host"):
            a.alloc_slot((A, 3, B, 4))
        assert a._call({"op": "grants"})["grants"] == 1  # still h1g1's
        a.free_slot(slot, gen)
        assert a._call({"op": "grants"})["grants"] == 0
        with pytest.raises(SlotRefused, match="no such grant"):
            a.free_slot(slot, gen)  # free again


def test_a_guest_back_before_anyone_asked_is_not_taken_for_gone(tmp_path: Path) -> None:
    """The gateway drops a departed guest's grants on its next request; a VM that migrated
    away and back before any request came holds grants of its new stay by then, which must
    not be dropped as if it had just left (only one still away is)."""
    path = tmp_path / "vm-guests.json"
    both = {
        "guests": {
            "h1g1": {"token": "tok-a", "address": A},
            "h1g2": {"token": "tok-b", "address": B},
        }
    }
    stamp = time.time_ns()

    def write(doc: dict[str, Any]) -> None:
        nonlocal stamp
        stamp += 10**9
        path.write_text(json.dumps(doc))
        os.utime(path, ns=(stamp, stamp))  # a new mtime each time

    write(both)
    guests = _vmgate._Guests(path)
    assert guests.names() == {"h1g1", "h1g2"}
    write({"guests": {"h1g2": both["guests"]["h1g2"]}})
    assert guests.names() == {"h1g2"}  # h1g1 seen gone (the reaper's look, a watch's)
    write(both)
    assert guests.names() == {"h1g1", "h1g2"}  # and back
    assert guests.take_gone() == set()
    write({"guests": {"h1g1": both["guests"]["h1g1"]}})
    assert guests.take_gone() == {"h1g2"}
    assert guests.take_gone() == set()


def test_no_gateway_is_agent_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COSOCK_VM_GATEWAY", raising=False)
    with pytest.raises(AgentUnavailable, match="COSOCK_VM_GATEWAY"):
        VmAgent()


#### CoSocket offers (cosock._vmchannel): listener directory, offer with nonce, claim by key

NONCE = b"\x01" * 16


def test_listeners_only_on_the_guests_own_address_and_only_while_connected(
    gateway: tuple[tuple[str, int], Path],
) -> None:
    addr, _ = gateway
    with VmAgent(addr, token="tok-a") as a, VmAgent(addr, token="tok-b") as b:
        with pytest.raises(SlotRefused, match="not h1g2's address"):
            b.listen(A, 8000)  # another VM's address
        b.listen(B, 8000)
        b.listen("0.0.0.0", 8001)
        slot, gen, _cap = a.offer((A, 40000, B, 8000), NONCE)
        a.free_slot(slot, gen)
        a.offer((A, 40001, B, 8001), NONCE)  # the wildcard listener
        b.unlisten(B, 8000)
        with pytest.raises(SlotRefused, match="no-listener"):
            a.offer((A, 40002, B, 8000), NONCE)
    with VmAgent(addr, token="tok-a") as a:
        for _ in range(50):  # the handler thread drops b's listeners on disconnect
            try:
                a.offer((A, 40003, B, 8001), NONCE)
            except SlotRefused as exc:
                assert "no-listener" in str(exc)
                break
            time.sleep(0.05)
        else:
            pytest.fail("a listener outlived its gateway connection")


def test_an_upgrade_needs_no_listener_but_still_a_coresident_peer(
    gateway: tuple[tuple[str, int], Path],
) -> None:
    """A server that accepted once and closed its listening socket still speaks cosock on
    the connection: after a migration back, its client's upgrade must get a slot (it was
    refused with no-listener: the pair stayed on TCP for good), which the server claims by
    the connection's key. A first connect without a listener is still refused."""
    addr, _ = gateway
    with VmAgent(addr, token="tok-a") as a, VmAgent(addr, token="tok-b") as b:
        key = (A, 40000, B, 8000)
        with pytest.raises(SlotRefused, match="no-listener"):
            a.offer_in(key, NONCE)
        slot, gen, _cap, _pool = a.offer_in(key, NONCE, upgrade=True)
        assert b.claim_offer(key)[:3] == (slot, gen, NONCE)
        with pytest.raises(SlotRefused, match="not-coresident"):
            a.offer_in((A, 40001, "10.77.2.11", 8000), NONCE, upgrade=True)


def test_an_offer_is_for_the_clients_own_connection_to_another_vm(
    gateway: tuple[tuple[str, int], Path],
) -> None:
    addr, _ = gateway
    with VmAgent(addr, token="tok-a") as a, VmAgent(addr, token="tok-b") as b:
        b.listen(B, 8000)
        a.listen(A, 8000)
        with pytest.raises(SlotRefused, match="not h1g1's"):
            a.offer((C, 40000, B, 8000), NONCE)  # a client address that is not A's
        with pytest.raises(SlotRefused, match="not-coresident"):
            a.offer((A, 40000, "10.77.2.11", 8000), NONCE)  # not a VM of this host
        with pytest.raises(SlotRefused, match="not-coresident"):
            a.offer((A, 40000, A, 8000), NONCE)  # inside one VM: no slot
        with pytest.raises(SlotRefused, match="nonce"):
            a._call({"op": "offer", "key": [A, 40000, B, 8000], "nonce": "zz"})


def test_only_the_server_vm_claims_an_offer_for_exactly_its_connection_once(
    gateway: tuple[tuple[str, int], Path],
) -> None:
    addr, pool = gateway
    key = (A, 40000, B, 8000)
    with VmAgent(addr, token="tok-a") as a, VmAgent(addr, token="tok-b") as b:
        with VmAgent(addr, token="tok-c") as c:
            b.listen(B, 8000)
            slot, gen, cap = a.offer(key, NONCE)
            with pytest.raises(SlotRefused, match="not h1g3's"):
                c.claim_offer(key)  # a third VM
            with pytest.raises(SlotRefused, match="no-offer"):
                b.claim_offer((A, 40001, B, 8000))  # another connection
            assert b.claim_offer(key) == (slot, gen, NONCE, cap)
            with pytest.raises(SlotRefused, match="no-offer"):
                b.claim_offer(key)  # once
        with Pool(pool) as p:
            assert p.slot_ok(p.layout(), slot) and cap == p.layout().capacity
        a.free_slot(slot, gen)
        b.free_slot(slot, gen)
        with pytest.raises(SlotRefused, match="no such grant"):
            b.free_slot(slot, gen)


def test_a_leaving_vm_has_no_neighbours_and_nobody_sees_it(
    gateway: tuple[tuple[str, int], Path], tmp_path: Path
) -> None:
    """What the lab writes before it live-migrates a VM: the residency watches of both sides
    then judge their connections not co-resident (and switch them to TCP)."""
    addr, _ = gateway
    guests = tmp_path / "vm-guests.json"
    with VmAgent(addr, token="tok-a") as a, VmAgent(addr, token="tok-b") as b:
        b.listen(B, 8000)
        slot, gen, _ = a.offer((A, 40000, B, 8000), NONCE)
        assert a._call({"op": "grants"})["grants"] == 1
        data = json.loads(guests.read_text())
        data["guests"]["h1g1"]["leaving"] = True
        guests.write_text(json.dumps(data))
        os.utime(guests, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
        assert a.guests() == {}
        assert b.guests() == {"h1g2": B, "h1g3": C}
        with pytest.raises(SlotRefused, match="leaving"):
            a.offer((A, 40001, B, 8000), NONCE)
        a.free_slot(slot, gen)  # a leaving VM still gives its slots back
        assert a._call({"op": "grants"})["grants"] == 0


def test_a_migrated_guest_is_sent_to_its_new_gateway_and_hung_up_on(
    gateway: tuple[tuple[str, int], Path], tmp_path: Path
) -> None:
    """What the lab writes after a live migration: the guest is ``moved`` (with its new host's
    gateway). Its open connection's next request, and a new hello with its token, get the new
    address and are hung up on; its listeners here are dropped. A guest that is neither here
    nor moved is ``gone``."""
    from cosock._vmagent import GatewayMoved

    addr, _ = gateway
    guests = tmp_path / "vm-guests.json"
    with VmAgent(addr, token="tok-a") as a, VmAgent(addr, token="tok-b") as b:
        b.listen(B, 8000)
        a.offer((A, 40000, B, 8000), NONCE)  # the listener is there
        data = json.loads(guests.read_text())
        rec = data["guests"].pop("h1g2")
        data["moved"] = {"h1g2": {"token": rec["token"], "gateway": "10.77.2.1:7071"}}
        del data["guests"]["h1g3"]  # gone without a trace (stopped)
        guests.write_text(json.dumps(data))
        os.utime(guests, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
        with pytest.raises(GatewayMoved, match="moved: h1g2") as moved:
            b.guests()
        assert moved.value.address == ("10.77.2.1", 7071)
        with pytest.raises(AgentUnavailable):
            b.guests()  # hung up on
        with pytest.raises(SlotRefused, match="not-coresident"):
            a.offer((A, 40001, B, 8000), NONCE)  # not a VM of this host any more
        with pytest.raises(GatewayMoved) as again:
            VmAgent(addr, token="tok-b")
        assert again.value.address == ("10.77.2.1", 7071)
        with pytest.raises(SlotRefused, match="bad token"):
            VmAgent(addr, token="tok-c")
        assert a.guests() == {"h1g1": A}


def test_per_pair_mode_refuses_with_a_reason_when_the_pool_cannot_be_plugged(
    tmp_path: Path,
) -> None:
    """Per-pair pools: the gateway hot-plugs a pair's pool through the VMs' QMP sockets; a VM
    without one (here: the guests file gives none) cannot get it, so the offer is refused with
    the reason (the client stays on TCP, ``resource``) and no pool file is left behind."""
    guests = tmp_path / "vm-guests.json"
    guests.write_text(
        json.dumps(
            {
                "guests": {
                    "h1g1": {"token": "tok-a", "address": A},
                    "h1g2": {"token": "tok-b", "address": B},
                }
            }
        )
    )
    prefix = str(tmp_path / "cosock-gwp-")
    gate = _vmgate.start(("127.0.0.1", 0), None, guests, pair_prefix=prefix)
    try:
        addr = gate.server_address[:2]
        with VmAgent(addr, token="tok-a") as a, VmAgent(addr, token="tok-b") as b:
            assert a.pools == b.pools == "pair"
            b.listen(B, 8000)
            with pytest.raises(
                SlotRefused,
                match=r"^resource: hot-plug of the h1g1-h1g2 pool: h1g1 has no QMP socket",
            ):
                a.offer((A, 40000, B, 8000), NONCE)
            assert a._call({"op": "grants"})["grants"] == 0
        assert list(tmp_path.glob("cosock-gwp-*")) == []
    finally:
        gate.shutdown()
        gate.server_close()
    with pytest.raises(ValueError, match="either a shared pool or a per-pair"):
        _vmgate.VmGateway(("127.0.0.1", 0), None, guests)
