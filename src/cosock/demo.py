"""``cosock demo``: real guests, real traffic, the path each connection took, the speed-up.

As root the guests are network namespaces of a lab (two hosts, two guests each): an
ordinary stdlib server runs in h1g1 under ``cosock run``; a co-resident client in h1g2
(shared memory), a client on the other host in h2g1 (plain TCP: not co-resident) and a
client without cosock in h1g2 (plain TCP) each move the same payload both ways with a
sha256 check.  Without root the guests are processes on loopback with a private agent,
and "another host" is played by a client with loopback acceleration switched off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table

from ._run import run_env

PORT = 7000
_APP = [sys.executable, "-m", "cosock._demo_apps"]

Spawn = Callable[[str, list[str], dict[str, str]], subprocess.Popen[str]]


def _start_server(spawn: Spawn, where: str, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = spawn(where, [*_APP, "server", "--port", str(PORT)], env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("{"):
        proc.kill()
        raise RuntimeError(
            f"demo server did not start: {line!r} {proc.stderr and proc.stderr.read()}"
        )
    return proc


def _client(spawn: Spawn, where: str, env: dict[str, str], host: str, size: int) -> dict[str, Any]:
    proc = spawn(
        where, [*_APP, "client", "--host", host, "--port", str(PORT), "--bytes", str(size)], env
    )
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"demo client in {where} failed: {err.strip().splitlines()[-1:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


@contextmanager
def _lab_world(name: str) -> Iterator[tuple[Spawn, dict[str, Any]]]:
    from .lab import Lab, LabNotFound, down

    try:
        down(name)
    except LabNotFound:
        pass
    lab = Lab.up(name, hosts=2, guests=2)
    try:

        def spawn(guest: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
            return lab.popen(
                guest, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )

        g = {x.name: x for x in lab.guests}
        world = {
            "server": ("h1g1", g["h1g1"].addresses[0]),
            "env": lab.env,
            "clients": [
                ("h1g2 (same host, cosock)", "h1g2", True, {}),
                ("h2g1 (other host, cosock)", "h2g1", True, {}),
                ("h1g2 (same host, plain TCP)", "h1g2", False, {}),
            ],
        }
        yield spawn, world
    finally:
        lab.down()


@contextmanager
def _loopback_world() -> Iterator[tuple[Spawn, dict[str, Any]]]:
    from .agent.server import private_agent

    with private_agent("cosock-demo-") as agent:

        def spawn(_where: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
            return subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )

        def env(_guest: str) -> dict[str, str]:
            return {**os.environ, "COSOCK_AGENT": str(agent)}

        world = {
            "server": ("loopback", "127.0.0.1"),
            "env": env,
            "clients": [
                ("loopback client (cosock)", "loopback", True, {}),
                (
                    "loopback client (cosock, COSOCK_LOOPBACK=0)",
                    "loopback",
                    True,
                    {"COSOCK_LOOPBACK": "0"},
                ),
                ("loopback client (plain TCP)", "loopback", False, {}),
            ],
        }
        yield spawn, world


def run_demo(size: int, quiet: bool = False, lab_name: str = "demo") -> dict[str, Any]:
    """Run the demo; returns ``{"connections": [...], "speedup": x}``."""
    console = Console(stderr=True, quiet=quiet)
    as_root = os.geteuid() == 0
    world_cm = _lab_world(lab_name) if as_root else _loopback_world()
    console.print(
        "[bold]cosock demo[/]: "
        + (
            "lab of 2 hosts x 2 guests (network namespaces)"
            if as_root
            else "loopback guests (no root)"
        )
    )
    rows: list[dict[str, Any]] = []
    with world_cm as (spawn, world):
        where, server_ip = world["server"]
        base = world["env"](where)
        server = _start_server(spawn, where, run_env(base, start_agent=False))
        try:
            for label, guest, use, extra in world["clients"]:
                env = {**world["env"](guest), **extra}
                if use:
                    env = run_env(env, start_agent=False)
                with console.status(f"{label}: moving {size >> 20} MiB each way"):
                    result = _client(spawn, guest, env, server_ip, size)
                rows.append({"client": label, "server": f"{where} {server_ip}:{PORT}", **result})
        finally:
            server.kill()
            server.wait()
    shm = [r for r in rows if r["path"] == "shm"]
    base_rows = [r for r in rows if "plain" in r["client"]]
    speedup = shm[0]["MBps"] / base_rows[0]["MBps"] if shm and base_rows else 0.0
    table = Table(title="cosock demo: same payload, each way, sha256-verified")
    for col in ("connection", "path", "bytes", "verified", "MB/s"):
        table.add_column(col, justify="right" if col in ("bytes", "MB/s") else "left")
    for r in rows:
        table.add_row(
            r["client"],
            r["path"],
            f"{r['bytes']:,}",
            "yes" if r["verified"] else "NO",
            f"{r['MBps']:.0f}",
        )
    console.print(table)
    console.print(
        "speed-up of shared memory over plain TCP between co-resident guests: "
        f"[bold]{speedup:.1f}x[/]"
    )
    connections = [
        {k: r[k] for k in ("client", "server", "path", "bytes", "verified", "MBps")} for r in rows
    ]
    return {"connections": connections, "speedup": speedup}
