"""Where the bench's programs run: guests of a lab it builds itself (root), or processes on
loopback with a private agent (no root).

Roles, the same in both worlds: ``SERVER`` (h1g1) runs every server; ``NEAR`` (h1g2, on
the same host) runs the co-resident clients; ``FAR`` (h2g1, another host) runs the client
of ``cosock-remote``.  On loopback there is no other host, so the far client is a
loopback client with ``COSOCK_LOOPBACK=0``: cosock must then choose TCP, as it must for a
guest on another host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .. import _config
from .._run import HOOK_DIR, PACKAGE_PARENT, run_env
from ._proc import JsonProc

SERVER, NEAR, FAR = "h1g1", "h1g2", "h2g1"
WORKER = [sys.executable, "-m", "cosock.bench._worker"]

Spawn = Callable[[str, list[str], dict[str, str], IO[Any]], "subprocess.Popen[str]"]


@dataclass
class World:
    """Guests to run programs in, and how to reach the server guest."""

    mode: str  # "lab" or "loopback"
    server_ip: str
    tmp: Path
    spawn_in: Spawn
    base_env: Callable[[str], dict[str, str]]
    far_extra: dict[str, str] = field(default_factory=dict)
    procs: list[JsonProc] = field(default_factory=list)
    #: Pin the server guest's programs to one CPU and the others to another (netperf -T).
    pin: bool = False
    #: The ``Lab`` in lab mode (the migration bench moves its guests), else None.
    lab: Any = None

    def env(self, guest: str, cosock: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment of a program in ``guest``: with cosock enabled (``cosock run``'s
        environment) or explicitly without it, whatever this process was started with."""
        env = self.base_env(guest)
        env.pop(_config.ENV_ENABLE, None)
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        parts = [p for p in parts if Path(p).resolve() != HOOK_DIR]
        env["PYTHONPATH"] = os.pathsep.join([*parts, str(PACKAGE_PARENT)])
        env.update(extra or {})
        return run_env(env, start_agent=False) if cosock else env

    def start(self, name: str, guest: str, argv: list[str], env: dict[str, str]) -> JsonProc:
        """Start a JSON-lines program in ``guest``; it is stopped when the world closes."""
        log = self.tmp / f"{name}.stderr"
        with open(log, "w") as err:
            proc = JsonProc(name, self.spawn_in(guest, argv, env, err), log)
        self.procs.append(proc)
        cpus = sorted(os.sched_getaffinity(0))
        if self.pin and len(cpus) >= 2:
            os.sched_setaffinity(proc.proc.pid, {cpus[0] if guest == SERVER else cpus[1]})
        return proc

    def stop_all(self) -> None:
        while self.procs:
            self.procs.pop().stop()


def _pipes(err: IO[Any]) -> dict[str, Any]:
    """Popen arguments of a JSON-lines program: line-buffered text pipes, stderr to a log."""
    return {
        "stdin": subprocess.PIPE,
        "stdout": subprocess.PIPE,
        "stderr": err,
        "text": True,
        "bufsize": 1,
    }


@contextmanager
def lab_world(name: str) -> Iterator[World]:
    """A lab of 2 hosts x 2 guests named ``name``, built now and torn down at the end."""
    from ..lab import Lab, down

    down(name)  # a lab left by a crashed run: ours to replace
    lab = Lab.up(name, hosts=2, guests=2)
    tmp = Path(tempfile.mkdtemp(prefix="cosock-bench-"))
    os.chmod(tmp, 0o755)
    world: World | None = None
    try:

        def spawn(
            guest: str, argv: list[str], env: dict[str, str], err: IO[Any]
        ) -> subprocess.Popen[str]:
            return lab.popen(guest, argv, env=env, **_pipes(err))

        world = World("lab", lab.guest(SERVER).address, tmp, spawn, lab.env, lab=lab)
        yield world
    finally:
        if world is not None:
            world.stop_all()
        try:
            lab.down()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def loopback_world() -> Iterator[World]:
    """Processes on 127.0.0.1 with a private agent of their own (no root needed)."""
    from ..agent.server import private_agent

    world: World | None = None
    with private_agent("cosock-bench-") as agent:
        try:

            def spawn(
                _guest: str, argv: list[str], env: dict[str, str], err: IO[Any]
            ) -> subprocess.Popen[str]:
                return subprocess.Popen(argv, env=env, **_pipes(err))

            def base_env(_guest: str) -> dict[str, str]:
                return {**os.environ, _config.ENV_AGENT: str(agent)}

            world = World(
                "loopback",
                "127.0.0.1",
                agent.parent,
                spawn,
                base_env,
                far_extra={_config.ENV_LOOPBACK: "0"},
            )
            yield world
        finally:
            if world is not None:
                world.stop_all()


@contextmanager
def open_world(mode: str = "auto", lab_name: str = "bench") -> Iterator[World]:
    """``lab`` (root), ``loopback``, or ``auto``: the lab when root, loopback otherwise."""
    if mode == "auto":
        mode = "lab" if os.geteuid() == 0 else "loopback"
    if mode == "lab":
        with lab_world(lab_name) as world:
            yield world
    elif mode == "loopback":
        with loopback_world() as world:
            yield world
    else:
        raise ValueError(f"unknown bench mode {mode!r}: expected auto, lab or loopback")
