"""``cosock torture``: a bounded soak mixing connects, transfers, half-closes and faults.

Three kinds of process, so that a kill -9 hits a real peer:

* *servers* (``python -m cosock.torture server PORT``): per connection read a header and the
  upload, answer the upload's sha256 and a download generated from the header's seed;
* one *worker* (``python -m cosock.torture worker ...``): N threads making connections to
  random servers with random sizes and modes, checking every byte, one JSON line each;
* the *driver* (this process): starts them (on loopback, or in lab guests as root), injects
  faults at random, and turns the worker's facts into the figures.

A connection that fails is excused only if a fault that can break it (a kill of its server)
happened while it was open; every other failure counts its missing bytes as lost, and a
timeout as a hang.  Fault kinds live in :data:`FAULTS`; a new kind (e.g. "migrate" in lab
mode) is one function ``(run) -> ports_broken`` registered there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _leaks

_HEADER = 25  # up size u64, down size u64, seed u64, mode u8 (1 = half-close)
_IO_TIMEOUT = 20.0  # a socket call blocked longer than this is a hang
_SIZES = (0, 1, 100, 4096, 65536, 300_000, 1 << 20, 3 << 20)


def _payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 1 << 20))
        if not chunk:
            break
        out += chunk
    return bytes(out)


#### Server process


def _serve_one(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(_IO_TIMEOUT * 2)
        head = _recv_exact(conn, _HEADER)
        if len(head) < _HEADER:
            return
        up, down, seed, mode = (
            int.from_bytes(head[0:8], "big"),
            int.from_bytes(head[8:16], "big"),
            int.from_bytes(head[16:24], "big"),
            head[24],
        )
        digest = hashlib.sha256()
        got = 0
        while got < up or mode == 1:
            chunk = conn.recv(min(1 << 20, up - got) if got < up else 1 << 16)
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
        conn.sendall(digest.digest() + _payload(seed + 1, down))
        if mode == 1:
            conn.shutdown(socket.SHUT_WR)


def serve(port: int) -> None:
    from . import CoSocket

    srv = CoSocket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(512)
    print(json.dumps({"listening": port}), flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()


#### Worker process


def _one_connection(host: str, port: int, rng: random.Random) -> dict[str, Any]:
    from . import CoSocket

    up, down = rng.choice(_SIZES), rng.choice(_SIZES)
    seed, half = rng.getrandbits(62), rng.random() < 0.25
    fact: dict[str, Any] = {"port": port, "up": up, "down": down, "half": half}
    fact["t0"] = time.monotonic()
    fact.update(path="tcp", fallback=None, error=None, up_ok=None, down_got=0, prefix_ok=True)
    fact["extra"] = 0
    sock = CoSocket()
    try:
        sock.settimeout(_IO_TIMEOUT)
        sock.connect((host, port))
        header = b"".join(x.to_bytes(8, "big") for x in (up, down, seed)) + bytes([half])
        data = _payload(seed, up)
        sock.sendall(header + data)
        if half:
            sock.shutdown(socket.SHUT_WR)
        digest = _recv_exact(sock, 32)
        fact["up_ok"] = digest == hashlib.sha256(data).digest() if len(digest) == 32 else None
        got = _recv_exact(sock, down)
        fact["down_got"] = len(got)
        fact["prefix_ok"] = got == _payload(seed + 1, down)[: len(got)]
        if len(digest) < 32 or len(got) < down:
            fact["error"] = "early-eof"
        else:
            fact["extra"] = len(_recv_exact(sock, 1 << 16))  # must be EOF: nothing more
    except TimeoutError:
        fact["error"] = "timeout"
    except OSError as exc:
        fact["error"] = type(exc).__name__
    finally:
        fact["path"] = sock.cosock_path
        reason = sock.cosock_fallback_reason
        fact["fallback"] = None if reason is None else reason.value
        if reason is None and sock.cosock_info().get("switches"):
            fact["fallback"] = "switched"  # left shared memory on a live connection
        sock.close()
        fact["t1"] = time.monotonic()
    return fact


def work(host: str, ports: list[int], seconds: float, connections: int, seed: int) -> None:
    """Run ``connections`` client threads for ``seconds``; print one JSON line per
    connection, then a final line with this process's leaks."""
    before = _leaks.snapshot()
    out_lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def loop(index: int) -> None:
        rng = random.Random(seed * 7919 + index)
        while time.monotonic() < deadline:
            fact = _one_connection(host, rng.choice(ports), rng)
            with out_lock:
                print(json.dumps(fact), flush=True)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 4 * _IO_TIMEOUT)
    stuck = sum(t.is_alive() for t in threads)
    from ._rendezvous import _sender
    from ._residency import _wake_fd
    from .agent.client import AgentClient

    AgentClient.reset_shared()  # the process-wide agent link is not a leak
    ignore = [] if _sender is None else [_sender.fileno()]
    if _wake_fd is not None:
        ignore.append(_wake_fd)  # the residency watch's, process-wide too
    leaks = _leaks.settled_leaks(before, lambda: _leaks.snapshot(ignore_fds=ignore))
    counts = {kind: len(items) for kind, items in leaks.items()}
    print(json.dumps({"done": True, "stuck": stuck, "leaks": counts}), flush=True)
    os._exit(0)  # stuck threads (if any) must not keep us alive


#### Driver


@dataclass
class Run:
    """What a fault may touch: the environment, the servers by port, the event log."""

    env: _Env
    ports: list[int]
    servers: dict[int, subprocess.Popen[Any]] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)
    #: (port or None, monotonic start, end) of every fault that may break connections.
    breaks: list[tuple[int | None, float, float]] = field(default_factory=list)

    def start_server(self, port: int) -> None:
        proc = self.env.popen("server", [str(port)])
        line = _read_line(proc, 30.0)
        if not line.startswith("{"):
            raise RuntimeError(f"torture server on port {port} did not start: {line!r}")
        self.servers[port] = proc


def _fault_peer_kill(run: Run) -> None:
    port = run.rng.choice(run.ports)
    t0 = time.monotonic()
    proc = run.servers[port]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    time.sleep(run.rng.uniform(0.0, 0.3))
    run.start_server(port)
    run.breaks.append((port, t0, time.monotonic()))


def _fault_agent_restart(run: Run) -> None:
    run.env.kill_agent()
    time.sleep(run.rng.uniform(0.2, 1.0))
    run.env.start_agent()  # live connections must not notice: no break recorded


def _fault_migrate(run: Run) -> None:
    """The clients' guest live-migrates to the other host and back: every live connection
    switches to TCP and up again, and must not lose, double or reorder a byte (no break
    is recorded: any damage counts)."""
    env = run.env
    if not isinstance(env, _LabEnv):
        return
    env.lab.migrate("h1g2", "h2")
    time.sleep(run.rng.uniform(0.1, 0.6))
    env.lab.migrate("h1g2", "h1")


#: Fault kinds by name ("migrate" needs the lab: two hosts).
FAULTS: dict[str, Callable[[Run], None]] = {
    "peer_kill": _fault_peer_kill,
    "agent_restart": _fault_agent_restart,
    "migrate": _fault_migrate,
}


def _read_line(proc: subprocess.Popen[Any], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


class _Env:
    """Where processes run: loopback (a private agent) or lab guests (root)."""

    host = "127.0.0.1"

    def popen(self, role: str, args: list[str]) -> subprocess.Popen[str]:
        raise NotImplementedError

    def kill_agent(self) -> None:
        raise NotImplementedError

    def start_agent(self) -> None:
        raise NotImplementedError

    def namespaces_left(self) -> int:
        return 0

    def close(self) -> None:
        raise NotImplementedError


def _argv(role: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "cosock.torture", role, *args]


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSOCK_")}
    env.update(extra)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


class _Loopback(_Env):
    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="cosock-torture-"))
        self.path = self._dir / "agent.sock"
        self._agent: subprocess.Popen[bytes] | None = None
        self.start_agent()

    def start_agent(self) -> None:
        argv = [sys.executable, "-m", "cosock.agent", "--socket", str(self.path), "--auto"]
        log = open(self._dir / "agent.log", "ab")  # noqa: SIM115 - owned by the child
        with log:
            self._agent = subprocess.Popen(
                argv, env=_child_env({}), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 10
        while not self._answers():
            if time.monotonic() > deadline or self._agent.poll() is not None:
                raise RuntimeError(f"torture agent did not start (see {self._dir}/agent.log)")
            time.sleep(0.02)

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.path))
            except OSError:
                return False
        return True

    def kill_agent(self) -> None:
        if self._agent is not None:
            self._agent.kill()
            self._agent.wait()

    def popen(self, role: str, args: list[str]) -> subprocess.Popen[str]:
        env = _child_env({"COSOCK_AGENT": str(self.path)})
        return subprocess.Popen(
            _argv(role, args),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )

    def close(self) -> None:
        self.kill_agent()
        shutil.rmtree(self._dir, ignore_errors=True)


class _LabEnv(_Env):
    """Servers in guest h1g1, the worker in h1g2, both on host h1 of a fresh lab."""

    def __init__(self) -> None:
        from .lab import Lab

        self.name = f"tt{os.getpid() % 100000}"
        self.lab = Lab.up(self.name, hosts=2, guests=2)  # h2: where "migrate" goes
        self.host = self.lab.guest("h1g1").addresses[0]
        self._agent_pid = self.lab.host("h1").agent_pid
        self._log = Path(tempfile.mkdtemp(prefix="cosock-torture-")) / "agent.log"

    def popen(self, role: str, args: list[str]) -> subprocess.Popen[str]:
        guest = "h1g1" if role == "server" else "h1g2"
        env = _child_env({"COSOCK_AGENT": self.lab.env(guest)["COSOCK_AGENT"]})
        return self.lab.popen(
            guest,
            _argv(role, args),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )

    def kill_agent(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._agent_pid, signal.SIGKILL)
        from .lab import _agents

        proc = _agents._children.pop(self._agent_pid, None)
        if proc is not None:
            proc.wait()

    def start_agent(self) -> None:
        from .lab import _agents

        h = self.lab.host("h1")
        proc = _agents.start(h.name, h.netns, h.agent_socket, self._log)
        _agents.wait_ready([(h.name, proc, h.agent_socket, self._log)])
        self._agent_pid = proc.pid
        for guest in self.lab.guests_of("h1"):
            self.lab._register(guest)

    def namespaces_left(self) -> int:
        from .lab import _netns

        return len(_netns.list_netns(self.name))

    def close(self) -> None:
        from .lab import down

        down(self.name)
        shutil.rmtree(self._log.parent, ignore_errors=True)


@contextlib.contextmanager
def _environment(mode: str) -> Iterator[_Env]:
    if mode == "auto":
        mode = "lab" if os.geteuid() == 0 else "loopback"
    env: _Env = _LabEnv() if mode == "lab" else _Loopback()
    try:
        yield env
    finally:
        env.close()


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tally(
    facts: list[dict[str, Any]], breaks: list[tuple[int | None, float, float]]
) -> dict[str, Any]:
    verified = lost = dup = hangs = 0
    fallbacks: Counter[str] = Counter()
    for f in facts:
        # A connect that failed (its peer just killed) never had a path to fall back from.
        if f["path"] == "tcp" and (f["fallback"] or f["error"] is None):
            fallbacks[f["fallback"] or "unknown"] += 1
        dup += f["extra"]
        down_ok = f["prefix_ok"]
        if f["error"] is None:
            verified += (f["up"] if f["up_ok"] else 0) + (f["down"] if down_ok else 0)
            lost += (0 if f["up_ok"] else f["up"]) + (0 if down_ok else f["down"])
            continue
        excused = any(
            port == f["port"] and start <= f["t1"] + 0.5 and end >= f["t0"] - 0.5
            for port, start, end in breaks
        )
        if f["error"] == "timeout":
            hangs += 1
        if down_ok:
            verified += f["down_got"]
        else:
            lost += f["down_got"]  # a received prefix that differs is corrupt: lost
        if not excused:
            lost += f["down"] - f["down_got"] + (0 if f["up_ok"] else f["up"])
    return {
        "bytes_verified": verified,
        "lost_bytes": lost,
        "duplicated_bytes": dup,
        "hangs": hangs,
        "fallbacks": dict(fallbacks),
    }


def torture(
    seconds: float,
    connections: int = 8,
    seed: int | None = None,
    mode: str = "auto",
    servers: int = 2,
    faults: tuple[str, ...] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run the soak; return the figures (see the module docstring for what counts)."""
    seed = random.randrange(1 << 31) if seed is None else seed
    log(f"seed {seed}")
    rng = random.Random(seed)
    before = _leaks.snapshot()
    counts: Counter[str] = Counter()
    facts: list[dict[str, Any]] = []
    worker_report: dict[str, Any] = {}
    hangs = 0
    with _environment(mode) as env:
        if faults is None:
            faults = ("peer_kill", "agent_restart")
            if isinstance(env, _LabEnv):
                faults += ("migrate",)
        run = Run(env, _free_ports(servers), rng=rng)
        worker: subprocess.Popen[str] | None = None
        try:
            for port in run.ports:
                run.start_server(port)
            argv = [env.host, ",".join(map(str, run.ports)), str(seconds), str(connections)]
            worker = env.popen("worker", [*argv, str(seed)])
            stream = worker.stdout
            assert stream is not None
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.extend(stream), daemon=True)
            reader.start()
            deadline = time.monotonic() + seconds
            order = list(faults)  # each kind at least once, then at random
            while time.monotonic() < deadline - 0.5:
                time.sleep(rng.uniform(0.2, min(1.5, seconds / 4)))
                if time.monotonic() >= deadline - 0.5:
                    break
                kind = order.pop(0) if order else rng.choice(faults)
                log(f"fault: {kind}")
                FAULTS[kind](run)
                counts[kind] += 1
            try:
                worker.wait(seconds + 4 * _IO_TIMEOUT + 30)
            except subprocess.TimeoutExpired:
                hangs += 1
                worker.kill()
                worker.wait()
            reader.join(10)
            for line in lines:
                msg = json.loads(line)
                if msg.get("done"):
                    worker_report = msg
                else:
                    facts.append(msg)
        finally:
            for proc in [*run.servers.values(), *([worker] if worker else [])]:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
    figures = _tally(facts, run.breaks)
    counts["half_close"] = sum(1 for f in facts if f["half"])
    hangs += figures.pop("hangs") + int(worker_report.get("stuck", 0))
    hangs += 0 if worker_report else 1  # the worker never reported: it hung or crashed
    mine = _leaks.settled_leaks(before, _leaks.snapshot)
    theirs = worker_report.get("leaks", {})
    leaks = {k: len(mine[k]) + int(theirs.get(k, 0)) for k in ("fds", "memfds", "threads")}
    leaks["processes"] = len(mine["processes"])
    leaks["namespaces"] = env.namespaces_left()
    return {
        "connections": len(facts),
        "bytes_verified": figures["bytes_verified"],
        "faults": dict(counts),
        "fallbacks": figures["fallbacks"],
        "lost_bytes": figures["lost_bytes"],
        "duplicated_bytes": figures["duplicated_bytes"],
        "hangs": hangs,
        "leaks": leaks,
    }


def _main(argv: list[str]) -> None:
    role, args = argv[0], argv[1:]
    if role == "server":
        serve(int(args[0]))
    elif role == "worker":
        ports = [int(p) for p in args[1].split(",")]
        work(args[0], ports, float(args[2]), int(args[3]), int(args[4]))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    _main(sys.argv[1:])
