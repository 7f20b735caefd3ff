"""The measured loops, netperf-style: STREAM, RR, CRR and IDLE, client and server sides.

They use plain ``socket`` objects and never import cosock: run under ``cosock run`` they
go through shared memory, without it through the kernel, so every transport executes the
very same Python code.  Each connection starts with a fixed header naming the test; the
server answers STREAM, RR and IDLE with a trailer carrying its own CPU time and the path
its socket took, so the client reports both ends.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from ._stats import cdf, percentile

#: kind (4 bytes), message size, parameter (IDLE: milliseconds to stay idle).
HEADER = struct.Struct("<4sIQ")
STREAM, RR, CRR, IDLE = b"STRM", b"RR__", b"CRR_", b"IDLE"
#: Asks the server for the CPU its CRR connections used since the last STAT.
STAT = b"STAT"
_TRAILER_LEN = struct.Struct("<I")
#: Receive buffer of the stream sink: like netperf, reads are not tied to message size.
_SINK_BUFFER = 1 << 20
#: Stream senders look at the clock after about this many bytes (a clock read per 64 B
#: message would cost more than cosock's send of it).
_CLOCK_EVERY_BYTES = 64 * 1024

Connect = Callable[[], socket.socket]


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, nanosecond clock (CLOCK_PROCESS_CPUTIME_ID)."""
    return time.process_time()


def path_of(sock: socket.socket) -> str:
    """``shm``/``tcp``/``handshake`` for TCP sockets (cosock's own attribute), ``uds`` else."""
    if sock.family == socket.AF_UNIX:
        return "uds"
    return str(getattr(sock, "cosock_path", "tcp"))


def _describe(sock: socket.socket) -> dict[str, Any]:
    """Path, fallback reason and cosock's wake-up counters of one socket."""
    info: dict[str, Any] = {"path": path_of(sock)}
    cosock_info = getattr(sock, "cosock_info", None)
    if cosock_info is not None:
        extra = cosock_info()
        info["reason"] = extra.get("fallback_reason")
        info["counters"] = {k: v for k, v in extra.items() if isinstance(v, int)}
    return info


def _nodelay(sock: socket.socket) -> None:
    """RR and CRR run with TCP_NODELAY, as latency-bound programs do (netperf -D)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def recv_exact(sock: socket.socket, view: memoryview) -> int:
    """Fill ``view``; returns how many bytes arrived before EOF (all of them, or fewer)."""
    size = len(view)
    got = sock.recv_into(view, size)
    while 0 < got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            break
        got += n
    return got


def _send_trailer(sock: socket.socket, record: dict[str, Any]) -> None:
    body = json.dumps(record).encode()
    sock.sendall(_TRAILER_LEN.pack(len(body)) + body)


def _recv_trailer(sock: socket.socket) -> dict[str, Any]:
    head = bytearray(_TRAILER_LEN.size)
    if recv_exact(sock, memoryview(head)) != len(head):
        raise ConnectionError("server closed without its trailer")
    (length,) = _TRAILER_LEN.unpack(head)
    body = bytearray(length)
    if recv_exact(sock, memoryview(body)) != length:
        raise ConnectionError("server trailer cut short")
    record: dict[str, Any] = json.loads(body)
    return record


#### Server side


class ServerStats:
    """CPU of the server's CRR connections (accept to close), collected by STAT."""

    def __init__(self) -> None:
        self.crr_cpu_s = 0.0
        self.crr_ops = 0


def serve_connection(conn: socket.socket, stats: ServerStats, cpu_at_accept: float) -> None:
    """Run the one test the connection's header asks for, then answer with a trailer.

    ``cpu_at_accept`` is this process's CPU time before ``accept()``: a CRR connection
    costs the server its accept too (where cosock matches the offer).
    """
    head = bytearray(HEADER.size)
    if recv_exact(conn, memoryview(head)) != HEADER.size:
        return  # a probe, or a client that gave up
    kind, size, param = HEADER.unpack(head)
    cpu0 = cpu_seconds()
    if kind == STREAM:
        moved, ops = _sink(conn), 0
    elif kind == RR:
        _nodelay(conn)
        moved, ops = _echo(conn, size)
    elif kind == CRR:
        _nodelay(conn)
        _echo_once(conn, size)
        conn.close()  # the close is part of the measured exchange
        stats.crr_cpu_s += cpu_seconds() - cpu_at_accept
        stats.crr_ops += 1
        return
    elif kind == STAT:
        _send_trailer(conn, {"crr_cpu_s": stats.crr_cpu_s, "crr_ops": stats.crr_ops})
        stats.crr_cpu_s, stats.crr_ops = 0.0, 0
        return
    elif kind == IDLE:
        moved, ops = _idle(conn, param / 1000.0), 0
    else:
        raise ValueError(f"unknown test header {kind!r}")
    record = {"bytes": moved, "ops": ops, "cpu_s": cpu_seconds() - cpu0, **_describe(conn)}
    _send_trailer(conn, record)


def _sink(conn: socket.socket) -> int:
    buf = memoryview(bytearray(_SINK_BUFFER))
    total = 0
    recv_into = conn.recv_into
    while n := recv_into(buf):
        total += n
    return total


def _echo(conn: socket.socket, size: int) -> tuple[int, int]:
    view = memoryview(bytearray(size))
    reply = bytes(size)
    ops = 0
    while recv_exact(conn, view) == size:
        conn.sendall(reply)
        ops += 1
    return ops * size, ops


def _echo_once(conn: socket.socket, size: int) -> None:
    view = memoryview(bytearray(size))
    if recv_exact(conn, view) == size:
        conn.sendall(bytes(size))


def _idle(conn: socket.socket, seconds: float) -> int:
    """Block in recv on an open, silent connection for ``seconds``."""
    conn.settimeout(seconds)
    try:
        data = conn.recv(1)
    except TimeoutError:
        data = b""
    finally:
        conn.settimeout(None)
    return len(data)


#### Client side


def stream(sock: socket.socket, size: int, duration: float) -> dict[str, Any]:
    """Send ``size``-byte messages for ``duration`` s; MB/s counts until the sink has all."""
    msg = bytes(size)
    batch = max(1, _CLOCK_EVERY_BYTES // size)
    sendall = sock.sendall
    sock.sendall(HEADER.pack(STREAM, size, 0))
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    end = t0 + duration
    sent = 0
    while True:
        for _ in range(batch):
            sendall(msg)
        sent += batch
        if time.perf_counter() >= end:
            break
    sock.shutdown(socket.SHUT_WR)
    server = _recv_trailer(sock)
    seconds = time.perf_counter() - t0
    moved = sent * size
    if server["bytes"] != moved:
        raise ConnectionError(f"server received {server['bytes']} of {moved} bytes")
    return {
        "seconds": seconds,
        "bytes": moved,
        "messages": sent,
        "MBps": moved / seconds / 1e6,
        "ops_per_s": sent / seconds,
        "cpu_client_s": cpu_seconds() - cpu0,
        "cpu_server_s": server["cpu_s"],
        "client": _describe(sock),
        "server": {k: v for k, v in server.items() if k not in ("bytes", "ops", "cpu_s")},
    }


def _latency_summary(lat_ns: list[int], seconds: float) -> dict[str, Any]:
    lat_ns.sort()
    us = [x / 1000.0 for x in lat_ns]
    return {
        "ops": len(us),
        "ops_per_s": len(us) / seconds,
        "p50_us": percentile(us, 50),
        "p99_us": percentile(us, 99),
        "p999_us": percentile(us, 99.9),
        "cdf_us": cdf(us),
    }


def rr(sock: socket.socket, size: int, duration: float) -> dict[str, Any]:
    """One ``size``-byte request, one ``size``-byte response, in lock-step, for ``duration``."""
    _nodelay(sock)
    request = bytes(size)
    view = memoryview(bytearray(size))
    sendall = sock.sendall
    clock = time.perf_counter_ns
    lat: list[int] = []
    record = lat.append
    sock.sendall(HEADER.pack(RR, size, 0))
    cpu0 = cpu_seconds()
    t0 = clock()
    end = t0 + int(duration * 1e9)
    now = t0
    while now < end:
        start = now
        sendall(request)
        if recv_exact(sock, view) != size:
            raise ConnectionError("server closed during RR")
        now = clock()
        record(now - start)
    seconds = (now - t0) / 1e9
    cpu_client = cpu_seconds() - cpu0
    sock.shutdown(socket.SHUT_WR)
    server = _recv_trailer(sock)
    if server["ops"] != len(lat):
        raise ConnectionError(f"server answered {server['ops']} of {len(lat)} requests")
    return {
        **_latency_summary(lat, seconds),
        "seconds": seconds,
        "bytes": 2 * size * len(lat),
        "cpu_client_s": cpu_client,
        "cpu_server_s": server["cpu_s"],
        "client": _describe(sock),
        "server": {k: v for k, v in server.items() if k not in ("bytes", "ops", "cpu_s")},
    }


def crr(connect: Connect, size: int, duration: float) -> dict[str, Any]:
    """Connect, request, response, wait for the server's close, close; for ``duration``."""
    request = HEADER.pack(CRR, size, 0) + bytes(size)
    view = memoryview(bytearray(size + 1))
    clock = time.perf_counter_ns
    lat: list[int] = []
    paths: dict[str, int] = {}
    reasons: dict[str, int] = {}
    _server_crr_cpu(connect)  # zero the server's account
    cpu0 = cpu_seconds()
    t0 = clock()
    end = t0 + int(duration * 1e9)
    now = t0
    while now < end:
        start = now
        sock = connect()
        try:
            _nodelay(sock)
            sock.sendall(request)
            if recv_exact(sock, view[:size]) != size or sock.recv_into(view[size:]) != 0:
                raise ConnectionError("CRR server did not answer and close")
            info = _describe(sock)
        finally:
            sock.close()
        now = clock()
        lat.append(now - start)
        paths[info["path"]] = paths.get(info["path"], 0) + 1
        reason = str(info.get("reason"))
        reasons[reason] = reasons.get(reason, 0) + 1
    seconds = (now - t0) / 1e9
    cpu_client = cpu_seconds() - cpu0
    cpu_server, server_ops = _server_crr_cpu(connect)
    if server_ops != len(lat):
        raise ConnectionError(f"server counted {server_ops} of {len(lat)} CRR connections")
    return {
        **_latency_summary(lat, seconds),
        "seconds": seconds,
        "cpu_client_s": cpu_client,
        "cpu_server_s": cpu_server,
        "paths": paths,
        "reasons": reasons,
    }


def _server_crr_cpu(connect: Connect) -> tuple[float, int]:
    """The server's CPU seconds and count of CRR connections since the last call."""
    with connect() as sock:
        sock.sendall(HEADER.pack(STAT, 0, 0))
        record = _recv_trailer(sock)
    return float(record["crr_cpu_s"]), int(record["crr_ops"])


def idle(sock: socket.socket, seconds: float) -> dict[str, Any]:
    """One open connection, both ends blocked in recv for ``seconds``: CPU used by each."""
    sock.sendall(HEADER.pack(IDLE, 0, int(seconds * 1000)))
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    server = _recv_trailer(sock)
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_client_s": cpu_seconds() - cpu0,
        "cpu_server_s": server["cpu_s"],
        "client": _describe(sock),
        "server": {k: v for k, v in server.items() if k not in ("bytes", "ops", "cpu_s")},
    }
