"""Path switch shm -> TCP on live connections (loopback guests, no root needed).

What a migration does to a connection, triggered here with ``cosock_switch()``: each side
leaves the rings, says how much of the peer's stream it consumed, and the peer resends
the rest in DATA frames. Checked byte-exact, in both directions, while the application
keeps reading and writing, including after the ring memory is overwritten with garbage.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import random
import select
import selectors
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from cosock import CoSocket
from cosock._errors import LocalProtocolError, RingCorrupted
from cosock._events import Data, Switch, Upgrade
from cosock._protocol import Connection, State
from cosock._selectors import REPLACEMENTS
from sockutil import accelerated_pair, listener, recv_all, settle

pytestmark = pytest.mark.usefixtures("cosock_agent")

_Base = socket.socket


@contextlib.contextmanager
def pair() -> Iterator[tuple[CoSocket, CoSocket]]:
    srv = listener()
    try:
        with accelerated_pair(srv, timeout=20) as (cli, conn):
            yield cli, conn
    finally:
        srv.close()


def _scribble(sock: CoSocket) -> None:
    """Overwrite the whole shared region (both rings, headers included) with garbage."""
    ch = sock._co
    assert ch is not None and ch.mm is not None
    ch.mm[:] = os.urandom(len(ch.mm))


def _wait_path(*socks: CoSocket, path: str = "tcp", timeout: float = 10.0) -> None:
    """Until every socket is on ``path`` (each reads its control stream meanwhile)."""
    deadline = time.monotonic() + timeout
    while any(s.cosock_path != path for s in socks):
        assert time.monotonic() < deadline, f"{[s.cosock_path for s in socks]}, want {path}"
        for s in socks:
            s._cosock_pump()
        time.sleep(0.001)


def test_unconsumed_ring_bytes_are_resent_exactly_once() -> None:
    with pair() as (cli, conn):
        payload = os.urandom(300_000)
        cli.sendall(payload)  # all in the ring
        head = recv_all(conn, 100_000)  # the server consumes a third of it
        assert cli.cosock_switch()
        assert cli.cosock_path in ("switching", "tcp")
        # Memory is still coherent here, so the server may take the rest from the ring
        # before it reads the SWITCH; then its answer says so and nothing is resent.
        rest = recv_all(conn, 200_000)
        assert head + rest == payload
        _wait_path(conn, cli)
        # New bytes both ways now travel in DATA frames.
        cli.sendall(b"after-switch")
        assert recv_all(conn, 12) == b"after-switch"
        conn.sendall(b"reply" * 1000)
        assert recv_all(cli, 5000) == b"reply" * 1000
        assert cli.cosock_info()["switches"] == conn.cosock_info()["switches"] == 1
        assert cli.cosock_info()["bytes_sent"] == conn.cosock_info()["bytes_received"]


def test_server_initiated_switch_and_half_close_across_it() -> None:
    with pair() as (cli, conn):
        payload = os.urandom(50_000)
        cli.sendall(payload)
        cli.shutdown(socket.SHUT_WR)  # FIN in the ring's era
        answer: list[bytes] = []
        # The client waits for the answer inside recv, so it sees the SWITCH and resends.
        waiter = threading.Thread(target=lambda: answer.append(recv_all(cli, 100)))
        waiter.start()
        assert conn.cosock_switch()
        got = recv_all(conn, 100_000)  # to EOF
        assert got == payload
        assert conn.recv(10) == b""
        conn.sendall(b"late answer")
        conn.shutdown(socket.SHUT_WR)
        waiter.join(20)
        assert answer == [b"late answer"]
        assert cli.cosock_path == "tcp"


def test_switch_of_an_idle_connection_then_traffic() -> None:
    with pair() as (cli, conn):
        assert conn.cosock_switch()
        reply: list[bytes] = []

        def client() -> None:
            cli.sendall(b"x")  # into the ring: the client has not looked at TCP yet
            reply.append(cli.recv(1))  # waiting, it reads the SWITCH and resends "x"

        t = threading.Thread(target=client)
        t.start()
        assert conn.recv(1) == b"x"
        conn.sendall(b"y")
        t.join(20)
        assert reply == [b"y"]
        assert cli.cosock_path == conn.cosock_path == "tcp"
        assert not conn.cosock_switch()  # nothing left to switch


def _pump_both_ways(
    cli: CoSocket, conn: CoSocket, size: int, during: object
) -> tuple[list[str], list[str]]:
    """Stream ``size`` random bytes each way in threads while ``during()`` runs; return
    the sent and received digests."""
    sent: list[str] = ["", ""]
    got: list[str] = ["", ""]
    errors: list[BaseException] = []

    def writer(sock: CoSocket, slot: int) -> None:
        rnd = random.Random(slot)
        digest = hashlib.sha256()
        left = size
        try:
            while left:
                chunk = rnd.randbytes(min(left, rnd.choice([100, 4096, 65536, 300_000])))
                sock.sendall(chunk)
                digest.update(chunk)
                left -= len(chunk)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        sent[slot] = digest.hexdigest()

    def reader(sock: CoSocket, slot: int) -> None:
        digest = hashlib.sha256()
        left = size
        buf = bytearray(70_000)
        try:
            while left:
                n = sock.recv_into(buf, min(left, len(buf)))
                assert n, "EOF before all bytes"
                digest.update(memoryview(buf)[:n])
                left -= n
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        got[slot] = digest.hexdigest()

    threads = [
        threading.Thread(target=writer, args=(cli, 0)),
        threading.Thread(target=reader, args=(conn, 0)),
        threading.Thread(target=writer, args=(conn, 1)),
        threading.Thread(target=reader, args=(cli, 1)),
    ]
    for t in threads:
        t.start()
    during()  # type: ignore[operator]
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    # With the tracebacks: a race in the data path names its line only there.
    assert not errors, "\n".join("".join(traceback.format_exception(e)) for e in errors)
    return sent, got


@pytest.mark.parametrize("initiator", ["client", "server", "both"])
def test_switch_mid_stream_both_ways_with_garbage_in_the_old_rings(initiator: str) -> None:
    with pair() as (cli, conn):

        def during() -> None:
            time.sleep(0.05)
            if initiator in ("client", "both"):
                cli.cosock_switch()
            if initiator in ("server", "both"):
                conn.cosock_switch()
            # Both sides have left the rings once each has sent its SWITCH; from then
            # on nothing may be read from shared memory: make it garbage.
            deadline = time.monotonic() + 10
            while not all(s.cosock_path == "tcp" for s in (cli, conn)):
                if time.monotonic() > deadline - 8:
                    # The streams may be over (loaded machine): an idle application reads
                    # its peer's SWITCH only at its next call.  Read for them.
                    cli._cosock_pump()
                    conn._cosock_pump()
                assert time.monotonic() < deadline
                time.sleep(0.001)
            _scribble(cli)

        sent, got = _pump_both_ways(cli, conn, 8_000_000, during)
        assert sent == got
        assert cli.cosock_info()["switches"] == conn.cosock_info()["switches"] == 1


def test_garbage_right_after_both_sides_froze_is_never_delivered() -> None:
    """Scribble as soon as both have frozen (before either has its peer's answer)."""
    with pair() as (cli, conn):
        a = os.urandom(500_000)
        b = os.urandom(400_000)
        cli.sendall(a)
        conn.sendall(b)
        part_a = recv_all(conn, 123_457)
        part_b = recv_all(cli, 7)
        cli._begin_switch(cli._co)  # type: ignore[arg-type]
        conn._begin_switch(conn._co)  # type: ignore[arg-type]
        _scribble(cli)  # neither side has read the other's SWITCH yet
        rest_b: list[bytes] = []
        t = threading.Thread(target=lambda: rest_b.append(recv_all(cli, len(b) - len(part_b))))
        t.start()
        assert part_a + recv_all(conn, len(a) - len(part_a)) == a
        t.join(20)
        assert part_b + rest_b[0] == b


@pytest.mark.parametrize("name", sorted(n for n in REPLACEMENTS if n != "DefaultSelector"))
def test_nonblocking_selector_echo_survives_a_switch(name: str) -> None:
    """A selector loop (as under ``cosock run``, which installs the ring-aware selectors)."""
    with pair() as (cli, conn):
        conn.setblocking(False)
        sel = REPLACEMENTS[name]()
        sel.register(conn, selectors.EVENT_READ)
        total = 3_000_000
        echoed = bytearray()
        pending = bytearray()
        stop = threading.Event()

        def echo() -> None:
            while not stop.is_set():
                for _key, events in sel.select(0.2):
                    if events & selectors.EVENT_READ:
                        try:
                            data = conn.recv(65536)
                        except BlockingIOError:
                            continue
                        if not data:
                            stop.set()
                            return
                        pending.extend(data)
                    if events & selectors.EVENT_WRITE and pending:
                        try:
                            n = conn.send(pending)
                        except BlockingIOError:
                            n = 0
                        del pending[:n]
                sel.modify(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0))

        server = threading.Thread(target=echo)
        server.start()
        payload = os.urandom(total)

        def reader() -> None:
            while len(echoed) < total:
                data = cli.recv(65536)
                if not data:
                    return
                echoed.extend(data)

        rd = threading.Thread(target=reader)
        rd.start()
        for i in range(0, total, 50_000):
            cli.sendall(payload[i : i + 50_000])
            if i == 1_000_000:
                cli.cosock_switch()
        rd.join(60)
        cli.shutdown(socket.SHUT_WR)
        server.join(30)
        stop.set()
        sel.close()
        assert bytes(echoed) == payload
        assert cli.cosock_path == conn.cosock_path == "tcp"


def test_the_residency_watch_leaves_the_peers_resend_to_the_application(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watch switches for an application asleep on the kernel fd.  DATA frames the
    peer sends right after our SWITCH must stay queued in the kernel, where they make the
    fd readable; taken into our buffer by the watch, they would wake nobody (the app slept
    until its 5 s safety timeout: the stall seen under load in the lab)."""
    with pair() as (cli, conn):
        conn.sendall(b"x" * 1000)  # in the ring, never read by cli: conn must resend it
        assert conn.cosock_switch()  # the peer went first; its SWITCH waits for cli
        real_control = CoSocket._control

        def peer_answers_at_once(self: CoSocket, ch: object, event: object) -> None:
            real_control(self, ch, event)
            if self is cli and isinstance(event, Switch):
                _wait_path(conn)  # conn reads our SWITCH and resends its 1000 bytes
                deadline = time.monotonic() + 10
                while len(_Base.recv(cli, 1 << 16, socket.MSG_PEEK)) < 1000:
                    assert time.monotonic() < deadline, "the resend never arrived"
                    time.sleep(0.001)

        monkeypatch.setattr(CoSocket, "_control", peer_answers_at_once)
        assert cli._switch(cli._pump_control_only)  # what the residency watch runs
        monkeypatch.undo()
        assert cli.cosock_path == "tcp"
        assert not cli._rxb, "the watch took the application's bytes out of the kernel"
        assert select.select([cli.fileno()], [], [], 0)[0], "the resend does not wake the app"
        cli.settimeout(10)
        assert recv_all(cli, 1000) == b"x" * 1000


def test_a_pump_racing_our_switch_waits_for_its_private_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watch switches while an application thread reads: that thread must not act on
    the peer's SWITCH while ours is half done (phase set, the bytes to resend not yet
    copied), or it resends from nothing and calls the channel corrupted."""
    with pair() as (cli, conn):
        cli.sendall(b"a" * 1000)  # unread by conn: cli must resend it
        conn.sendall(b"b" * 1000)  # unread by cli: conn must resend it
        assert conn.cosock_switch()
        deadline = time.monotonic() + 10
        while not _Base.recv(cli, 64, socket.MSG_PEEK):  # conn's SWITCH has arrived
            assert time.monotonic() < deadline
            time.sleep(0.001)
        real_quiesce = CoSocket._quiesce
        racers: list[threading.Thread] = []

        def quiesce_while_the_app_pumps(ch: object) -> None:
            racer = threading.Thread(target=cli._pump, args=(ch,))
            racer.start()
            racer.join(0.5)  # blocked on the pump's lock, as it should be
            racers.append(racer)
            real_quiesce(ch)

        monkeypatch.setattr(CoSocket, "_quiesce", staticmethod(quiesce_while_the_app_pumps))
        assert cli._switch(cli._pump_control_only)  # what the residency watch runs
        monkeypatch.undo()
        racers[0].join(10)
        _wait_path(cli, conn)
        cli.settimeout(10)
        conn.settimeout(10)
        assert recv_all(conn, 1000) == b"a" * 1000
        assert recv_all(cli, 1000) == b"b" * 1000
        assert cli.cosock_info()["error"] is None


def test_peer_closed_before_answering_leaves_its_ring_bytes_readable() -> None:
    srv = listener()
    cli = CoSocket()
    cli.settimeout(20)
    cli.connect(srv.getsockname())
    conn, _ = srv.accept()
    conn.settimeout(20)
    settle(cli, conn)
    payload = os.urandom(200_000)
    cli.sendall(payload)
    cli.close()  # no FIN frame, just TCP close: the bytes are in the ring
    assert conn.cosock_switch()
    assert recv_all(conn, 300_000) == payload
    conn.close()
    srv.close()


def test_close_right_after_a_switch_still_delivers_the_resend() -> None:
    with pair() as (cli, conn):
        payload = os.urandom(600_000)
        cli.sendall(payload)
        got = bytearray()

        def read() -> None:
            got.extend(recv_all(conn, len(payload) + 1))

        t = threading.Thread(target=read)
        t.start()
        cli.cosock_switch()
        cli.close()  # lingers until the resend is in the kernel
        t.join(30)
        assert bytes(got) == payload


def test_hostile_switch_offset_resets_the_connection_without_hanging() -> None:
    with pair() as (cli, conn):
        cli.sendall(b"abc")
        # A SWITCH claiming the server sent bytes it never sent.
        _Base.send(cli, b"\x06" + (10**6).to_bytes(8, "little"))
        t0 = time.monotonic()
        with pytest.raises(ConnectionResetError):
            for _ in range(3):
                conn.recv(10)
        assert time.monotonic() - t0 < 5


def test_switch_claiming_less_than_we_retain_is_refused() -> None:
    with pair() as (cli, conn):
        cli.sendall(os.urandom(10_000))
        assert recv_all(conn, 10_000)
        # The server consumed everything and published its tail; a SWITCH now claiming
        # it consumed nothing asks for bytes the client no longer holds.
        cli._begin_switch(cli._co)  # type: ignore[arg-type]
        _Base.send(conn, b"\x06" + (0).to_bytes(8, "little"))
        with pytest.raises((ConnectionResetError, RingCorrupted)):
            for _ in range(3):
                cli.recv(10)


#### The way back: TCP -> shared memory with a fresh channel


def _upgrade(cli: CoSocket, conn: CoSocket) -> None:
    """Ask for the upgrade and let both ends see it through (each reads its socket)."""
    assert cli.cosock_upgrade()
    deadline = time.monotonic() + 10
    while not (cli.cosock_path == conn.cosock_path == "shm"):
        assert time.monotonic() < deadline, (cli.cosock_path, conn.cosock_path)
        conn._cosock_pump()
        cli._cosock_pump()
        time.sleep(0.001)


def test_upgrade_back_to_shared_memory_keeps_the_stream_exact() -> None:
    with pair() as (cli, conn):
        cli.sendall(b"a" * 1000)
        cli.cosock_switch()
        assert recv_all(conn, 1000) == b"a" * 1000
        _wait_path(cli, conn)
        cli.sendall(b"framed")  # queued in DATA frames before the upgrade
        conn.sendall(b"FRAMED")
        _upgrade(cli, conn)
        cli.sendall(b"ring")
        conn.sendall(b"RING")
        assert recv_all(conn, 10) == b"framedring"
        assert recv_all(cli, 10) == b"FRAMEDRING"
        assert cli.cosock_info()["upgrades"] == conn.cosock_info()["upgrades"] == 1
        info = cli.cosock_info()
        assert info["bytes_sent"] == conn.cosock_info()["bytes_received"] == 1 + 1010


def test_many_switches_and_upgrades_under_load_both_ways() -> None:
    with pair() as (cli, conn):
        cycles = 0

        def during() -> None:
            nonlocal cycles
            for _ in range(4):
                time.sleep(0.03)
                cli.cosock_switch()
                deadline = time.monotonic() + 10
                while not (cli.cosock_path == conn.cosock_path == "tcp"):
                    if time.monotonic() > deadline - 8:  # streams over: read for the apps
                        conn._cosock_pump()
                        cli._cosock_pump()
                    assert time.monotonic() < deadline
                    time.sleep(0.001)
                time.sleep(0.03)
                assert cli.cosock_upgrade()
                while not (cli.cosock_path == conn.cosock_path == "shm"):
                    if time.monotonic() > deadline - 8:
                        # The streams may be over: nobody reads the UPGRADE and its answer
                        # (an idle application answers at its next call).  Read for them.
                        conn._cosock_pump()
                        cli._cosock_pump()
                    assert time.monotonic() < deadline, _both_states(cli, conn)
                    time.sleep(0.001)
                cycles += 1

        sent, got = _pump_both_ways(cli, conn, 40_000_000, during)
        assert sent == got
        assert cycles == 4
        assert cli.cosock_info()["switches"] == 4
        assert cli.cosock_info()["upgrades"] == conn.cosock_info()["upgrades"] == 4


def test_upgrade_without_a_listener_is_refused_and_stays_on_tcp() -> None:
    with pair() as (cli, conn):
        cli.cosock_switch()
        _wait_path(conn, cli)
        conn.sendall(b"x")
        assert cli.recv(1) == b"x"
        assert conn._co is not None
        conn._co.rv = None  # as if the listener had closed: no offer can be found
        assert cli.cosock_upgrade()
        cli.sendall(b"still")
        assert recv_all(conn, 5) == b"still"
        conn.sendall(b"fine")
        assert recv_all(cli, 4) == b"fine"
        assert conn.cosock_info()["upgrades_refused"] == 1
        assert cli.cosock_path == conn.cosock_path == "tcp"


def test_doorbells_after_an_upgrade_are_counted_from_the_new_ring(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new ring's writer counts its doorbells from 0, while the protocol counts every BELL
    of the connection.  Compared unadjusted, a reader that found the new ring empty took a
    queued BELL for one younger than its look and stopped reading the control stream before
    it, so the FIN behind it was never parsed: recv() spun for ever instead of returning
    EOF (two VM tests hung at the end of a connection that had come back to shm)."""
    monkeypatch.setenv("COSOCK_SPIN_US", "0")  # every blocked read needs a doorbell
    monkeypatch.setenv("COSOCK_SPIN_MAX_US", "0")
    with pair() as (cli, conn):
        conn.settimeout(10)
        for i in range(5):  # doorbells before the switch: the protocol's count grows
            with _blocked_recv(conn, 1) as got:
                time.sleep(0.05)
                cli.sendall(bytes([i]))
            assert got == [bytes([i])]
        assert conn._co is not None and conn._co.proto.bells_received >= 5
        cli.cosock_switch()
        _wait_path(cli, conn)
        _upgrade(cli, conn)
        with _blocked_recv(conn, 1) as got:
            time.sleep(0.05)
            cli.sendall(b"x")  # the new ring's first doorbell
        assert got == [b"x"]
        with _blocked_recv(conn, 1) as got:
            time.sleep(0.05)
            cli.shutdown(socket.SHUT_WR)  # a FIN frame queued behind a doorbell
        assert got == [b""]


@contextlib.contextmanager
def _blocked_recv(sock: CoSocket, n: int) -> Iterator[list[bytes]]:
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(sock.recv(n)), daemon=True)
    t.start()
    try:
        yield got
    finally:
        t.join(15)
        assert not t.is_alive(), "recv() never returned"


#### An upgrade on connections whose applications are not calling in


def _until_paths(cli: CoSocket, conn: CoSocket, path: str, timeout: float = 15.0) -> None:
    """Until both ends are on ``path``, without reading either socket: only the residency
    watch may move them."""
    deadline = time.monotonic() + timeout
    while not (cli.cosock_path == conn.cosock_path == path):
        assert time.monotonic() < deadline, _both_states(cli, conn)
        time.sleep(0.01)


def _both_states(cli: CoSocket, conn: CoSocket) -> tuple[Any, ...]:
    """What a timed-out wait for a path shows of both ends."""
    return (
        cli.cosock_path,
        conn.cosock_path,
        cli._co and cli._co.proto.state,
        conn._co and conn._co.proto.state,
        cli.cosock_info(),
        conn.cosock_info(),
    )


def test_an_idle_pair_completes_an_upgrade_through_the_residency_watch() -> None:
    """Neither application calls into its socket after the UPGRADE goes out (what the
    residency watch sends when a migration brings the guests together again): the server's
    watch must answer it and the client's must act on the ACCEPT, or the pair stays on TCP
    for good with the upgrade pending (a CI run: 30 s after migration #10, client
    ``upgrade_pending`` True, server never answered)."""
    with pair() as (cli, conn):
        cli.sendall(b"a" * 1000)
        assert recv_all(conn, 1000) == b"a" * 1000
        cli.cosock_switch()
        _wait_path(cli, conn)
        conn.sendall(b"framed")  # read before the upgrade: nothing queued in front of it
        assert recv_all(cli, 6) == b"framed"
        assert cli.cosock_upgrade()  # what the watch runs; nobody reads from here on
        _until_paths(cli, conn, "shm")
        assert cli._co is not None and cli._co.upgrade is None
        cli.sendall(b"ring")
        conn.sendall(b"RING")
        assert recv_all(conn, 4) == b"ring"
        assert recv_all(cli, 4) == b"RING"
        assert cli.cosock_info()["upgrades"] == conn.cosock_info()["upgrades"] == 1
        # (+1 each way: the byte settle() exchanged)
        assert cli.cosock_info()["bytes_sent"] == conn.cosock_info()["bytes_received"] == 1005
        assert conn.cosock_info()["bytes_sent"] == cli.cosock_info()["bytes_received"] == 11


def _pause_before_the_state_moves(method: Any, paused: threading.Event, go: threading.Event) -> Any:
    """A trace function for one thread: the first time ``method`` (``Connection.send`` or
    ``_next_event``) handles a DATA event, stop it right before it stores the new state
    it computed, until ``go``."""
    lines, first = inspect.getsourcelines(method)
    at = first + next(i for i, text in enumerate(lines) if "self._state = new_state" in text)
    code = method.__code__

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if (
            event == "line"
            and frame.f_lineno == at
            and not paused.is_set()
            and type(frame.f_locals["event"]) is Data
        ):
            paused.set()
            go.wait(10)
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code is code else None

    return tracer


def _in_thread(errors: list[BaseException], what: Any, trace: Any = None) -> threading.Thread:
    def target() -> None:
        if trace is not None:
            sys.settrace(trace)
        try:
            what()
        except BaseException as exc:  # the test reports it
            errors.append(exc)
        finally:
            sys.settrace(None)

    thread = threading.Thread(target=target)
    thread.start()
    return thread


def _until_upgraded(cli: CoSocket, conn: CoSocket) -> None:
    deadline = time.monotonic() + 10
    while not (cli.cosock_path == conn.cosock_path == "shm"):
        assert time.monotonic() < deadline, (cli.cosock_info(), conn.cosock_info())
        conn._cosock_pump()
        cli._cosock_pump()
        time.sleep(0.001)


def test_an_upgrade_parsed_while_a_writer_frames_data_is_answered() -> None:
    """The server's writer thread frames DATA (``Connection.send`` reads the state, builds
    the frame, stores the state it computed) while its reader parses the client's UPGRADE.
    The writer stored FRAMED over UPGRADE_RECEIVED: the ACCEPT then "cannot be sent in state
    FRAMED", the reader thread died of that LocalProtocolError, and the pair stayed on TCP
    with the client's upgrade pending for good (the CI failure after migration #10: server
    phase tcp, 0 refused, never answered).  Sending and parsing must not interleave."""
    with pair() as (cli, conn):
        cli.cosock_switch()
        _wait_path(cli, conn)
        paused, go = threading.Event(), threading.Event()
        errors: list[BaseException] = []

        pause = _pause_before_the_state_moves(Connection.send, paused, go)
        writer = _in_thread(errors, lambda: conn.sendall(b"w" * 1000), pause)
        assert paused.wait(10), "the writer never framed DATA"
        assert cli.cosock_upgrade()
        deadline = time.monotonic() + 10
        while len(_Base.recv(conn, 64, socket.MSG_PEEK)) < 17:  # the UPGRADE has arrived
            assert time.monotonic() < deadline
            time.sleep(0.001)
        reader = _in_thread(errors, conn._cosock_pump)
        # Unfixed, the reader parses the UPGRADE now, under the paused writer; fixed, it
        # waits for the writer.  Either way the writer goes on after this bounded look.
        deadline = time.monotonic() + 0.5
        while conn._co is not None and conn._co.proto.state is not State.UPGRADE_RECEIVED:
            if time.monotonic() > deadline:
                break
            time.sleep(0.001)
        go.set()
        writer.join(10)
        reader.join(10)
        assert not writer.is_alive() and not reader.is_alive()
        assert errors == []
        _until_upgraded(cli, conn)
        conn.sendall(b"RING")
        cli.sendall(b"ring")
        assert recv_all(cli, 1004) == b"w" * 1000 + b"RING"
        assert recv_all(conn, 4) == b"ring"
        assert cli.cosock_info()["upgrades"] == conn.cosock_info()["upgrades"] == 1


def test_an_upgrade_sent_while_a_reader_parses_data_is_not_forgotten() -> None:
    """The other way round, on the client: its reader parses the server's DATA (reads the
    state, counts the bytes, stores the state it computed) while the residency watch sends
    the UPGRADE.  The reader stored FRAMED over UPGRADE_SENT, and the server's ACCEPT then
    reset the connection: "peer sent Accept, which the client cannot receive in state
    FRAMED" (seen once in the QEMU lab, docs/vm-backend.md)."""
    with pair() as (cli, conn):
        cli.cosock_switch()
        _wait_path(cli, conn)
        conn.sendall(b"d" * 1000)  # a DATA frame for the client's reader to parse
        deadline = time.monotonic() + 10
        while len(_Base.recv(cli, 2048, socket.MSG_PEEK)) < 1005:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        paused, go = threading.Event(), threading.Event()
        errors: list[BaseException] = []
        pause = _pause_before_the_state_moves(Connection._next_event, paused, go)
        reader = _in_thread(errors, cli._cosock_pump, pause)
        assert paused.wait(10), "the reader never parsed the DATA frame"
        upgrader = _in_thread(errors, cli.cosock_upgrade)
        # Unfixed, the UPGRADE goes out now, under the paused reader; fixed, it waits for
        # the reader.  Either way the reader goes on after this bounded look.
        upgrader.join(0.5)
        go.set()
        reader.join(10)
        upgrader.join(10)
        assert not reader.is_alive() and not upgrader.is_alive()
        assert errors == []
        _until_upgraded(cli, conn)
        assert cli.cosock_info()["error"] is None
        conn.sendall(b"RING")
        cli.sendall(b"ring")
        assert recv_all(cli, 1004) == b"d" * 1000 + b"RING"
        assert recv_all(conn, 4) == b"ring"
        assert cli.cosock_info()["upgrades"] == conn.cosock_info()["upgrades"] == 1


def test_a_frame_we_cannot_answer_fails_recv_with_an_oserror(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should answering a frame ever break the protocol's rules (the race above did), the
    reading application gets ConnectionResetError -- an OSError, as from TCP -- not the
    LocalProtocolError, which no socket application catches: it ended the stream test's
    reader thread, and the pair hung with the client's upgrade unanswered."""
    with pair() as (cli, conn):
        cli.cosock_switch()
        _wait_path(cli, conn)

        def broken_answer(self: CoSocket, ch: object) -> None:
            raise LocalProtocolError("Accept cannot be sent by the server in state FRAMED")

        monkeypatch.setattr(CoSocket, "_answer_upgrade", broken_answer)
        assert cli.cosock_upgrade()
        with pytest.raises(ConnectionResetError, match="cannot be sent"):
            conn.recv(10)


def test_a_shutdown_while_a_reader_syncs_the_ring_offsets_counts_each_byte_once() -> None:
    """A reader thread brings the protocol's offsets up to the rings (``_sync_offsets``:
    compute how far the ring moved, then record it) while another thread's shutdown() does
    the same before its FIN.  Both recorded the same bytes: the reader's late record came
    after the FIN (a LocalProtocolError, the connection poisoned) or counted them twice.
    Not an upgrade, but the same rule: the protocol object moves under ``ctl_lock`` only."""
    with pair() as (cli, conn):
        ch = cli._co
        assert ch is not None
        cli.sendall(b"p" * 5000)  # in the ring; the protocol's count lags until a sync
        paused, go = threading.Event(), threading.Event()
        code = Connection.data_sent.__code__

        def tracer(frame: FrameType, event: str, arg: object) -> Any:
            if event == "call" and frame.f_code is code and not paused.is_set():
                paused.set()
                go.wait(10)
            return None

        errors: list[BaseException] = []
        reader = _in_thread(errors, lambda: cli._sync_offsets(ch), tracer)
        assert paused.wait(10), "the reader never recorded the ring's bytes"
        closer = _in_thread(errors, lambda: cli.shutdown(socket.SHUT_WR))
        closer.join(0.5)  # unfixed, the FIN goes out now; fixed, it waits for the reader
        go.set()
        reader.join(10)
        closer.join(10)
        assert not reader.is_alive() and not closer.is_alive()
        assert errors == []
        assert recv_all(conn, 6000) == b"p" * 5000  # then EOF
        assert ch.proto.sent_offset == 5001  # (+1: the byte settle() exchanged)
        cli._sync_offsets(ch)
        conn.sendall(b"still open")
        assert recv_all(cli, 10) == b"still open"
        assert cli.cosock_info()["error"] is None


def test_an_upgrade_that_could_not_be_asked_is_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The offer was made and noted as pending, then the UPGRADE itself could not be queued
    (an error in ``_control``): nothing was asked, so nothing will answer.  Left noted as
    pending, the residency watch never offered again -- the pair stayed on TCP for good
    with ``upgrade_pending`` True (seen in the lab's twenty-migration test: the client's
    UPGRADE never reached the server).  Undone, the next offer goes through."""
    with pair() as (cli, conn):
        cli.cosock_switch()
        _wait_path(cli, conn)
        real_control = CoSocket._control

        def upgrade_fails(self: CoSocket, ch: Any, event: object) -> None:
            if isinstance(event, Upgrade):
                raise LocalProtocolError("Upgrade cannot be sent by the client in state X")
            real_control(self, ch, event)

        monkeypatch.setattr(CoSocket, "_control", upgrade_fails)
        assert not cli.cosock_upgrade()
        monkeypatch.undo()
        assert cli._co is not None and cli._co.upgrade is None
        _upgrade(cli, conn)
        cli.sendall(b"ring")
        assert recv_all(conn, 4) == b"ring"


def test_cosock_upgrade_says_asked_even_when_the_answer_came_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another thread may read the ACCEPT and finish the upgrade before cosock_upgrade()
    returns (seen under load: the reader's into-ring trace before the asker's
    upgrade-offered); it asked all the same, so it says True, not "nothing pending"."""
    with pair() as (cli, conn):
        cli.cosock_switch()
        _wait_path(cli, conn)
        real_control = CoSocket._control

        def answered_at_once(self: CoSocket, ch: Any, event: object) -> None:
            real_control(self, ch, event)
            if self is cli and isinstance(event, Upgrade):
                deadline = time.monotonic() + 10
                while cli.cosock_path != "shm":  # what a reader thread would do meanwhile
                    assert time.monotonic() < deadline
                    conn._cosock_pump()
                    cli._cosock_pump()
                    time.sleep(0.001)

        monkeypatch.setattr(CoSocket, "_control", answered_at_once)
        assert cli.cosock_upgrade()
        monkeypatch.undo()
        assert cli.cosock_info()["upgrades"] == 1
