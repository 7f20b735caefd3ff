"""Programs the migration tests run inside guests (plain stdlib sockets, cosock not enabled).

    python migrate_peers.py probe                 # AgentClient facts, one JSON line per command
    python migrate_peers.py stream-server PORT    # both ways at once, sha256 over each stream
    python migrate_peers.py stream-client HOST PORT
    python migrate_peers.py idle-server PORT      # sends/reads only when told to
    python migrate_peers.py idle-client HOST PORT
    ... --cosock                                  # the same through cosock.enable()

Both read JSON commands on stdin and answer one JSON line each, so a test can ask them
questions while they keep running across migrations.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import sys
import threading
import time
from typing import Any


def _out(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


#### probe: what AgentClient.shared() says, from inside a guest


def _facts(cmd: dict[str, Any]) -> dict[str, Any]:
    from cosock.agent.client import AgentClient

    client = AgentClient.shared()
    client.poll()  # exactly one poll: the facts must be right after it
    own = client.self_guest
    owning = {}
    for ip in cmd.get("owning", []):
        g = client.guest_owning(ip)
        owning[ip] = None if g is None else g.name
    lookups = []
    for ip, port in cmd.get("lookup", []):
        info, reason = client.lookup(ip, port)
        lookups.append([None if info is None else info.guest, reason])
    return {
        "self": None if own is None else {"name": own.name, "host": own.host},
        "owning": owning,
        "lookup": lookups,
        "version": client.version,
        "relisten_error": client.last_relisten_error,
        "reason": client.unavailable_reason,
    }


def _wait(cmd: dict[str, Any]) -> None:
    from cosock.agent.client import AgentClient

    client = AgentClient.shared()
    fd = client.wait_fileno()
    client.poll()
    before = client.version
    _out({"waiting": True, "version": before})
    readable, _, _ = select.select([fd], [], [], float(cmd.get("timeout", 10)))
    seen = client.version  # before poll(): the page alone must have moved
    client.poll()
    _out({"readable": bool(readable), "before": before, "seen": seen, "after": client.version})


def probe() -> None:
    from cosock.agent.client import AgentClient

    held: list[socket.socket] = []
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "facts":
            _out(_facts(cmd))
        elif op == "listen":
            # The agent checks that a listener really listens there: hold the port open.
            held.append(socket.create_server(("0.0.0.0", int(cmd["port"]))))
            AgentClient.shared().listen("0.0.0.0", int(cmd["port"]), f"/tmp/rv-{cmd['port']}")
            _out({"listening": cmd["port"]})
        elif op == "wait":
            _wait(cmd)
        else:
            _out({"error": f"unknown op {op!r}"})


#### stream: both directions at once, every byte hashed


class Pump:
    """Send a pseudo-random stream and receive the peer's, hashing both, until told to stop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stop = threading.Event()
        self.sent = self.received = 0
        self.sent_hash = hashlib.sha256()
        self.received_hash = hashlib.sha256()
        self.error: str | None = None
        self._source = os.urandom(1 << 20) * 2
        self._threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._recv, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                start = (i * 7919) % (1 << 20)
                size = 16384 + (i * 4099) % 16384
                chunk = self._source[start : start + size]
                self.sock.sendall(chunk)
                self.sent_hash.update(chunk)
                self.sent += len(chunk)
                i += 1
                time.sleep(0.002)  # a steady stream, not a CPU hog on a shared machine
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = f"send: {exc!r}"

    def _recv(self) -> None:
        try:
            while data := self.sock.recv(1 << 16):
                self.received_hash.update(data)
                self.received += len(data)
        except OSError as exc:
            self.error = f"recv: {exc!r}"

    def progress(self) -> dict[str, Any]:
        return {"sent": self.sent, "received": self.received, "error": self.error}

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        for t in self._threads:
            t.join(60)
        return {
            **self.progress(),
            "sent_sha": self.sent_hash.hexdigest(),
            "received_sha": self.received_hash.hexdigest(),
            "hung": any(t.is_alive() for t in self._threads),
        }


def _info(sock: socket.socket) -> dict[str, Any]:
    info = getattr(sock, "cosock_info", None)
    return {"path": "tcp"} if info is None else {**info(), **_diagnostics(sock)}


def _diagnostics(sock: socket.socket) -> dict[str, Any]:
    """What a test that timed out waiting for a path needs to say why (not compared)."""
    from cosock.agent.client import AgentClient

    ch = getattr(sock, "_co", None)
    agent = AgentClient.current()
    guest = None if agent is None else agent.self_guest
    return {
        "phase": None if ch is None else str(ch.phase),
        "upgrade_pending": ch is not None and ch.upgrade is not None,
        "proto_state": None if ch is None else ch.proto.state.value,
        "ctl_out": None if ch is None else len(ch.ctl_out),
        "watch_alive": any(t.name == "cosock-residency" for t in threading.enumerate()),
        "agent": None if agent is None else agent.unavailable_reason,
        "self_guest": None if guest is None else guest.name,
    }


def _scribble(sock: socket.socket) -> dict[str, Any]:
    """Overwrite the connection's whole shared region (both rings) with garbage."""
    ch = getattr(sock, "_co", None)
    mm = None if ch is None else ch.mm
    if mm is None:
        return {"scribbled": 0}
    mm[:] = os.urandom(len(mm))
    return {"scribbled": len(mm)}


def _serve_commands(pump: Pump) -> None:
    for line in sys.stdin:
        op = json.loads(line)["op"]
        if op == "progress":
            _out(pump.progress())
        elif op == "info":
            _out(_info(pump.sock))
        elif op == "scribble":
            _out(_scribble(pump.sock))
        elif op == "stop":
            _out(pump.finish())
            return


def stream_server(port: int) -> None:
    srv = socket.create_server(("0.0.0.0", port))
    _out({"listening": port})
    conn, _ = srv.accept()
    srv.close()
    conn.settimeout(60)  # a broken path fails the test instead of hanging it
    _serve_commands(Pump(conn))


def stream_client(host: str, port: int) -> None:
    conn = socket.create_connection((host, port), timeout=60)
    _out({"connected": True})
    _serve_commands(Pump(conn))


#### asyncio echo server + request/response client with sequence numbers


def asyncio_echo_server(port: int) -> None:
    """An unmodified asyncio streams echo server (one line per request)."""
    import asyncio

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "0.0.0.0", port)
        _out({"listening": port})
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def rr_client(host: str, port: int) -> None:
    """Request/response as fast as it can, each request numbered and padded; every answer
    must be the request just sent (order and content), until told to stop."""
    sock = socket.create_connection((host, port), timeout=60)
    reader = sock.makefile("rb")
    _out({"connected": True})
    stop = threading.Event()
    state: dict[str, Any] = {"done": 0, "bad": 0, "error": None}

    def loop() -> None:
        seq = 0
        try:
            while not stop.is_set():
                line = b"%d " % seq + b"x" * (seq % 3000) + b"\n"
                sock.sendall(line)
                if reader.readline() != line:
                    state["bad"] += 1
                seq += 1
                state["done"] = seq
        except OSError as exc:
            state["error"] = repr(exc)

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    for cmd_line in sys.stdin:
        op = json.loads(cmd_line)["op"]
        if op == "progress":
            _out(dict(state))
        elif op == "info":
            _out(_info(sock))
        elif op == "stop":
            stop.set()
            worker.join(60)
            _out({**state, "hung": worker.is_alive()})
            return


#### idle: no thread touches the socket between commands


def _pattern(n: int, seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "little")).digest(n)


def _idle(sock: socket.socket) -> None:
    sock.settimeout(60)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "send":
            data = _pattern(int(cmd["n"]), int(cmd["seed"]))
            sock.sendall(data)
            _out({"sent": len(data), "sha": hashlib.sha256(data).hexdigest()})
        elif op == "read":
            buf = bytearray()
            while len(buf) < int(cmd["n"]):
                chunk = sock.recv(int(cmd["n"]) - len(buf))
                if not chunk:
                    break
                buf += chunk
            _out({"read": len(buf), "sha": hashlib.sha256(buf).hexdigest()})
        elif op == "shutdown":
            sock.shutdown(socket.SHUT_WR)
            _out({"shutdown": True})
        elif op == "readall":
            digest, total = hashlib.sha256(), 0
            while chunk := sock.recv(1 << 16):
                digest.update(chunk)
                total += len(chunk)
            _out({"read": total, "sha": digest.hexdigest()})
        elif op == "info":
            _out(_info(sock))
        elif op == "scribble":
            _out(_scribble(sock))


def idle_server(port: int) -> None:
    srv = socket.create_server(("0.0.0.0", port))
    _out({"listening": port})
    conn, _ = srv.accept()
    srv.close()
    _idle(conn)


def idle_client(host: str, port: int) -> None:
    conn = socket.create_connection((host, port), timeout=60)
    _out({"connected": True})
    _idle(conn)


if __name__ == "__main__":
    if "--cosock" in sys.argv:
        sys.argv.remove("--cosock")
        import cosock

        cosock.enable()
    role = sys.argv[1]
    if role == "probe":
        probe()
    elif role == "stream-server":
        stream_server(int(sys.argv[2]))
    elif role == "stream-client":
        stream_client(sys.argv[2], int(sys.argv[3]))
    elif role == "asyncio-echo-server":
        asyncio_echo_server(int(sys.argv[2]))
    elif role == "rr-client":
        rr_client(sys.argv[2], int(sys.argv[3]))
    elif role == "idle-server":
        idle_server(int(sys.argv[2]))
    elif role == "idle-client":
        idle_client(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown role {role!r}")
