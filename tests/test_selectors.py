"""Readiness through the cosock-aware selectors: ring data, ring space, EOF and the verdict
are reported from the rings; plain fds pass through; asyncio runs on top."""

from __future__ import annotations

import asyncio
import hashlib
import os
import selectors
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from cosock import CoSocket
from cosock._selectors import REPLACEMENTS

pytestmark = pytest.mark.usefixtures("cosock_agent")

SELECTORS = sorted(n for n in REPLACEMENTS if n != "DefaultSelector")


def make_pair() -> tuple[CoSocket, CoSocket, CoSocket]:
    srv = CoSocket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = CoSocket()
    cli.connect(srv.getsockname())
    conn, _ = srv.accept()
    cli.sendall(b"?")
    assert conn.recv(1) == b"?"
    conn.sendall(b"!")
    assert cli.recv(1) == b"!"
    assert cli.cosock_path == conn.cosock_path == "shm"
    return srv, cli, conn


@pytest.mark.parametrize("name", SELECTORS)
def test_leftover_ring_data_stays_readable(name):
    srv, cli, conn = make_pair()
    sel = REPLACEMENTS[name]()
    conn.setblocking(False)
    sel.register(conn, selectors.EVENT_READ, "conn")
    r, w = os.pipe()
    sel.register(r, selectors.EVENT_READ, "pipe")
    assert sel.select(0) == []
    cli.sendall(b"x" * 300_000)
    got = 0
    while got < 300_000:
        events = sel.select(5)
        assert [key.data for key, _ in events] == ["conn"]
        got += len(conn.recv(1000))  # small reads leave data in the ring
    assert sel.select(0) == []
    os.write(w, b"p")
    assert [key.data for key, _ in sel.select(5)] == ["pipe"]
    sel.close()
    for fd in (r, w):
        os.close(fd)
    for s in (cli, conn, srv):
        s.close()


@pytest.mark.parametrize("name", SELECTORS)
def test_writable_only_while_the_ring_has_room(name, monkeypatch):
    monkeypatch.setenv("COSOCK_RING_SIZE", "65536")
    srv, cli, conn = make_pair()
    sel = REPLACEMENTS[name]()
    cli.setblocking(False)
    sel.register(cli, selectors.EVENT_WRITE)
    while True:  # fill the ring; it is writable all the way
        assert sel.select(5), "writable while the ring has room"
        try:
            if cli.send(b"y" * 10_000) < 10_000:
                break
        except BlockingIOError:
            break
    assert sel.select(0.05) == []  # full: not writable
    reader = threading.Timer(0.1, lambda: conn.recv(65536))
    reader.start()
    assert sel.select(5)  # the reader freed space: a SPACE frame woke us
    reader.join()
    sel.close()
    for s in (cli, conn, srv):
        s.close()


def test_eof_is_readable():
    srv, cli, conn = make_pair()
    sel = REPLACEMENTS["DefaultSelector"]()
    sel.register(conn, selectors.EVENT_READ)
    cli.close()
    assert sel.select(5)
    assert conn.recv(10) == b""
    sel.close()
    conn.close()
    srv.close()


def test_modify_unregister_and_map():
    srv, cli, conn = make_pair()
    sel = REPLACEMENTS["DefaultSelector"]()
    key = sel.register(conn, selectors.EVENT_READ, "a")
    assert sel.get_key(conn) is key and conn in sel.get_map()
    with pytest.raises(KeyError):
        sel.register(conn, selectors.EVENT_READ)
    sel.modify(conn, selectors.EVENT_WRITE, "b")
    assert [(k.data, ev) for k, ev in sel.select(1)] == [("b", selectors.EVENT_WRITE)]
    sel.unregister(conn)
    assert len(sel.get_map()) == 0
    with pytest.raises(KeyError):
        sel.unregister(conn)
    sel.close()
    for s in (cli, conn, srv):
        s.close()


def _ping_pong(cli: CoSocket, conn: CoSocket, rounds: int) -> int:
    """``rounds`` 64-byte exchanges: ``conn`` echoes in a thread with blocking calls, the
    client waits for each answer in a selector.  Returns the doorbells ``conn`` rang."""

    def echo() -> None:
        for _ in range(rounds):
            data = b""
            while len(data) < 64:
                chunk = conn.recv(64 - len(data))
                if not chunk:
                    return  # the client gave up (failed): end, do not hang the test
                data += chunk
            conn.sendall(data)

    server = threading.Thread(target=echo)
    server.start()
    sel = REPLACEMENTS["DefaultSelector"]()
    cli.setblocking(False)
    sel.register(cli, selectors.EVENT_READ)
    bells = conn.cosock_info()["bells_sent"]
    try:
        for i in range(rounds):
            msg = i.to_bytes(4, "big") * 16
            assert cli.send(msg) == 64
            got = b""
            while len(got) < 64:
                assert sel.select(5), f"round {i}: no readiness within 5 s (lost wake-up)"
                got += cli.recv(64 - len(got))
            assert got == msg
    except BaseException:
        cli.close()  # the echo thread reads EOF and ends
        raise
    finally:
        server.join(10)
        sel.close()
    assert not server.is_alive()
    return int(conn.cosock_info()["bells_sent"] - bells)


def test_a_selector_waiting_for_an_answer_spins_and_takes_it_without_a_doorbell(monkeypatch):
    # A budget far above the echo's turnaround: every answer lands while the client spins.
    monkeypatch.setenv("COSOCK_SPIN_US", "200000")
    monkeypatch.setenv("COSOCK_SPIN_MAX_US", "200000")
    # Without the spin every answer rings (300).  A spin also gives up, by design, when a
    # sched_yield() shows the CPUs oversubscribed: 49 were seen at load ~6, ~0 when quiet,
    # 212 with four CPU hogs on this 2-CPU machine.  So a load burst (a CI neighbour booting
    # VMs) may cost one try: three are made, on fresh connections; one must stay under 150.
    rang = []
    for _ in range(3):
        srv, cli, conn = make_pair()
        try:
            rang.append(_ping_pong(cli, conn, 300))
            assert cli.cosock_info()["safety_timeouts"] == 0
        finally:
            for s in (cli, conn, srv):
                s.close()
        if rang[-1] < 150:
            break
    assert min(rang) < 150, f"the echo rang {rang} doorbells for 300 answers (per try)"


def test_a_selector_spin_that_ends_as_the_answer_lands_loses_no_wake_up(monkeypatch):
    # A budget about as long as the echo's turnaround: many spins give up just as the
    # answer is published with the spinning flag still seen set (no doorbell rung).
    monkeypatch.setenv("COSOCK_SPIN_US", "15")
    monkeypatch.setenv("COSOCK_SPIN_MAX_US", "15")
    srv, cli, conn = make_pair()
    try:
        _ping_pong(cli, conn, 3000)
    finally:
        for s in (cli, conn, srv):
            s.close()


def _late_look_then_write(cli: CoSocket, old: int, box: dict[str, bool]) -> None:
    """The writer's doorbell check for a write it published at ``old``, made late (the
    reader is asleep in select(), armed, by then); then a real write."""
    ch = cli._co
    assert ch is not None and ch.tx is not None
    time.sleep(0.2)
    box["rang"] = ch.tx.needs_bell(old)
    if box["rang"]:
        cli._bell(ch)  # what send() does after its write
    time.sleep(0.2)
    cli.sendall(b"late")


@pytest.mark.parametrize("name", SELECTORS)
def test_a_stale_doorbell_does_not_end_select_early(name, monkeypatch):
    """A writer publishes, and looks at the spinning flag only after the loop has taken its
    bytes and gone to sleep (armed): it rings for bytes already read.  That wake-up is no
    answer: select() sleeps on and reports the next write.  It used to return [] at once,
    which a caller takes for its timeout -- with the writer's next bytes landing in the ring
    just after (the selector stall test's failure under the parallel suite)."""
    monkeypatch.setenv("COSOCK_SPIN_US", "0")  # sleep at once: the late look lands in it
    srv, cli, conn = make_pair()
    conn.setblocking(False)
    sel = REPLACEMENTS[name]()
    sel.register(conn, selectors.EVENT_READ)
    ch = cli._co
    assert ch is not None and ch.tx is not None
    tx = ch.tx
    rang = False
    try:
        for _ in range(5):  # bounded: the late look must land while select() sleeps
            assert sel.select(0.01) == []  # the loop runs on: the ring is flagged awake
            old = tx.head
            assert tx.write(memoryview(b"m" * 100), tx.free()) == 100  # no look at the flag yet
            assert [ev for _, ev in sel.select(5)] == [selectors.EVENT_READ]
            assert conn.recv(300) == b"m" * 100  # the loop takes the bytes, and sleeps next
            box: dict[str, bool] = {}
            thread = threading.Thread(target=_late_look_then_write, args=(cli, old, box))
            thread.start()
            try:
                events = sel.select(5)
            finally:
                thread.join(10)
            assert [ev for _, ev in events] == [selectors.EVENT_READ], "woken by a stale bell"
            assert conn.recv(300) == b"late"
            if box["rang"]:
                rang = True
                break
        assert rang, "the late doorbell never landed in the sleep (loaded machine?)"
        assert conn.cosock_info()["safety_timeouts"] == 0
    finally:
        sel.close()
        for s in (cli, conn, srv):
            s.close()


async def _echo_hash(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    size = int.from_bytes(await reader.readexactly(8), "big")
    digest = hashlib.sha256()
    left = size
    while left:
        chunk = await reader.read(min(left, 1 << 20))
        digest.update(chunk)
        left -= len(chunk)
    writer.write(digest.digest() + os.urandom(size))
    await writer.drain()
    writer.close()


def test_asyncio_streams_over_shared_memory():
    import cosock

    cosock.enable()
    try:

        async def main() -> tuple[bool, int, str]:
            server = await asyncio.start_server(_echo_hash, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            data = os.urandom(6 << 20)
            writer.write(len(data).to_bytes(8, "big") + data)
            await writer.drain()
            digest = await asyncio.wait_for(reader.readexactly(32), 30)
            back = await asyncio.wait_for(reader.readexactly(len(data)), 30)
            path = writer.get_extra_info("socket")._sock.cosock_path
            writer.close()
            server.close()
            await server.wait_closed()
            return digest == hashlib.sha256(data).digest(), len(back), path

        assert asyncio.run(main()) == (True, 6 << 20, "shm")
    finally:
        cosock.disable()


def test_asyncio_between_processes_under_cosock_run(tmp_path):
    server = tmp_path / "server.py"
    server.write_text(
        textwrap.dedent(
            """
            import asyncio, sys
            async def handle(r, w):
                while line := await r.readline():
                    w.write(line.upper()); await w.drain()
                w.close()
            async def main():
                s = await asyncio.start_server(handle, "127.0.0.1", 0)
                print(s.sockets[0].getsockname()[1], flush=True)
                await asyncio.sleep(30)
            asyncio.run(main())
            """
        )
    )
    client = tmp_path / "client.py"
    client.write_text(
        textwrap.dedent(
            """
            import asyncio, sys
            async def main():
                r, w = await asyncio.open_connection("127.0.0.1", int(sys.argv[1]))
                for i in range(200):
                    w.write(b"line %d\\n" % i); await w.drain()
                    assert await r.readline() == b"LINE %d\\n" % i
                w.write_eof()
                print(w.get_extra_info("socket")._sock.cosock_path)
            asyncio.run(main())
            """
        )
    )
    run = [sys.executable, "-m", "cosock", "run", "--", sys.executable]
    srv = subprocess.Popen([*run, str(server)], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        port = srv.stdout.readline().strip()
        out = subprocess.run([*run, str(client), port], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "shm"
    finally:
        srv.kill()
        srv.wait()
