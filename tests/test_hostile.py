"""Hostile inputs (issue 6, part 2): forged and replayed offers, bad fds, garbage datagrams,
garbage control frames at every phase, and fuzz targets for the parsers that had none.

Each attack checks the outcome the threat model (docs/security.md) promises: rejected and
counted with a reason (``Rendezvous.dropped`` for datagrams, ``cosock_fallback_reason`` for
a connection), the victim falls back or fails cleanly, other connections carry on, nothing
hangs (timeouts everywhere), nothing leaks (the ``leak_check`` fixture).

Not repeated here (already covered): Offer.decode fuzz (test_offer), protocol receive_data
fuzz (test_protocol), hostile ring counters (test_ring, test_socket_adversarial), an offer
from another lab guest claiming a third guest's client (test_lab_paths).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import mmap
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import IS_ROOT
from cosock import CoSocket
from cosock._errors import FallbackReason, RemoteProtocolError
from cosock._events import REASON_CODES, Hello
from cosock._offer import OFFER_SIZE, Offer
from cosock._protocol import T_ACCEPT, T_REJECT, Connection, Role
from cosock._rendezvous import Rendezvous
from cosock._ring import HEADER_SIZE, create_channel_fd
from sockutil import accelerated_pair, listener, recv_all

pytestmark = [pytest.mark.usefixtures("leak_check", "cosock_agent"), pytest.mark.timeout(60)]

CAP = 1 << 16
MIB_ = 1 << 20
REASON_OFFER_INVALID = REASON_CODES[FallbackReason.OFFER_INVALID]


# --------------------------------------------------------------------------- helpers


def rv_of(srv: CoSocket) -> Rendezvous:
    assert srv._rv is not None, "listener did not register with the agent"
    return srv._rv[0]


def send_dgram(path: Path, payload: bytes, fds: list[int]) -> None:
    """One raw datagram to a rendezvous socket, with exactly these fds (SCM_RIGHTS)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        s.sendmsg([payload], anc, 0, str(path))


@contextlib.contextmanager
def raw_client(nonce: bytes | None = None) -> Iterator[tuple[socket.socket, int]]:
    """A plain socket bound to a fresh loopback port (not yet connected), and its port."""
    s = socket.socket()
    s.settimeout(10)
    s.bind(("127.0.0.1", 0))
    try:
        yield s, s.getsockname()[1]
    finally:
        s.close()


def offer_for(port: int, srv: CoSocket, nonce: bytes, capacity: int = CAP) -> Offer:
    return Offer(("127.0.0.1", port), srv.getsockname(), nonce, capacity, 4)


def hello(nonce: bytes) -> bytes:
    return Connection(Role.CLIENT, nonce).send(Hello(nonce))


@contextlib.contextmanager
def bystander(srv: CoSocket) -> Iterator[tuple[CoSocket, CoSocket]]:
    """A legitimate accelerated connection on the same listener, alive during an attack."""
    with accelerated_pair(srv) as (cli, conn):
        yield cli, conn


def still_fine(pair: tuple[CoSocket, CoSocket]) -> None:
    cli, conn = pair
    data = os.urandom(300_000)
    cli.sendall(data)
    assert recv_all(conn, len(data)) == data
    conn.sendall(data[:1000])
    assert recv_all(cli, 1000) == data[:1000]
    assert cli.cosock_path == conn.cosock_path == "shm"


# --------------------------------------------------------------------------- offers


def test_replayed_offer_keeps_the_first_memfd() -> None:
    """Same offer (same nonce) twice with different memory: the first stands, the replay is
    dropped and counted, so a replayer cannot swap its memory in under the real nonce."""
    srv = listener()
    real = create_channel_fd(CAP)
    forged = create_channel_fd(CAP)
    spy = mmap.mmap(forged, 2 * (HEADER_SIZE + CAP))
    mine = mmap.mmap(real, 2 * (HEADER_SIZE + CAP))
    try:
        with raw_client() as (cli, port):
            nonce = os.urandom(16)
            payload = offer_for(port, srv, nonce).encode()
            send_dgram(rv_of(srv).path, payload, [real])
            send_dgram(rv_of(srv).path, payload, [forged])
            cli.connect(srv.getsockname())
            cli.sendall(hello(nonce))
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(10)
                assert recv_all(cli, 1)[0] == T_ACCEPT
                conn.sendall(b"for the real client only")
                ring1 = 2 * HEADER_SIZE + CAP
                assert mine[ring1 : ring1 + 24] == b"for the real client only"
                assert b"real client" not in bytes(spy)
                assert conn.cosock_path == "shm"
            assert rv_of(srv).dropped == {"replayed": 1}
    finally:
        spy.close()
        mine.close()
        os.close(forged)
        os.close(real)
        srv.close()


def test_replay_of_an_offer_already_taken_is_refused() -> None:
    srv = listener()
    try:
        with bystander(srv) as pair:
            cli, _ = pair
            ch = cli._co
            assert ch is not None
            port = cli.getsockname()[1]
            fd = create_channel_fd(CAP)
            try:
                send_dgram(rv_of(srv).path, offer_for(port, srv, ch.nonce).encode(), [fd])
            finally:
                os.close(fd)
            rv_of(srv).drain()
            assert rv_of(srv).dropped == {"replayed": 1}
            still_fine(pair)
    finally:
        srv.close()


@pytest.mark.parametrize(
    "payload,fds,reason",
    [
        (b"x" * 600, 1, "truncated"),  # larger than any offer: MSG_TRUNC
        (b"CSKO\x01" + b"\x00" * 20, 1, "malformed"),  # cut short
        (b"GET / HTTP/1.1\r\n\r\n", 1, "malformed"),
        (None, 0, "fd-count"),
        (None, 2, "fd-count"),
        (None, 3, "fd-count"),
    ],
    ids=["oversized", "truncated", "not-an-offer", "no-fd", "two-fds", "three-fds"],
)
def test_bad_datagrams_are_dropped_counted_and_their_fds_closed(
    payload: bytes | None, fds: int, reason: str
) -> None:
    srv = listener()
    try:
        with bystander(srv) as pair:
            made = [create_channel_fd(CAP) for _ in range(fds)]
            try:
                data = payload if payload is not None else offer_for(1, srv, b"n" * 16).encode()
                send_dgram(rv_of(srv).path, data, made)
            finally:
                for fd in made:
                    os.close(fd)
            rv_of(srv).drain()
            assert rv_of(srv).dropped == {reason: 1}
            still_fine(pair)  # the leak check then proves the received fds were closed
    finally:
        srv.close()


def _pipe_fd() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _file_fd(tmp: Path) -> int:
    path = tmp / "not-a-memfd"
    path.write_bytes(b"\x00" * (2 * (HEADER_SIZE + CAP)))
    return os.open(path, os.O_RDWR)


def _unsealed_memfd() -> int:
    fd = os.memfd_create("cosock", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 2 * (HEADER_SIZE + CAP))
    return fd


def _wrong_size_memfd() -> int:
    return create_channel_fd(CAP * 2)  # valid channel, but twice what the offer claims


def _socket_fd() -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _zeroed_header_memfd() -> int:
    fd = os.memfd_create("cosock", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 2 * (HEADER_SIZE + CAP))
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


@pytest.mark.parametrize(
    "make_fd",
    [
        lambda tmp: _pipe_fd(),
        _file_fd,
        lambda tmp: _unsealed_memfd(),
        lambda tmp: _wrong_size_memfd(),
        lambda tmp: _socket_fd(),
        lambda tmp: _zeroed_header_memfd(),
    ],
    ids=["pipe", "regular-file", "unsealed-memfd", "wrong-size-memfd", "socket", "no-header"],
)
def test_offer_with_a_bad_fd_is_rejected_in_band_and_the_victim_falls_back(
    make_fd, tmp_path: Path
) -> None:
    """Even with the right nonce in HELLO (worst case), a bad fd never becomes a channel:
    REJECT(offer-invalid) on the wire, the reason on the server socket, plain TCP after."""
    srv = listener()
    try:
        with bystander(srv) as pair, raw_client() as (cli, port):
            nonce = os.urandom(16)
            fd = make_fd(tmp_path)
            try:
                send_dgram(rv_of(srv).path, offer_for(port, srv, nonce).encode(), [fd])
            finally:
                os.close(fd)
            cli.connect(srv.getsockname())
            cli.sendall(hello(nonce) + b"plain after hello")
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(10)
                assert recv_all(conn, 17) == b"plain after hello"
                assert conn.cosock_fallback_reason is FallbackReason.OFFER_INVALID
                assert conn.cosock_path == "tcp"
                assert recv_all(cli, 2) == bytes([T_REJECT, REASON_OFFER_INVALID])
                conn.sendall(b"reply")
                assert recv_all(cli, 5) == b"reply"
            still_fine(pair)
    finally:
        srv.close()


def test_offer_larger_than_the_ring_cap_is_rejected_as_resource(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COSOCK_RING_SIZE", str(CAP))
    monkeypatch.setenv("COSOCK_RING_MAX", str(CAP))
    srv = listener()
    try:
        with raw_client() as (cli, port):
            nonce = os.urandom(16)
            fd = create_channel_fd(CAP * 4)
            try:
                offer = offer_for(port, srv, nonce, capacity=CAP * 4)
                send_dgram(rv_of(srv).path, offer.encode(), [fd])
            finally:
                os.close(fd)
            cli.connect(srv.getsockname())
            cli.sendall(hello(nonce))
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(10)
                assert recv_all(cli, 2) == bytes([T_REJECT, REASON_CODES[FallbackReason.RESOURCE]])
                assert conn.cosock_fallback_reason is FallbackReason.RESOURCE
    finally:
        srv.close()


_FORGER = """
    import array, os, socket, sys
    # run under `unshare --net`: a process in another guest (network namespace)
    assert os.stat("/proc/self/ns/net").st_ino != int(sys.argv[5])
    from cosock._offer import Offer
    from cosock._ring import create_channel_fd
    path, port, sport, nonce = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    offer = Offer(("127.0.0.1", port), ("127.0.0.1", sport), bytes.fromhex(nonce), 1 << 16, 4)
    fd = create_channel_fd(1 << 16)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendmsg([offer.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
              0, path)
    print("sent", flush=True)
"""


@pytest.mark.skipif(not IS_ROOT, reason="needs root: unshare(CLONE_NEWNET)")
def test_offer_from_another_netns_claiming_our_loopback_is_rejected() -> None:
    """A process in another network namespace reaches the rendezvous socket (it is a file)
    and claims a loopback 4-tuple of ours, nonce included: the sender's namespace is not
    ours, so the server rejects it; the victim gets plain TCP."""
    srv = listener()
    try:
        with bystander(srv) as pair, raw_client() as (cli, port):
            nonce = os.urandom(16)
            out = subprocess.run(
                [
                    "unshare",
                    "--net",
                    sys.executable,
                    "-c",
                    textwrap.dedent(_FORGER),
                    str(rv_of(srv).path),
                    str(port),
                    str(srv.getsockname()[1]),
                    nonce.hex(),
                    str(os.stat("/proc/self/ns/net").st_ino),
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.stdout.strip() == "sent", out.stderr
            cli.connect(srv.getsockname())
            cli.sendall(hello(nonce))
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(10)
                assert recv_all(cli, 2) == bytes([T_REJECT, REASON_OFFER_INVALID])
                assert conn.cosock_fallback_reason is FallbackReason.OFFER_INVALID
                cli.sendall(b"ping")
                assert recv_all(conn, 4) == b"ping"
            still_fine(pair)
    finally:
        srv.close()


# --------------------------------------------------------------------------- control stream

#: Frames no honest peer sends in the phase where they are injected.
GARBAGE = {
    "unknown-type": b"\xee",
    "hello-again": b"CSK\x01" + b"\x00" * 16,
    "accept-again": bytes([T_ACCEPT]),
    "reject-late": bytes([T_REJECT, 1]),
    "fin-behind-reader": b"\x04" + (0).to_bytes(8, "little"),  # 1 byte was read already
    "truncated-fin-then-eof": b"\x04\x01\x02",
}


@pytest.mark.parametrize("garbage", list(GARBAGE), ids=list(GARBAGE))
@pytest.mark.parametrize("victim", ["client", "server"])
def test_garbage_frames_in_shm_phase_reset_only_the_victim(victim: str, garbage: str) -> None:
    srv = listener()
    try:
        with bystander(srv) as pair, bystander(srv) as (cli, conn):
            attacker, target = (conn, cli) if victim == "client" else (cli, conn)
            target.sendall(b"queued before the garbage")
            socket.socket.sendall(attacker, GARBAGE[garbage])  # raw bytes on the TCP fd
            if garbage.startswith("truncated"):
                socket.socket.shutdown(attacker, socket.SHUT_WR)
            with pytest.raises(OSError) as info:
                for _ in range(100):  # bounded: every recv has the 10 s socket timeout
                    if not target.recv(4096):
                        break
                else:
                    pytest.fail("victim kept receiving")
            assert not isinstance(info.value, TimeoutError), "victim hung"
            still_fine(pair)
    finally:
        srv.close()


def test_fin_past_head_is_a_silent_peer_then_eof() -> None:
    """A FIN beyond what the peer wrote cannot be told from a peer that is slow to write:
    the victim waits (bounded by its own timeout) like for a silent TCP peer, and reads EOF
    as soon as the liar's TCP end goes away."""
    srv = listener()
    try:
        with bystander(srv) as pair, bystander(srv) as (cli, conn):
            socket.socket.sendall(conn, b"\x04" + (1 << 40).to_bytes(8, "little"))
            cli.settimeout(0.5)
            with pytest.raises(TimeoutError):
                cli.recv(10)
            conn.close()
            cli.settimeout(10)
            assert cli.recv(10) == b""
            still_fine(pair)
    finally:
        srv.close()


def test_unknown_reject_reason_is_a_forward_compatible_fallback() -> None:
    """REJECT with a reason code we do not know is still a REJECT (a newer server): the
    client falls back and resends its optimistic bytes over TCP."""
    srv = listener()
    try:
        cli = CoSocket()
        cli.settimeout(10)
        cli.connect(srv.getsockname())
        raw, _ = socket.socket.accept(srv)
        with cli, raw:
            raw.settimeout(10)
            assert recv_all(raw, 20).startswith(b"CSK")
            cli.sendall(b"optimistic")
            raw.sendall(bytes([T_REJECT, 250]))
            cli.settimeout(0.5)
            with pytest.raises(TimeoutError):  # processes the REJECT, then waits plainly
                cli.recv(1)
            assert cli.cosock_fallback_reason is FallbackReason.PEER_REJECTED
            assert recv_all(raw, 10) == b"optimistic"
            raw.sendall(b"pong")
            cli.settimeout(10)
            assert recv_all(cli, 4) == b"pong"
    finally:
        srv.close()


@pytest.mark.parametrize(
    "reply",
    [b"\xee", b"\x04" + b"\x00" * 8, b"HTTP/1.1 400 Bad\r\n\r\n", b""],
    ids=["unknown-type", "fin-before-verdict", "http", "eof"],
)
def test_garbage_instead_of_a_verdict_fails_the_client_cleanly(reply: bytes) -> None:
    """The server end is not cosock (it accepts with the plain socket API) and answers the
    HELLO with garbage: the client fails like a reset connection, never hangs."""
    srv = listener()
    try:
        with bystander(srv) as pair:
            cli = CoSocket()
            cli.settimeout(10)
            cli.connect(srv.getsockname())
            raw, _ = socket.socket.accept(srv)  # no rendezvous lookup: a raw server
            with cli, raw:
                raw.settimeout(10)
                assert raw.recv(4).startswith(b"CSK")
                cli.sendall(b"x")  # written optimistically into the ring
                if reply:
                    raw.sendall(reply)
                else:
                    raw.shutdown(socket.SHUT_WR)
                with pytest.raises(OSError) as info:
                    for _ in range(100):
                        if not cli.recv(100):
                            raise ConnectionResetError("clean EOF")
                assert not isinstance(info.value, TimeoutError), "client hung"
            still_fine(pair)
    finally:
        srv.close()


# --------------------------------------------------------------------------- fuzz targets

_FD_KINDS = st.sampled_from(["memfd", "pipe", "unsealed", "socket"])


def _make(kind: str) -> int:
    return {
        "memfd": lambda: create_channel_fd(CAP),
        "pipe": _pipe_fd,
        "unsealed": _unsealed_memfd,
        "socket": _socket_fd,
    }[kind]()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    dgrams=st.lists(
        st.tuples(
            st.one_of(
                st.binary(max_size=700),
                st.binary(min_size=OFFER_SIZE, max_size=OFFER_SIZE).map(
                    lambda b: b"CSKO\x01" + b[5:]
                ),
            ),
            st.lists(_FD_KINDS, max_size=3),
        ),
        max_size=6,
    )
)
def test_fuzz_rendezvous_datagrams(tmp_path: Path, dgrams: list[tuple[bytes, list[str]]]) -> None:
    """Random payloads with random fds: drain never raises, every datagram is counted
    (dropped with a reason or pending), every received fd is closed again."""
    from cosock._leaks import snapshot

    held = {fd for fd, t in snapshot().fds.items() if t.startswith(("/memfd:", "pipe:"))}
    rv = Rendezvous(Path("/tmp"))
    try:
        sent = 0
        for payload, kinds in dgrams:
            fds = [_make(k) for k in kinds]
            try:
                with contextlib.suppress(OSError):  # e.g. an empty datagram with no fds
                    send_dgram(rv.path, payload, fds)
                    sent += 1
            finally:
                for fd in fds:
                    os.close(fd)
        rv.drain()
        assert sum(rv.dropped.values()) + len(rv._pending) == sent
        assert set(rv.dropped) <= {"truncated", "fd-count", "malformed", "replaced", "replayed"}
    finally:
        rv.close()
    now = {fd for fd, t in snapshot().fds.items() if t.startswith(("/memfd:", "pipe:"))}
    assert now <= held


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_REQUESTS = st.fixed_dictionaries(
    {"op": st.sampled_from(["subscribe", "listen", "unlisten", "status", "register_guest", "x"])},
    optional={
        "addr": _JSON_VALUES,
        "port": _JSON_VALUES,
        "rendezvous": _JSON_VALUES,
        "name": _JSON_VALUES,
        "netns": _JSON_VALUES,
        "addresses": _JSON_VALUES,
    },
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    lines=st.lists(
        st.one_of(
            _REQUESTS.map(lambda r: json.dumps(r).encode()),
            st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_fuzz_agent_request_lines(cosock_agent: Path, lines: list[bytes]) -> None:
    """A live agent answers every line of arbitrary requests with one reply, and stays up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(cosock_agent))
        s.sendall(b"".join(line + b"\n" for line in lines))
        replies: list[dict[str, object]] = []
        buf = b""
        while len(replies) < sum(1 for line in lines if line.strip()):
            chunk = s.recv(1 << 16)
            assert chunk, "agent hung up"
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "push" not in msg:
                    replies.append(msg)
        assert all(isinstance(r.get("ok"), bool) for r in replies)
        assert all(not r["ok"] or "error" not in r for r in replies)
        s.sendall(b'{"op": "status"}\n')
        while b"\n" not in buf or all('"push"' in x for x in buf.decode().splitlines()):
            chunk = s.recv(1 << 16)
            assert chunk, "agent died"
            buf += chunk
        status = next(json.loads(x) for x in buf.splitlines() if b'"push"' not in x)
        assert status["ok"] is True


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=10), limit=st.integers(16, 4096))
def test_fuzz_agent_line_reader_and_decoder(chunks: list[bytes], limit: int) -> None:
    """The agent's line framing and JSON decoding raise only their own wire errors."""
    from cosock.agent._wire import LineReader, WireError, decode

    reader = LineReader(limit)
    for chunk in chunks:
        reader.feed(chunk)
        while True:
            try:
                line = reader.next_line()
            except WireError:
                return  # LineTooLong: the connection is dropped, by design
            if line is None:
                break
            assert len(line) <= limit + 1
            try:
                msg = decode(line)
            except WireError:
                continue
            assert isinstance(msg, dict)
    with contextlib.suppress(RemoteProtocolError):
        reader.take_rest()


# --------------------------------------------------------------------------- listener claims


def test_a_process_cannot_claim_a_listener_it_does_not_hold(cosock_agent: Path) -> None:
    """Another process of the guest asks the agent to publish *its* rendezvous for our
    server's address: refused (it holds no such listening socket), so clients keep
    offering their memfds to the real server only."""
    from cosock.agent.client import AgentClient, status

    srv = listener()
    addr, port = srv.getsockname()
    code = textwrap.dedent(
        f"""
        from pathlib import Path
        from cosock.agent.client import AgentClient
        from cosock._errors import AgentUnavailable
        c = AgentClient(Path({str(cosock_agent)!r}))
        try:
            c.listen({addr!r}, {port}, "/tmp/evil.sock")
            print("accepted")
        except (AgentUnavailable, OSError) as exc:
            print("refused", exc)
        c.close()
        """
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
        )
        assert out.stdout.startswith("refused"), out.stdout + out.stderr
        assert "holds no listening socket" in out.stdout
        assert status(cosock_agent)["counters"]["refused_listens"] == 1
        AgentClient.shared().poll()
        with bystander(srv) as pair:  # still offered to the real rendezvous
            still_fine(pair)
    finally:
        srv.close()


def test_hello_without_an_offer_is_rejected_not_handed_to_the_app() -> None:
    """The offer of a cosock client was taken by another process sharing the listener (a
    pre-forked sibling whose accept() drained the rendezvous): the server that accepts the
    connection must REJECT in-band, and its application must not read the HELLO as data."""
    srv = listener()
    try:
        cli = CoSocket()
        cli.settimeout(10)
        cli.connect(srv.getsockname())
        cli.sendall(b"request")
        pid = os.fork()
        if pid == 0:  # the sibling: drains the offer into its own table, then exits
            try:
                rv_of(srv).drain()
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        conn, _ = srv.accept()
        with cli, conn:
            conn.settimeout(10)
            assert conn.cosock_fallback_reason is FallbackReason.NO_OFFER
            reply: list[bytes] = []
            waiter = threading.Thread(target=lambda: reply.append(recv_all(cli, 5)))
            waiter.start()  # a client waiting for its reply (it resends after the REJECT)
            try:
                assert recv_all(conn, 7) == b"request"
                conn.sendall(b"reply")
            finally:
                waiter.join(15)
            assert reply == [b"reply"]
            assert cli.cosock_fallback_reason is FallbackReason.NO_OFFER
    finally:
        srv.close()


@pytest.mark.parametrize("target", ["offer", "protocol", "agent-wire"])
@pytest.mark.timeout(120)
def test_atheris_fuzz_targets(target: str) -> None:
    """Coverage-guided fuzzing of the peer-facing parsers (bounded: 20,000 runs each)."""
    pytest.importorskip("atheris", reason="atheris (libFuzzer for Python) is not installed")
    script = Path(__file__).with_name("fuzz_atheris.py")
    out = subprocess.run(
        [sys.executable, str(script), target, "-runs=20000", "-timeout=10", "-seed=1"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done 20000 runs" in out.stderr


# --------------------------------------------------------------------------- rendezvous limits


def test_offer_flood_cannot_exhaust_the_listeners_descriptors() -> None:
    """Each queued offer holds an fd: with a 256-fd limit at most 64 are kept, the oldest
    are closed and counted, and the listener can still accept."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        rv = Rendezvous(Path("/tmp"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        fd = create_channel_fd(CAP)
        try:
            for port in range(1000, 1200):
                offer = Offer(("127.0.0.1", port), ("127.0.0.1", 80), os.urandom(16), CAP, 4)
                send_dgram(rv.path, offer.encode(), [fd])
                if port % 8 == 0:
                    rv.drain()  # the listener's accept() drains as the flood comes in
        finally:
            os.close(fd)
        rv.drain()
        assert len(rv._pending) == 64
        assert rv.dropped == {"overflow": 200 - 64}
    finally:
        rv.close()


def test_short_rendezvous_dir_made_by_someone_else_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback directory for long agent paths is a fixed name under /tmp: if another
    user made it first, we must not put our socket where they can swap it."""
    from cosock import _rendezvous

    foreign = tmp_path / "short"
    foreign.mkdir(mode=0o777)
    os.chmod(foreign, 0o777)
    monkeypatch.setattr(_rendezvous, "_SHORT_DIR", str(foreign))
    deep = tmp_path / ("d" * 100)
    with pytest.raises(PermissionError):
        Rendezvous(deep)
    os.chmod(foreign, 0o700)
    rv = Rendezvous(deep)  # ours and private: fine
    try:
        assert rv.path.parent == foreign
    finally:
        rv.close()


@pytest.mark.skipif(not IS_ROOT, reason="needs root: runs a child as another user")
def test_only_root_or_the_agents_user_may_register_guests() -> None:
    """A shared agent's socket is open to every local user; registering (or removing) a
    guest is not: the uid comes from SO_PEERCRED, not from the request."""
    import shutil
    import tempfile

    from conftest import start_agent

    short = Path(tempfile.mkdtemp(prefix="csa-", dir="/dev/shm"))  # others may traverse it
    os.chmod(short, 0o755)
    proc = start_agent(short / "agent.sock", auto=False)
    code = textwrap.dedent(
        f"""
        import json, os, socket
        os.setgid(65534); os.setuid(65534)
        s = socket.socket(socket.AF_UNIX); s.settimeout(10)
        s.connect({str(short / "agent.sock")!r})
        for req in ({{"op": "register_guest", "name": "evil", "netns": 1, "addresses": []}},
                    {{"op": "unregister_guest", "name": "evil"}}):
            s.sendall(json.dumps(req).encode() + b"\\n")
            buf = b""
            while not buf.endswith(b"\\n"):
                buf += s.recv(4096)
            print(buf.decode().strip())
        """
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
        )
        replies = [json.loads(line) for line in out.stdout.splitlines()]
        assert len(replies) == 2, out.stderr
        for reply in replies:
            assert reply["ok"] is False and "permission denied" in reply["error"]
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(short, ignore_errors=True)


# --------------------------------------------------------------------------- more phases


def test_garbage_after_the_peers_fin_fails_later_calls_cleanly() -> None:
    """Half-closed peer (FIN sent), then garbage: we still read every byte and EOF; once
    the garbage is parsed our writes fail like on a reset connection, never block."""
    srv = listener()
    try:
        with bystander(srv) as pair, bystander(srv) as (cli, conn):
            conn.sendall(b"last words")
            conn.shutdown(socket.SHUT_WR)  # FIN frame
            socket.socket.sendall(conn, GARBAGE["unknown-type"])
            got = b""
            with contextlib.suppress(ConnectionResetError):
                got = recv_all(cli, 100)
            assert got in (b"last words", b"")  # all of it, or a reset: never other bytes
            with pytest.raises(OSError) as info:
                for _ in range(64):  # 4 MiB: more than the ring, which nobody drains
                    cli.sendall(b"z" * 65536)
            assert not isinstance(info.value, TimeoutError), "writer hung"
            still_fine(pair)
    finally:
        srv.close()


def test_garbage_in_the_ring_flags_never_corrupts_data() -> None:
    """The peer scribbles random values over the wake-up flags of both rings (spinning,
    doorbell count, space request and answer) during a transfer both ways: the bytes stay
    exact and the transfer ends (flags only steer wake-ups; the 5 s safety net bounds a
    wake-up the liar talked us out of)."""
    import hashlib
    import random
    import threading as th

    from cosock._ring import _BELLS, _SPACE_RUNG, _SPACE_WAIT, _SPINNING

    srv = listener()
    try:
        with bystander(srv) as (cli, conn):
            cli.settimeout(60)
            conn.settimeout(60)
            ch = conn._co
            assert ch is not None and ch.tx is not None and ch.rx is not None
            headers = [ch.tx._hdr, ch.rx._hdr]  # the same memory the peer maps
            stop = th.Event()

            def scribble() -> None:
                rng = random.Random(5)
                while not stop.wait(0.001):
                    hdr = rng.choice(headers)
                    slot = rng.choice([_SPINNING, _BELLS, _SPACE_WAIT, _SPACE_RUNG])
                    hdr[slot] = rng.choice([0, 1, 2, (1 << 64) - 1, rng.getrandbits(64)])

            data = os.urandom(4 * MIB_)
            results: dict[str, bytes] = {}

            def reader(sock: CoSocket, name: str) -> None:
                results[name] = recv_all(sock, len(data))

            vandal = th.Thread(target=scribble)
            readers = [th.Thread(target=reader, args=(s, n)) for s, n in ((conn, "s"), (cli, "c"))]
            vandal.start()
            for t in readers:
                t.start()
            try:
                cli.sendall(data)
                conn.sendall(data)
            finally:
                for t in readers:
                    t.join(90)
                stop.set()
                vandal.join()
            digest = hashlib.sha256(data).digest()
            assert {k: hashlib.sha256(v).digest() == digest for k, v in results.items()} == {
                "s": True,
                "c": True,
            }
    finally:
        srv.close()
