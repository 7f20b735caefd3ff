"""Workload peers that run *inside* QEMU guests: TCP over virtio-net vs rings in ivshmem.

``python -m``-free on purpose (run as a script path with the package on PYTHONPATH), and it
imports only ``cosock._ivshmem``/``cosock._ring``: under TCG every imported module costs.

Ring mode maps one slot of the pool through the guest's BAR2 (``cosock._ivshmem``) and moves
bytes with the project's ``RingWriter``/``RingReader``; a TCP connection over virtio-net carries
only wake-ups, one byte each (B = data published, S = space freed, E = end), sent only when
the ring's doorbell protocol says the peer sleeps, as the BELL and SPACE frames of a cosock
connection are. RR in ring mode spins (both VMs have their own vCPU).

    server tcp|ring|cosock stream|rr PORT [SLOT] [N]       -> one JSON line when done
    client tcp|ring|cosock stream|rr HOST PORT N [SLOT]    -> one JSON line when done

Cosock mode is the TCP peer's very code with ``cosock.enable()`` first: its sockets are
``CoSocket``s, which inside a lab VM take a slot of the pool through the host agent's VM
gateway (``cosock._vmchannel``); the report says which path the connection took.
TCP and cosock clients open one warm-up connection first (the server accepts it and reads its
EOF). Stream: N bytes, checked with sha256 by the server; blast: the same, only counted (a sha256
under TCG is slower than either transport). RR: N round trips of 64 bytes.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import time
from typing import Any

from cosock._ivshmem import Pool, find_device
from cosock._ring import RingReader, RingWriter

RR_SIZE = 64
SPIN_LIMIT = 120.0
#: Spin this long before sleeping on the TCP wake-up (the doorbell protocol of ``_ring``).
SPIN = 0.0005


def _pattern(n: int) -> memoryview:
    return memoryview(bytes(range(256)) * (n // 256) + bytes(range(n % 256)))


def _listen(port: int) -> socket.socket:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen()
    print(json.dumps({"listening": port}), flush=True)
    return srv


def _connect(host: str, port: int) -> socket.socket:
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=60)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _slot(slot: int) -> tuple[Any, Any, int]:
    pool = Pool(find_device())
    layout = pool.layout()
    return pool, pool.map_slot(layout, slot), layout.capacity


def _path(conn: socket.socket) -> dict[str, Any]:
    """Which path the connection took (``tcp`` for a plain socket) and why not shm."""
    why = getattr(conn, "cosock_fallback_reason", None)
    out = {"path": getattr(conn, "cosock_path", "tcp"), "reason": why and why.value}
    counters: dict[str, Any] = getattr(conn, "cosock_info", dict)()
    for name in ("bells_sent", "spaces_sent", "sleeps", "sleep_ns", "safety_timeouts"):
        if name in counters:
            out[name] = counters[name]
    return out


def _quantiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50_us": s[len(s) // 2] * 1e6, "p99_us": s[min(len(s) - 1, len(s) * 99 // 100)] * 1e6}


#### Servers


def tcp_server(mode: str, port: int) -> dict[str, Any]:
    with _listen(port) as srv:
        warm, _ = srv.accept()  # the client's warm-up connection: nothing but EOF
        with warm:
            while warm.recv(4096):
                pass
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            if mode == "rr":
                n = 0
                while True:
                    msg = conn.recv(RR_SIZE, socket.MSG_WAITALL)
                    if len(msg) < RR_SIZE:
                        return {"round_trips": n, **_path(conn)}
                    conn.sendall(msg)
                    n += 1
            digest, total = hashlib.sha256(), 0
            buf = bytearray(1 << 20)
            check = mode == "stream"
            while got := conn.recv_into(buf):
                if check:
                    digest.update(memoryview(buf)[:got])
                total += got
            conn.sendall(b"done")
            return {
                "bytes": total,
                "sha256": digest.hexdigest() if check else None,
                **_path(conn),
            }


def ring_server(mode: str, port: int, slot: int, count: int) -> dict[str, Any]:
    pool, mm, cap = _slot(slot)
    rx, tx = RingReader(mm, 0, cap), RingWriter(mm, 1, cap)
    buf = memoryview(bytearray(cap))
    try:
        with _listen(port) as srv:
            conn, _ = srv.accept()
            with conn:
                if mode == "rr":
                    limit = time.monotonic() + SPIN_LIMIT
                    for _ in range(count):
                        while rx.available() < RR_SIZE:
                            if time.monotonic() > limit:
                                raise TimeoutError("ring rr: no request")
                        rx.read_into(buf, RR_SIZE)
                        tx.write(buf[:RR_SIZE], tx.free())
                    conn.recv(16)
                    return {"round_trips": count}
                digest, total, ended = hashlib.sha256(), 0, False
                check = mode == "stream"
                spin_until = 0.0
                while True:
                    n = rx.available()
                    if n:
                        rx.read_into(buf, n)
                        if check:
                            digest.update(buf[:n])
                        total += n
                        if rx.space_wanted():
                            conn.sendall(b"S")
                        spin_until = 0.0
                        continue
                    if ended:
                        break
                    now = time.perf_counter()
                    if not spin_until:  # spin a while: the writer is likely mid-copy
                        rx.set_spinning(True)
                        spin_until = now + SPIN
                    if now < spin_until:
                        continue
                    spin_until = 0.0
                    if rx.arm():  # spinning off, then re-check: no bell can be missed
                        continue
                    got = conn.recv(4096)
                    if not got or b"E" in got:
                        ended = True  # drain once more: all before E is published
                conn.sendall(b"done")
                return {"bytes": total, "sha256": digest.hexdigest() if check else None}
    finally:
        for ring in (rx, tx):
            ring.release()
        mm.close()
        pool.close()


#### Clients


def tcp_client(mode: str, host: str, port: int, n: int) -> dict[str, Any]:
    # One warm-up connection first, for TCP and cosock alike: what a process does once (its
    # first gateway request, the BAR opened, imports, helper threads) stays out of the
    # figures; the measured connection still pays its own set-up (a cosock offer and claim).
    with _connect(host, port) as warm:
        warm.shutdown(socket.SHUT_WR)
        warm.recv(16)
    with _connect(host, port) as conn:
        if mode == "rr":
            msg, lat = b"x" * RR_SIZE, []
            for _ in range(n):
                t = time.perf_counter()
                conn.sendall(msg)
                conn.recv(RR_SIZE, socket.MSG_WAITALL)
                lat.append(time.perf_counter() - t)
            return {"round_trips": n, **_quantiles(lat), **_path(conn)}
        data = _pattern(n)
        t = time.perf_counter()
        half = t
        for off in range(0, n, 1 << 16):
            if off == n // 2 & ~0xFFFF:
                half = time.perf_counter()
            conn.sendall(data[off : off + (1 << 16)])
        conn.shutdown(socket.SHUT_WR)
        conn.recv(16)
        end = time.perf_counter()
        seconds = end - t
        # The second half alone: the rate once set-up (a cosock connection's verdict, TCP's
        # slow start) is over; send buffers and rings are small next to half the stream.
        steady = (n - (n // 2 & ~0xFFFF)) / max(end - half, 1e-9) / 1e6
        return {
            "bytes": n,
            "seconds": seconds,
            "mb_s": n / seconds / 1e6,
            "mb_s_steady": steady,
            **_path(conn),
        }


def ring_client(mode: str, host: str, port: int, n: int, slot: int) -> dict[str, Any]:
    pool, mm, cap = _slot(slot)
    tx, rx = RingWriter(mm, 0, cap), RingReader(mm, 1, cap)
    try:
        with _connect(host, port) as conn:
            if mode == "rr":
                msg, buf, lat = memoryview(b"x" * RR_SIZE), memoryview(bytearray(RR_SIZE)), []
                limit = time.monotonic() + SPIN_LIMIT
                for _ in range(n):
                    t = time.perf_counter()
                    tx.write(msg, tx.free())
                    while rx.available() < RR_SIZE:
                        if time.monotonic() > limit:
                            raise TimeoutError("ring rr: no answer")
                    rx.read_into(buf, RR_SIZE)
                    lat.append(time.perf_counter() - t)
                conn.sendall(b"E")
                return {"round_trips": n, **_quantiles(lat)}
            data = _pattern(n)
            t = time.perf_counter()
            done = 0
            while done < n:
                free = tx.free()
                if free == 0:
                    spin_until = time.perf_counter() + SPIN
                    while free == 0 and time.perf_counter() < spin_until:
                        free = tx.free()
                    if free == 0 and tx.request_space() == 0:
                        if not conn.recv(4096):  # S: the reader freed space
                            raise ConnectionResetError("ring server went away")
                        continue
                    free = tx.free()
                old = tx.head
                done += tx.write(data[done:], free)
                if tx.needs_bell(old):
                    conn.sendall(b"B")
            conn.sendall(b"E")
            tail = b""
            while b"done" not in tail:  # after the server's last S bytes
                got = conn.recv(4096)
                if not got:
                    raise ConnectionResetError("ring server closed before confirming")
                tail = tail[-8:] + got
            seconds = time.perf_counter() - t
            return {"bytes": n, "seconds": seconds, "mb_s": n / seconds / 1e6}
    finally:
        for ring in (tx, rx):
            ring.release()
        mm.close()
        pool.close()


def main(argv: list[str]) -> int:
    role, kind, mode = argv[0], argv[1], argv[2]
    if kind == "cosock":
        import cosock

        cosock.enable()  # as `cosock run` does: the TCP code below now makes CoSockets
        kind = "tcp"
    if role == "server":
        port = int(argv[3])
        if kind == "tcp":
            out = tcp_server(mode, port)
        else:
            out = ring_server(mode, port, int(argv[4]), int(argv[5]) if len(argv) > 5 else 0)
    else:
        host, port, n = argv[3], int(argv[4]), int(argv[5])
        if kind == "tcp":
            out = tcp_client(mode, host, port, n)
        else:
            out = ring_client(mode, host, port, n, int(argv[6]))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
