"""Plain stdlib programs run under ``cosock run`` in two QEMU guests (test_vm_cosock.py) or in
two pretend guests on the host (test_vmchannel.py). Nothing here knows cosock: the only
cosock-specific thing is reading ``cosock_path``/``cosock_fallback_reason`` off the socket
(``getattr``, so the same program runs without cosock) to report which path was taken.

    server HOST PORT COUNT       serve COUNT connections, one JSON line each
    client HOST PORT             stream both ways, request/response, EOF; one JSON line
    plain-client HOST PORT       one short exchange, report the path and reason
    aserver HOST PORT            asyncio echo server (one connection)
    aclient HOST PORT            asyncio echo client; one JSON line
    urlget URL                   urllib GET; sha256 of the body and the path; one JSON line
    echo-server HOST PORT        echo one connection to EOF; one JSON line
    soak-client HOST PORT SECS [STOP]
                                 echo round trips of 1 B..64 KiB, each checked, for SECS
                                 seconds or until the file STOP exists; prints {"started"}
                                 after the first, {"path", "t"} at every later change of
                                 path (t: this VM's monotonic clock), then a report with
                                 every path the connection took, in order
    hold-client HOST PORT N STOP  echo N bytes (checked), print {"held"}, then hold the
                                 connection idle until the file STOP exists; each time the
                                 file STOP.more appears, remove it, echo N bytes more and
                                 print {"more"}

    echo-many HOST PORT N        echo N concurrent connections (a thread each) to EOF;
                                 one JSON line with each one's bytes and path
    forking-server HOST PORT N   a socketserver.ForkingTCPServer: N connections, each served
                                 in a forked child (lines echoed upper-cased to EOF);
                                 one JSON line once all children are done
    fork-clients HOST PORT N     N connections one after the other, a line each (checked);
                                 one JSON line with each one's path
    many-client HOST PORT N BYTES STOP
                                 open N connections at once (all held), echo BYTES on
                                 each (checked), print {"held"} with their paths,
                                 reasons and connect() times; when the file STOP exists,
                                 echo BYTES more on each, close, print {"done"}

Server commands (first line of a connection): ``stream N M`` (read N bytes, answer their
length and sha256, then send M pattern bytes and close), ``rr K`` (K echoes of 64 bytes),
``eof`` (read to EOF, answer the count, close).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sys
import time
import urllib.request
from typing import Any


def pattern(n: int, salt: int = 0) -> bytes:
    block = bytes((i * 7 + salt) & 0xFF for i in range(251))  # prime length: no alignment luck
    return (block * (n // len(block) + 1))[:n]


def info(sock: Any) -> dict[str, Any]:
    why = getattr(sock, "cosock_fallback_reason", None)
    return {
        "path": getattr(sock, "cosock_path", "plain"),
        "reason": None if why is None else why.value,
    }


def connect(host: str, port: int) -> socket.socket:
    """``create_connection``; ``PEER_SOURCE`` picks the source address (pretend guests on
    the host share one network stack: 127.0.0.2 and 127.0.0.3 stand for two VMs)."""
    source = os.environ.get("PEER_SOURCE")
    return socket.create_connection(
        (host, port), timeout=120, source_address=(source, 0) if source else None
    )


def recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = conn.recv(min(1 << 16, n - len(buf)))
        if not got:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += got
    return bytes(buf)


def read_line(conn: socket.socket) -> str:
    line = b""
    while not line.endswith(b"\n"):
        got = conn.recv(1)
        if not got:
            break
        line += got
    return line.decode().strip()


def serve_one(conn: socket.socket) -> dict[str, Any]:
    cmd, *args = read_line(conn).split()
    report: dict[str, Any] = {"cmd": cmd}
    if cmd == "stream":
        n, m = int(args[0]), int(args[1])
        h = hashlib.sha256()
        left = n
        while left:
            got = conn.recv(min(1 << 16, left))
            if not got:
                break
            h.update(got)
            left -= len(got)
        conn.sendall(f"{n - left} {h.hexdigest()}\n".encode())
        conn.sendall(pattern(m, 1))
    elif cmd == "rr":
        for _ in range(int(args[0])):
            conn.sendall(recv_exact(conn, 64))
    elif cmd == "eof":
        total = 0
        while got := conn.recv(1 << 16):
            total += len(got)
        conn.sendall(f"{total}\n".encode())
    report.update(info(conn))
    return report


def server(host: str, port: int, count: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen()
    print(json.dumps({"listening": port, **info(srv)}), flush=True)
    for _ in range(count):
        conn, _ = srv.accept()
        with conn:
            print(json.dumps(serve_one(conn)), flush=True)
    srv.close()


def client(host: str, port: int) -> None:
    out: dict[str, Any] = {}
    up, down = 3_000_017, 2_000_003
    with connect(host, port) as c:
        data = pattern(up)
        c.sendall(f"stream {up} {down}\n".encode() + data)
        n, digest = read_line(c).split()
        back = bytearray()
        while got := c.recv(1 << 16):
            back += got
        out["stream"] = {
            "up_ok": int(n) == up and digest == hashlib.sha256(data).hexdigest(),
            "down_ok": bytes(back) == pattern(down, 1),
            **info(c),
        }
    with connect(host, port) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        k = 200
        c.sendall(f"rr {k}\n".encode())
        lat = []
        ok = True
        for i in range(k):
            msg = pattern(64, i)
            t = time.perf_counter()
            c.sendall(msg)
            ok = ok and recv_exact(c, 64) == msg
            lat.append(time.perf_counter() - t)
        lat.sort()
        out["rr"] = {"ok": ok, "p50_us": round(lat[k // 2] * 1e6, 1), **info(c)}
    with connect(host, port) as c:
        c.sendall(b"eof\n" + pattern(100_000))
        c.shutdown(socket.SHUT_WR)  # half-close: the server reads EOF, still answers
        answer = read_line(c)
        out["eof"] = {"ok": answer == "100000" and c.recv(10) == b"", **info(c)}
    print(json.dumps(out), flush=True)


def plain_client(host: str, port: int) -> None:
    t = time.monotonic()
    with connect(host, port) as c:
        took = time.monotonic() - t  # ``PEER_TIMING``: how long connect() took
        c.sendall(b"eof\nabc")
        c.shutdown(socket.SHUT_WR)
        out = {"answer": read_line(c), **info(c)}
        if os.environ.get("PEER_TIMING"):
            out["connect_s"] = round(took, 3)
        print(json.dumps(out), flush=True)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _aserver(host: str, port: int) -> None:
    srv = await asyncio.start_server(_echo, host, port)
    print(json.dumps({"listening": port}), flush=True)
    async with srv:
        await asyncio.sleep(600)


async def _aclient(host: str, port: int) -> None:
    source = os.environ.get("PEER_SOURCE")
    reader, writer = await asyncio.open_connection(
        host, port, local_addr=(source, 0) if source else None
    )
    sock = writer.get_extra_info("socket")
    sent = hashlib.sha256()
    got = hashlib.sha256()
    total = 0
    for i in range(64):
        chunk = pattern(32_768 + i, i)
        sent.update(chunk)
        writer.write(chunk)
        await writer.drain()
        want = len(chunk)
        while want:
            data = await reader.read(want)
            got.update(data)
            want -= len(data)
            total += len(data)
    raw = getattr(sock, "_sock", sock)  # asyncio's TransportSocket wraps the real socket
    report = {"ok": sent.digest() == got.digest(), "bytes": total, **info(raw)}
    writer.close()
    await writer.wait_closed()
    print(json.dumps(report), flush=True)


def urlget(url: str) -> None:
    with urllib.request.urlopen(url, timeout=120) as resp:
        raw = resp.fp.raw._sock  # the connection's socket (instrumentation only)
        path = info(raw)
        body = resp.read()
    print(json.dumps({"sha256": hashlib.sha256(body).hexdigest(), "len": len(body), **path}))


def echo_server(host: str, port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen()
    print(json.dumps({"listening": port}), flush=True)
    conn, _ = srv.accept()
    total = 0
    with conn:
        while got := conn.recv(1 << 16):
            conn.sendall(got)
            total += len(got)
        print(json.dumps({"echoed": total, **info(conn)}), flush=True)
    srv.close()


def echo_many(host: str, port: int, n: int) -> None:
    import threading

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(n)
    print(json.dumps({"listening": port}), flush=True)
    done: list[dict[str, Any]] = []

    def echo(conn: socket.socket) -> None:
        total = 0
        with conn:
            while got := conn.recv(1 << 16):
                conn.sendall(got)
                total += len(got)
            done.append({"echoed": total, **info(conn)})

    threads = []
    for _ in range(n):
        conn, _ = srv.accept()
        threads.append(threading.Thread(target=echo, args=(conn,)))
        threads[-1].start()
    srv.close()
    for t in threads:
        t.join(600)
    print(json.dumps({"echoed": [d["echoed"] for d in done], "paths": [d["path"] for d in done]}))


def forking_server(host: str, port: int, n: int) -> None:
    import socketserver

    class Upper(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(line.upper())
                self.wfile.flush()

    class Server(socketserver.ForkingTCPServer):
        allow_reuse_address = True

    with Server((host, port), Upper) as srv:  # (its close waits for the children)
        print(json.dumps({"listening": port}), flush=True)
        for _ in range(n):
            srv.handle_request()
    print(json.dumps({"served": n}), flush=True)


def fork_clients(host: str, port: int, n: int) -> None:
    paths, bad = [], []
    for i in range(n):
        with connect(host, port) as c:
            c.sendall(b"line %d\n" % i)
            if read_line(c) != f"LINE {i}":
                bad.append(i)
            paths.append(info(c)["path"])
    print(json.dumps({"paths": paths, "bad": bad}))


def many_client(host: str, port: int, n: int, size: int, stop: str) -> None:
    def echo(c: socket.socket, salt: int) -> bool:
        msg = pattern(size, salt)
        ok = True
        for i in range(0, size, 16384):  # in pieces: the echo server answers as it reads
            c.sendall(msg[i : i + 16384])
            ok = recv_exact(c, len(msg[i : i + 16384])) == msg[i : i + 16384] and ok
        return ok

    conns, took = [], []
    for _ in range(n):
        t = time.monotonic()
        conns.append(connect(host, port))
        took.append(round(time.monotonic() - t, 3))
    ok = all([echo(c, i) for i, c in enumerate(conns)])
    infos = [info(c) for c in conns]
    print(
        json.dumps(
            {
                "held": n,
                "ok": ok,
                "paths": [x["path"] for x in infos],
                "reasons": [x["reason"] for x in infos],
                "connect_s": took,
            }
        ),
        flush=True,
    )
    deadline = time.monotonic() + 600
    while not os.path.exists(stop) and time.monotonic() < deadline:
        time.sleep(0.2)
    ok = all([echo(c, 100 + i) for i, c in enumerate(conns)]) and ok
    tails = []
    for c in conns:
        c.shutdown(socket.SHUT_WR)
        tails.append(c.recv(1))
        c.close()
    print(json.dumps({"done": ok and tails == [b""] * n, "bytes": 2 * n * size}), flush=True)


#: States a connection passes through between paths (a sampled one may catch them).
TRANSIENT_PATHS = frozenset({"handshake", "switching", "upgrading"})


def soak_client(host: str, port: int, seconds: float, stop: str | None = None) -> None:
    paths: list[str] = []
    errors: list[str] = []
    total = rounds = 0
    with connect(host, port) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (stop and rounds % 16 == 0 and os.path.exists(stop)):
            size = 1 + (rounds * 7919) % 65536
            msg = pattern(size, rounds)
            try:
                c.sendall(msg)
                if recv_exact(c, size) != msg:
                    errors.append(f"round {rounds}: echo differs")
                    break
            except (OSError, EOFError) as exc:
                errors.append(f"round {rounds}: {exc!r}")
                break
            total += size
            rounds += 1
            path = info(c)["path"]
            # A switch or upgrade under way is not listed: the report says where it settled.
            if path not in TRANSIENT_PATHS and (not paths or paths[-1] != path):
                paths.append(path)
                if rounds > 1:
                    print(json.dumps({"path": path, "t": time.monotonic()}), flush=True)
            if rounds == 1:
                print(json.dumps({"started": path}), flush=True)
        c.shutdown(socket.SHUT_WR)
        tail = c.recv(1)
    report = {"ok": not errors and tail == b"", "bytes": total, "rounds": rounds}
    print(json.dumps({**report, "paths": paths, "errors": errors}), flush=True)


def hold_client(host: str, port: int, n: int, stop: str) -> None:
    def echo(salt: int) -> None:
        msg = pattern(n, salt)
        for i in range(0, n, 16384):  # in pieces: the echo server answers as it reads
            c.sendall(msg[i : i + 16384])
            if recv_exact(c, len(msg[i : i + 16384])) != msg[i : i + 16384]:
                raise SystemExit("echo differs")

    with connect(host, port) as c:
        echo(0)
        print(json.dumps({"held": n, "local_port": c.getsockname()[1], **info(c)}), flush=True)
        deadline = time.monotonic() + 600
        rounds = 0
        while not os.path.exists(stop) and time.monotonic() < deadline:
            if os.path.exists(stop + ".more"):
                os.unlink(stop + ".more")
                rounds += 1
                echo(rounds)
                print(json.dumps({"more": n, **info(c)}), flush=True)
            time.sleep(0.2)
        c.shutdown(socket.SHUT_WR)
        tail = c.recv(1)
    print(json.dumps({"done": tail == b""}), flush=True)


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "server":
        server(args[0], int(args[1]), int(args[2]))
    elif mode == "client":
        client(args[0], int(args[1]))
    elif mode == "plain-client":
        plain_client(args[0], int(args[1]))
    elif mode == "aserver":
        asyncio.run(_aserver(args[0], int(args[1])))
    elif mode == "aclient":
        asyncio.run(_aclient(args[0], int(args[1])))
    elif mode == "urlget":
        urlget(args[0])
    elif mode == "echo-server":
        echo_server(args[0], int(args[1]))
    elif mode == "hold-client":
        hold_client(args[0], int(args[1]), int(args[2]), args[3])
    elif mode == "echo-many":
        echo_many(args[0], int(args[1]), int(args[2]))
    elif mode == "forking-server":
        forking_server(args[0], int(args[1]), int(args[2]))
    elif mode == "fork-clients":
        fork_clients(args[0], int(args[1]), int(args[2]))
    elif mode == "many-client":
        many_client(args[0], int(args[1]), int(args[2]), int(args[3]), args[4])
    elif mode == "soak-client":
        soak_client(args[0], int(args[1]), float(args[2]), *args[3:4])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
