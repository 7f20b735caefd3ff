"""Run unmodified programs (``app_programs.py``, uvicorn, aiohttp.web) under ``cosock run``
in two kinds of world, and read back from the agents which path their connections took.

- ``loopback``: processes on 127.0.0.1 with the test's private agent (no root).  The
  server and the *near* client are co-resident; the *far* client runs with
  ``COSOCK_LOOPBACK=0``, which makes cosock choose TCP exactly as for another host.
- ``lab`` (root): a lab of 2 hosts x 2 guests; server in h1g1, near client in h1g2 (same
  host), far client in h2g1 (other host).
- ``qemu`` (root, QEMU): the same places in a QEMU lab's VMs (the module's shared lab).  The
  host agents list the connections inside their VMs from the VMs' census reports (pids as the
  VM sees them, as ``GuestPopen.pid`` is); waits are scaled by the lab's ``timeout_factor``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosock.agent.client import connections

TESTS = Path(__file__).resolve().parent
#: The package's source, on PYTHONPATH for a VM (no editable install in its root image).
SRC = str(TESTS.parent / "src")
PROGS = str(TESTS / "app_programs.py")
COSOCK_RUN = [sys.executable, "-m", "cosock", "run", "--"]
PY = sys.executable

Row = dict[str, Any]


@dataclass
class Place:
    """Where a program runs: a lab guest (or this machine) and extra environment."""

    name: str
    guest: str | None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class World:
    mode: str
    server_host: str
    server: Place
    near: Place
    far: Place
    agents: list[Path]
    logs: Path
    spawn: Callable[..., subprocess.Popen[Any]]
    #: Scale for waits (never for what is checked): a QEMU lab's under TCG.
    timeout_factor: float = 1.0
    #: Reads a place's log: this machine's file, or a file in a VM (see :func:`qemu_world`).
    read_log: Callable[[Place, Path], str] = lambda _place, log: log.read_text(errors="replace")
    #: The lab the world's places are in (None on loopback), for ``conftest.skip_on_qemu``.
    lab: Any = None
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    drains: list[threading.Thread] = field(default_factory=list)
    _ports: Iterator[int] = field(default_factory=lambda: iter(range(7600, 7700)))

    def port(self) -> int:
        """A port for a server: a free one on loopback, the next fixed one in a guest."""
        if self.mode in ("lab", "qemu"):
            return next(self._ports)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            return port

    def popen(
        self, place: Place, argv: list[str], cosock: bool = True, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        env = {**place.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), SRC, _pp()]))}
        env.update(kwargs.pop("env", {}))
        proc = self.spawn(place, [*COSOCK_RUN, *argv] if cosock else argv, env, **kwargs)
        self.procs.append(proc)
        return proc

    def serve(
        self, argv: list[str], ready: str = r'\{"listening"', cosock: bool = True
    ) -> subprocess.Popen[Any]:
        """Start a server in the server place; its output goes to a log, watched for
        ``ready``."""
        log = self.logs / f"server-{len(self.procs)}.log"
        if self.mode == "qemu":  # output comes through a pipe: copied to the log
            proc = self.popen(
                self.server, argv, cosock, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            self._drain(proc, log)
        else:
            with open(log, "wb") as out:
                proc = self.popen(self.server, argv, cosock, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30 * self.timeout_factor
        while not re.search(ready, log.read_text(errors="replace")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {log.read_text(errors='replace')}")
            time.sleep(0.05)
        return proc

    def _drain(self, proc: subprocess.Popen[Any], log: Path) -> None:
        """Copy ``proc``'s stdout into ``log`` until it ends (the server is killed at the end)."""
        out = proc.stdout
        assert out is not None
        log.touch()

        def copy() -> None:
            with open(log, "ab", buffering=0) as f:
                while data := os.read(out.fileno(), 1 << 16):
                    f.write(data)

        thread = threading.Thread(target=copy, name=f"drain-{log.name}")
        thread.start()
        self.drains.append(thread)

    def rows(self) -> list[Row]:
        """Every connection the world's agents list (each with its process's pid)."""
        out = []
        for agent in self.agents:
            for proc in connections(agent)["processes"]:
                out.extend({**c, "pid": proc["pid"]} for c in proc["connections"])
        return out

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10 * self.timeout_factor)
        for thread in self.drains:
            thread.join(10 * self.timeout_factor)
        for proc in self.procs:
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    f.close()


def _pp() -> str:
    return os.environ.get("PYTHONPATH", "")


class Client:
    """A client program that reports one JSON line and holds its connections until told."""

    def __init__(self, world: World, place: Place, argv: list[str], cosock: bool = True) -> None:
        self.world, self.place = world, place
        self.log = world.logs / f"client-{len(world.procs)}.log"
        pipes: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        if world.mode == "qemu":  # stderr into a file in the VM (its /tmp), read back on error
            self.proc = world.popen(place, _stderr_to(self.log, argv, cosock), False, **pipes)
            return
        with open(self.log, "wb") as err:
            self.proc = world.popen(place, argv, cosock, stderr=err, **pipes)

    def _log(self) -> str:
        return self.world.read_log(self.place, self.log)

    def read(self, timeout: float = 60) -> dict[str, Any]:
        timeout *= self.world.timeout_factor
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            raise TimeoutError(f"client silent for {timeout} s: {self._log()}")
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"client exited {self.proc.wait(10)}: {self._log()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def finish(self, timeout: float = 30) -> list[dict[str, Any]]:
        """Let it close its connections and exit; returns any further JSON lines."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()
        rest = self.proc.stdout.read()
        code = self.proc.wait(timeout * self.world.timeout_factor)
        assert code == 0, f"client exited {code}: {self._log()}"
        return [json.loads(line) for line in rest.splitlines() if line.strip()]


def _stderr_to(log: Path, argv: list[str], cosock: bool) -> list[str]:
    """``argv`` (under ``cosock run``) with its stderr going to /tmp/<log's name> in the VM."""
    inner = [*COSOCK_RUN, *argv] if cosock else argv
    return ["/bin/sh", "-c", 'exec "$@" 2>"$0"', f"/tmp/{log.name}", *inner]


def wait_rows(
    world: World,
    server_port: int,
    client_ports: set[int],
    check: Callable[[Row, Row], bool] = lambda c, s: True,
    timeout: float = 15,
) -> list[tuple[Row, Row]]:
    """(client row, server row) for each client port, once every pair is listed and
    passes ``check`` (the census publishes about once a second)."""
    deadline = time.monotonic() + timeout * world.timeout_factor
    while True:
        rows = world.rows()
        pairs = []
        for port in sorted(client_ports):
            c = [r for r in rows if r["local_port"] == port and r["peer_port"] == server_port]
            s = [r for r in rows if r["local_port"] == server_port and r["peer_port"] == port]
            if len(c) == 1 and len(s) == 1 and check(c[0], s[0]):
                pairs.append((c[0], s[0]))
        if len(pairs) == len(client_ports):
            return pairs
        if time.monotonic() > deadline:
            mine = [r for r in rows if server_port in (r["local_port"], r["peer_port"])]
            raise AssertionError(f"ports {client_ports} to {server_port}: rows {mine}")
        time.sleep(0.2)


def rows_where(world: World, match: Callable[[Row], bool], timeout: float = 15) -> list[Row]:
    """The rows that ``match``, once there are any (or none after ``timeout``)."""
    deadline = time.monotonic() + timeout * world.timeout_factor
    while True:
        found = [r for r in world.rows() if match(r)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def both_ends(
    world: World,
    client_port: int,
    path: str = "shm",
    check: Callable[[Row, Row], bool] = lambda c, s: True,
    timeout: float = 15,
) -> tuple[Row, Row]:
    """The rows of both ends of the connection from ``client_port``, once both are listed
    on ``path`` and pass ``check`` (counts in the census may lag a second behind)."""
    deadline = time.monotonic() + timeout * world.timeout_factor
    while True:
        rows = world.rows()
        c = [r for r in rows if r["local_port"] == client_port]
        s = [
            r
            for r in rows
            if r["peer_port"] == client_port and c and r["local_port"] == c[0]["peer_port"]
        ]
        if len(c) == len(s) == 1 and c[0]["path"] == s[0]["path"] == path and check(c[0], s[0]):
            return c[0], s[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"connection from port {client_port} not on {path}: {c} {s}")
        time.sleep(0.2)


def loopback_world(agent: Path, logs: Path) -> World:
    def spawn(place: Place, argv: list[str], env: dict[str, str], **kw: Any) -> Any:
        return subprocess.Popen(argv, env={**os.environ, **env}, **kw)

    return World(
        "loopback",
        "127.0.0.1",
        Place("server", None),
        Place("near", None),
        Place("far", None, {"COSOCK_LOOPBACK": "0"}),
        [agent],
        logs,
        spawn,
    )


def lab_world(lab: Any, logs: Path) -> World:
    def spawn(place: Place, argv: list[str], env: dict[str, str], **kw: Any) -> Any:
        return lab.popen(place.guest, argv, env=env, **kw)

    return World(
        "lab",
        lab.guest("h1g1").address,
        Place("server", "h1g1"),
        Place("near", "h1g2"),
        Place("far", "h2g1"),
        [lab.host("h1").agent_socket, lab.host("h2").agent_socket],
        logs,
        spawn,
        lab=lab,
    )


def qemu_world(lab: Any, logs: Path) -> World:
    """The lab world's places in a QEMU lab's VMs.  A VM cannot write into ``logs``: a
    server's output comes through its pipe, a client's stderr goes to a file in its VM."""

    def spawn(place: Place, argv: list[str], env: dict[str, str], **kw: Any) -> Any:
        return lab.popen(place.guest, argv, env=env, **kw)

    def read_log(place: Place, log: Path) -> str:
        if log.exists():
            return log.read_text(errors="replace")
        try:
            got = lab.run(place.guest, ["cat", f"/tmp/{log.name}"], timeout=60)
        except Exception as exc:  # the VM is gone: say so instead of the log
            return f"(log /tmp/{log.name} in {place.guest} unreadable: {exc})"
        return str(got.stdout.decode(errors="replace") + got.stderr.decode(errors="replace"))

    # The VM's command server does not pass this machine's environment on (the servers'
    # "ready" lines are print()s: block-buffered into a pipe without this).
    unbuffered = {"PYTHONUNBUFFERED": "1"}
    return World(
        "qemu",
        lab.guest("h1g1").address,
        Place("server", "h1g1", dict(unbuffered)),
        Place("near", "h1g2", dict(unbuffered)),
        Place("far", "h2g1", dict(unbuffered)),
        [lab.host("h1").agent_socket, lab.host("h2").agent_socket],
        logs,
        spawn,
        timeout_factor=lab.timeout_factor,
        read_log=read_log,
        lab=lab,
    )


@contextlib.contextmanager
def stopping(world: World) -> Iterator[World]:
    try:
        yield world
    finally:
        world.stop_all()
