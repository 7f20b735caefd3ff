"""uvloop under ``cosock run``: libuv makes and drives its own sockets, so cosock never
sees them.  Such programs keep working on plain TCP, and ``cosock status`` (the agent's
``connections`` op) shows the other end's connection as not accelerated, with its reason,
and the uvloop end from the kernel's table (``unmanaged``, ``not-intercepted``).
``--loop asyncio`` gets the acceleration back (test_apps.py).
CoSockets made in Python and handed to uvloop are kept plain by the guard in
``cosock._uvloop`` (they used to break the connection)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from app_programs import expected
from apprun import PROGS, PY, Client, World, both_ends, loopback_world, rows_where, stopping
from cosock.agent.client import connections
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
    listed on tcp with its reason, the uvloop end only among the connections cosock
    cannot see (the kernel's table), with its pid."""
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
    plain = connections(world.agents[0])["unmanaged"]
    (u1,) = [r for r in plain if (r["local_port"], r["peer_port"]) == (uv_port, p1)]
    (u2,) = [r for r in plain if (r["local_port"], r["peer_port"]) == (p2, asy_port)]
    assert (u1["pid"], u2["pid"]) == (_uv.pid, from_uvloop.proc.pid)
    for u in (u1, u2):
        assert (u["path"], u["accelerated"], u["fallback_reason"]) == (
            "tcp",
            False,
            "not-intercepted",
        )
    # The CoSocket ends are the census's, not listed again.
    assert not [
        r for r in plain if (r["local_port"], r["peer_port"]) in ((p1, uv_port), (asy_port, p2))
    ]
    to_uvloop.finish()
    from_uvloop.finish()


def test_aiohttp_client_on_uvloop_talks_to_a_cosock_server(world: World) -> None:
    """aiohttp's client makes its socket with ``socket.socket`` (a CoSocket) and connects
    it with ``loop.sock_connect``; on uvloop that used to offer a channel and then write
    plain bytes (broken).  The uvloop guard connects it plainly: exact bodies, and the
    server's end is listed on tcp (``no-offer``)."""
    _srv, port = uvicorn_server(world, loop="asyncio")
    client = Client(world, world.near, [PY, PROGS, "aiohttp-uvloop", world.server_host, str(port)])
    report = client.read()
    assert report["bodies"] == expected()
    (p,) = (int(x) for x in report["ports"])
    (s,) = rows_where(world, lambda r: (r["local_port"], r["peer_port"]) == (port, p))
    assert (s["path"], s["accelerated"], s["fallback_reason"]) == ("tcp", False, "no-offer")
    assert not rows_where(world, lambda r: r["local_port"] == p, timeout=1)
    client.finish()
    assert "Traceback" not in client.log.read_text()


def test_python_listener_handed_to_uvloop_serves_cosock_clients(world: World) -> None:
    """A listener made and listened in Python, then given to uvloop's
    ``create_server(sock=...)`` (gunicorn + uvicorn workers, ``uvicorn --fd``): the guard
    withdraws it from the agent, so a cosock client chooses TCP instead of offering a
    channel that libuv would never answer."""
    port = world.port()
    world.serve([PY, PROGS, "uvloop-sock-server", world.server_host, str(port)])
    client = Client(world, world.near, [PY, PROGS, "upper", world.server_host, str(port)])
    got = client.read()["got"]
    assert got == "HELLO UVLOOP\n"
    (c,) = rows_where(world, lambda r: r["peer_port"] == port)
    assert (c["path"], c["fallback_reason"]) == ("tcp", "not-coresident")
    client.finish()


def test_accelerated_socket_handed_to_uvloop(world: World) -> None:
    """A connection made (and accelerated) in Python, then given to uvloop
    (``open_connection(sock=...)``): its bytes used to be in the rings, which libuv cannot
    read (the client read one doorbell byte, then nothing).  The guard downgrades it first:
    exact bodies on plain TCP, and both ends are listed on tcp, ``handed-over``."""
    _srv, port = uvicorn_server(world, loop="asyncio")
    argv = [PY, PROGS, "uvloop-streams-sock", world.server_host, str(port)]
    client = Client(world, world.near, argv)
    report = client.read(timeout=30)
    assert report["bodies"] == {k: v for k, v in expected().items() if k in report["bodies"]}
    assert len(report["bodies"]) == 4
    (p,) = (int(x) for x in report["ports"])
    both_ends(
        world, p, "tcp", lambda c, s: c["fallback_reason"] == s["fallback_reason"] == "handed-over"
    )
    client.finish()
    assert "Traceback" not in client.log.read_text()


def test_accepted_socket_handed_to_uvloop(world: World) -> None:
    """The server side: a connection accepted in Python on a co-resident pair, then given
    to uvloop's ``connect_accepted_socket``; a cosock client (CoSocket, blocking) talks to
    it across the hand-over and sees one exact byte stream."""
    port = world.port()
    world.serve([PY, PROGS, "uvloop-accepted", world.server_host, str(port)])
    client = Client(world, world.near, [PY, PROGS, "upper-many", world.server_host, str(port)])
    report = client.read(timeout=30)
    assert report == {"ok": True, "server_path_before": "shm", "path": "tcp"}, report
    (c,) = rows_where(world, lambda r: r["peer_port"] == port)
    both_ends(
        world,
        c["local_port"],
        "tcp",
        lambda c, s: c["fallback_reason"] == s["fallback_reason"] == "handed-over",
    )
    client.finish()


def test_guard_is_installed_on_import_and_removed_exactly() -> None:
    code = textwrap.dedent(
        """
        import cosock
        cosock.enable()
        import uvloop  # imported after enable(): patched on import
        names = ("sock_connect", "create_server", "create_connection",
                 "connect_accepted_socket")
        assert all(k in uvloop.Loop.__dict__ for k in names)
        cosock.disable()
        assert not [k for k in names if k in uvloop.Loop.__dict__]
        cosock.enable()  # imported before enable(): patched at once
        assert all(k in uvloop.Loop.__dict__ for k in names)
        cosock.disable()
        assert not [k for k in names if k in uvloop.Loop.__dict__]
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
