"""Unmodified third-party programs under ``cosock run``: uvicorn (asyncio loop, h11) with
httpx and requests, aiohttp server with aiohttp client, between two co-resident guests
(shared memory, checked in the agents' ``connections`` op) and between guests that are not
(plain TCP) -- with byte-exact bodies: large, keep-alive, chunked/streamed, uploads.

The loopback world needs no root; the lab world (real network namespaces) runs as root, and
so does the qemu world (the same places in real QEMU VMs: the module's shared lab, marked
``vm``).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app_programs import expected
from apprun import (
    PROGS,
    PY,
    Client,
    World,
    lab_world,
    loopback_world,
    qemu_world,
    stopping,
    wait_rows,
)
from conftest import IS_ROOT, QEMU_MARKS, backend_lab

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
pytest.importorskip("aiohttp")
pytest.importorskip("requests")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["loopback", "lab", pytest.param("qemu", marks=QEMU_MARKS)])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    if request.param == "qemu":
        made = qemu_world(backend_lab(request), tmp_path)
    elif request.param == "lab":
        if not IS_ROOT:
            pytest.skip("needs root: the lab creates network namespaces")
        lab = request.getfixturevalue("lab")
        made = lab_world(lab, tmp_path)
    else:
        made = loopback_world(request.getfixturevalue("cosock_agent"), tmp_path)
    with stopping(made) as w:
        yield w


def uvicorn_server(world: World, loop: str = "asyncio") -> tuple[Any, int]:
    port = world.port()
    argv = [PY, "-m", "uvicorn", "app_programs:asgi_app", "--host", world.server_host]
    argv += ["--port", str(port), "--loop", loop, "--http", "h11", "--lifespan", "off"]
    argv += ["--no-access-log", "--timeout-keep-alive", "120"]
    return world.serve(argv, ready="Uvicorn running on"), port


def aiohttp_server(world: World) -> tuple[Any, int]:
    port = world.port()
    argv = [PY, "-m", "aiohttp.web", "-H", world.server_host, "-P", str(port)]
    return world.serve([*argv, "app_programs:aiohttp_app"], ready="Running on"), port


SERVERS: dict[str, Callable[[World], tuple[Any, int]]] = {
    "uvicorn": uvicorn_server,
    "aiohttp": aiohttp_server,
}


def start_client(world: World, place: str, client: str, port: int) -> Client:
    where = world.near if place == "near" else world.far
    return Client(world, where, [PY, PROGS, client, world.server_host, str(port)])


def check_exchange(world: World, prog: Client, client: str, port: int, want_path: str) -> None:
    """Every body exact, one keep-alive connection, listed by the agents on ``want_path``
    at both ends with the bytes that crossed it; then the client closes and exits 0."""
    report = prog.read()
    assert report["bodies"] == expected(), client
    ports = {int(p) for p in report["ports"]}
    assert len(ports) == 1, f"{client} did not keep its connection alive: {ports}"

    total = sum(n for n, _sha in expected().values())

    def settled(c: dict[str, Any], s: dict[str, Any]) -> bool:
        if not c["path"] == s["path"] == want_path:
            return False
        # Headers ride along: at least the bodies crossed the connection, each way (the
        # census may lag a second behind: wait for the final counts).
        return want_path != "shm" or (
            c["bytes_received"] >= total
            and s["bytes_sent"] == c["bytes_received"]
            and s["bytes_received"] == c["bytes_sent"] >= 1048609
        )

    ((c, s),) = wait_rows(world, port, ports, settled)
    if want_path == "shm" and client == "httpx":
        # The same through the user's tool: `cosock status --json` of the server's agent.
        out = subprocess.run(
            [PY, "-m", "cosock", "status", "--json", "--socket", str(world.agents[0])],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        listed = {
            (r["local_port"], r["peer_port"]): r["path"]
            for p in json.loads(out.stdout)["processes"]
            for r in p["connections"]
        }
        assert listed[(c["local_port"], port)] == listed[(port, c["local_port"])] == "shm"
    if want_path == "shm":
        assert c["accelerated"] and s["accelerated"]
        assert c["fallback_reason"] is None and s["fallback_reason"] is None
        assert c["switches"] == s["switches"] == 0
    else:
        assert not c["accelerated"] and not s["accelerated"]
        assert c["bytes_sent"] is None  # plain TCP: not counted
        far_reason = "loopback-disabled" if world.mode == "loopback" else "not-coresident"
        assert c["fallback_reason"] == far_reason
        assert s["fallback_reason"] == "no-offer"
    prog.finish()


#: (server, client) pairs, each run from a co-resident guest and from one that is not.
PAIRS = [("uvicorn", "httpx"), ("aiohttp", "aiohttp"), ("uvicorn", "requests")]


def test_http_apps_co_resident_on_shm_and_apart_on_tcp(world: World) -> None:
    """All pairs at once (both servers, six clients), to keep the wall time down."""
    ports = {name: start(world)[1] for name, start in SERVERS.items()}
    runs = [
        (place, client, ports[server], start_client(world, place, client, ports[server]))
        for server, client in PAIRS
        for place in ("near", "far")
    ]
    for place, client, port, prog in runs:
        check_exchange(world, prog, client, port, "shm" if place == "near" else "tcp")
