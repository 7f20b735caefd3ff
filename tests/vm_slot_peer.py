"""Run inside two QEMU guests by test_lab_qemu.py: a channel set up the way the ivshmem provider
will set it up, through the host agent's VM gateway.

The client opens a TCP connection, asks its agent for a slot for exactly that connection (its
token comes from fw_cfg), sends ``slot generation`` in-band on the TCP connection (the offer);
the server claims that slot for the same 4-tuple, maps it through its own BAR2, and both move
bytes with the project's rings (TCP only for wake-ups); both free the slot at the end.

    server PORT            -> JSON: bytes, sha256, forged claim refused
    client HOST PORT N     -> JSON: slot
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys

from cosock._ivshmem import Pool, find_device
from cosock._ring import RingReader, RingWriter
from cosock._vmagent import SlotRefused, VmAgent


def server(port: int) -> dict[str, object]:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen()
    print(json.dumps({"listening": port}), flush=True)
    conn, peer = srv.accept()
    me = conn.getsockname()
    key = (peer[0], peer[1], me[0], me[1])
    with VmAgent() as agent, Pool(find_device()) as pool, conn:
        offer = b""
        while not offer.endswith(b"\n"):
            offer += conn.recv(1)
        slot, generation = map(int, offer.split())
        try:  # the same slot for another connection must be refused
            agent.claim_slot(slot, generation, (peer[0], peer[1] + 1, me[0], me[1]))
            forged = "accepted"
        except SlotRefused:
            forged = "refused"
        agent.claim_slot(slot, generation, key)
        layout = pool.layout()
        mm = pool.map_slot(layout, slot)
        rx = RingReader(mm, 0, layout.capacity)
        buf = memoryview(bytearray(layout.capacity))
        digest, total, ended = hashlib.sha256(), 0, False
        conn.sendall(b"K")  # claimed: the client may write
        while True:
            n = rx.available()
            if n:
                rx.read_into(buf, n)
                digest.update(buf[:n])
                total += n
                if rx.space_wanted():
                    conn.sendall(b"S")
                continue
            if ended:
                break
            if rx.arm():
                continue
            got = conn.recv(4096)
            if not got or b"E" in got:
                ended = True
        conn.sendall(b"done")
        rx.release()
        mm.close()
        agent.free_slot(slot, generation)
        return {"bytes": total, "sha256": digest.hexdigest(), "forged_claim": forged}


def client(host: str, port: int, n: int) -> dict[str, object]:
    data = memoryview(bytes(range(256)) * (n // 256))
    with VmAgent() as agent, Pool(find_device()) as pool:
        conn = socket.create_connection((host, port), timeout=60)
        me, peer = conn.getsockname(), conn.getpeername()
        slot, generation = agent.alloc_slot((me[0], me[1], peer[0], peer[1]))
        conn.sendall(f"{slot} {generation}\n".encode())
        if conn.recv(1) != b"K":
            raise ConnectionResetError("server did not claim the slot")
        layout = pool.layout()
        mm = pool.map_slot(layout, slot)
        tx = RingWriter(mm, 0, layout.capacity)
        done = 0
        while done < n:
            free = tx.free() or tx.request_space()
            if not free:
                conn.recv(4096)
                continue
            old = tx.head
            done += tx.write(data[done:], free)
            if tx.needs_bell(old):
                conn.sendall(b"B")
        conn.sendall(b"E")
        tail = b""
        while b"done" not in tail:
            got = conn.recv(4096)
            if not got:
                break
            tail = tail[-8:] + got
        tx.release()
        mm.close()
        agent.free_slot(slot, generation)
        conn.close()
        return {"slot": slot, "guest": agent.guest}


if __name__ == "__main__":
    if sys.argv[1] == "server":
        out = server(int(sys.argv[2]))
    else:
        out = client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    print(json.dumps(out), flush=True)
