"""uvloop under ``cosock run``: libuv makes and drives its own sockets, so cosock never
sees them.  Such programs keep working on plain TCP, and ``cosock status`` (the agent's
``connections`` op) shows the other end's connection as not accelerated while the uvloop
end is not listed at all.  ``--loop asyncio`` gets the acceleration back (test_apps.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app_programs import expected
from apprun import PROGS, PY, Client, World, loopback_world, rows_where, stopping
from test_apps import uvicorn_server

pytest.importorskip("uvloop")
pytest.importorskip("uvicorn")
pytest.importorskip("aiohttp")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def world(cosock_agent: Path, tmp_path: Path) -> Iterator[World]:
    with stopping(loopback_world(cosock_agent, tmp_path)) as w:
        yield w


def _listed_ports(world: World) -> set[int]:
    return {r["local_port"] for r in world.rows()}


def test_uvloop_server_and_client_stay_on_plain_tcp_and_status_says_so(world: World) -> None:
    """uvicorn --loop uvloop serving a cosock client (httpx), and asyncio streams on uvloop
    talking to uvicorn --loop asyncio: exact bodies; the CoSocket end of each connection is
    listed on tcp with its reason, the uvloop end is absent."""
    _uv, uv_port = uvicorn_server(world, loop="uvloop")
    _asy, asy_port = uvicorn_server(world, loop="asyncio")
    to_uvloop = Client(world, world.near, [PY, PROGS, "httpx", world.server_host, str(uv_port)])
    from_uvloop = Client(
        world, world.near, [PY, PROGS, "uvloop-streams", world.server_host, str(asy_port)]
    )
    r1, r2 = to_uvloop.read(), from_uvloop.read()
    assert r1["bodies"] == expected()
    assert r2["bodies"] == {k: v for k, v in expected().items() if k in r2["bodies"]}
    assert len(r2["bodies"]) == 4 and r2["sock"] == "PseudoSocket"  # libuv's, not ours
    (p1,), (p2,) = ({int(p) for p in r["ports"]} for r in (r1, r2))

    # httpx (CoSocket) -> uvloop server: the server registered no listener, so the client
    # chose TCP; the server's end is libuv's and not listed.
    (c,) = rows_where(world, lambda r: (r["local_port"], r["peer_port"]) == (p1, uv_port))
    assert (c["path"], c["accelerated"], c["fallback_reason"]) == ("tcp", False, "not-coresident")
    # uvloop client -> cosock server: no offer came, the server's end is plain TCP.
    (s,) = rows_where(world, lambda r: (r["local_port"], r["peer_port"]) == (asy_port, p2))
    assert (s["path"], s["accelerated"], s["fallback_reason"]) == ("tcp", False, "no-offer")
    rows = world.rows()
    assert not [r for r in rows if r["local_port"] in (uv_port, p2)], rows
    assert not [r for r in rows if r["path"] == "shm"], rows
    to_uvloop.finish()
    from_uvloop.finish()


@pytest.mark.xfail(
    strict=False,
    reason="BUG: a CoSocket connected from Python and handed to uvloop (aiohttp's client "
    "makes its socket with socket.socket and connects it with loop.sock_connect, which "
    "uvloop runs as sock.connect(): CoSocket.connect then offers a channel and sends HELLO) "
    "is driven by libuv on the raw fd: the request goes out as plain TCP bytes while the "
    "server reads frames, and the client reads the server's control frames as HTTP "
    "('Bad status line')",
)
def test_aiohttp_client_on_uvloop_talks_to_a_cosock_server(world: World) -> None:
    _srv, port = uvicorn_server(world, loop="asyncio")
    client = Client(world, world.near, [PY, PROGS, "aiohttp-uvloop", world.server_host, str(port)])
    report = client.read()
    client.finish()
    assert report["bodies"] == expected()


@pytest.mark.xfail(
    strict=False,
    reason="BUG: a listening CoSocket made in Python and handed to uvloop "
    "(loop.create_server(sock=...), as gunicorn + uvicorn workers and uvicorn --fd do) is "
    "registered with the agent by its listen(), but libuv accepts on the fd without "
    "CoSocket.accept: a cosock client's offer is never answered and its in-band HELLO "
    "reaches the application as data, so the connection breaks ('unknown frame type')",
)
def test_python_listener_handed_to_uvloop_serves_cosock_clients(world: World) -> None:
    port = world.port()
    world.serve([PY, PROGS, "uvloop-sock-server", world.server_host, str(port)])
    client = Client(world, world.near, [PY, PROGS, "upper", world.server_host, str(port)])
    got = client.read()["got"]
    client.finish()
    assert got == "HELLO UVLOOP\n"
