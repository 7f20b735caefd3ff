"""One end of a channel between two QEMU guests, in a slot of the host's ivshmem pool.

Run inside a guest (``python tests/vm_ring_peer.py reader|writer ...``) by
test_lab_qemu.py: it maps the slot through the guest's own PCI BAR2 (``cosock._ivshmem``),
moves bytes with the project's ``RingWriter``/``RingReader``, and uses a TCP connection over
virtio-net only for wake-ups (one byte: B = data published, S = space freed, E = end), as the
BELL/SPACE frames of a cosock connection do.

    reader SLOT PORT            -> prints "<bytes> <sha256> <seconds>"
    writer SLOT HOST PORT NBYTES
"""

from __future__ import annotations

import hashlib
import socket
import sys
import time

from cosock._ivshmem import Pool, find_device
from cosock._ring import RingReader, RingWriter


def reader(slot: int, port: int) -> None:
    with Pool(find_device()) as pool:
        layout = pool.layout()
        mm = pool.map_slot(layout, slot)
        rx = RingReader(mm, 0, layout.capacity)
        buf = memoryview(bytearray(layout.capacity))
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", port))
        srv.listen()
        print("listening", flush=True)
        conn, _ = srv.accept()
        digest, total, ended, start = hashlib.sha256(), 0, False, 0.0
        while True:
            n = rx.available()
            if n:
                if not start:
                    start = time.perf_counter()
                rx.read_into(buf, n)
                digest.update(buf[:n])
                total += n
                conn.sendall(b"S")
                continue
            if ended:
                break
            got = conn.recv(4096)
            if not got or b"E" in got:
                ended = True  # drain once more: everything before E is published
        seconds = time.perf_counter() - start
        print(total, digest.hexdigest(), f"{seconds:.4f}", flush=True)
        conn.close()
        rx.release()
        mm.close()


def writer(slot: int, host: str, port: int, nbytes: int) -> None:
    data = memoryview(bytes(range(256)) * (nbytes // 256))
    with Pool(find_device()) as pool:
        layout = pool.layout()
        mm = pool.map_slot(layout, slot)
        tx = RingWriter(mm, 0, layout.capacity)
        for _ in range(200):
            try:
                conn = socket.create_connection((host, port), timeout=60)
                break
            except ConnectionRefusedError:
                time.sleep(0.1)
        start = time.perf_counter()
        done = 0
        while done < len(data):
            free = tx.free()
            if free == 0:
                if not conn.recv(4096):
                    raise ConnectionResetError("reader went away")
                continue
            done += tx.write(data[done:], free)
            conn.sendall(b"B")
        conn.sendall(b"E")
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):
            pass
        print(f"{time.perf_counter() - start:.4f}", flush=True)
        conn.close()
        tx.release()
        mm.close()


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "reader":
        reader(int(sys.argv[2]), int(sys.argv[3]))
    else:
        writer(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
