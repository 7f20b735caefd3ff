"""TLS over cosock: ``SSLContext.wrap_socket`` on accelerated CoSockets (client and server
both on the shared-memory path), stdlib HTTPS and asyncio TLS.  Each case runs on plain
sockets and under ``cosock.enable()`` on loopback guests (a private agent), with the same
assertions; certificates come from a throwaway CA (trustme)."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import http.server
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trustme

import cosock
from cosock import CoSocket
from cosock._intercept import get_original
from sockutil import recv_all

MODES = ["plain", "cosock"]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "cosock":
        request.getfixturevalue("cosock_agent")
        cosock.enable()
        try:
            yield "cosock"
        finally:
            cosock.disable()
    else:
        yield "plain"


def expect_path(mode: str, *socks: Any) -> None:
    """cosock mode: every socket is a CoSocket on the shared-memory path; plain: none is."""
    for s in socks:
        if mode == "cosock":
            assert isinstance(s, CoSocket) and s.cosock_path == "shm", s
        else:
            assert not isinstance(s, CoSocket)


class Peer:
    """A server-side function run on one accepted connection in a thread; its result or
    exception comes back through ``result()``."""

    def __init__(self, srv: socket.socket, fn: Callable[[socket.socket], Any]) -> None:
        self._srv = srv
        self._fn = fn
        self._out: list[Any] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self._srv.accept()
            conn.settimeout(20)
            with conn:
                self._out.append(("ok", self._fn(conn)))
        except BaseException as exc:  # reported to the test
            self._out.append(("err", exc))

    def result(self) -> Any:
        self._thread.join(30)
        assert not self._thread.is_alive(), "server thread hung"
        kind, value = self._out[0]
        if kind == "err":
            raise value
        return value


@pytest.fixture
def listener(mode: str) -> Iterator[socket.socket]:
    srv = socket.create_server(("127.0.0.1", 0))
    yield srv
    srv.close()


def connect(srv: socket.socket, timeout: float | None = 20) -> socket.socket:
    return socket.create_connection(srv.getsockname(), timeout=timeout)


# ---------------------------------------------------------------------- blocking sockets


def test_handshake_and_megabytes_both_ways(mode, listener, server_ctx, client_ctx):
    up = os.urandom(3 << 20)
    down = os.urandom((2 << 20) + 123)

    def serve(conn: socket.socket) -> Any:
        tls = server_ctx.wrap_socket(conn, server_side=True)
        expect_path(mode, tls)
        got = recv_all(tls, len(up))
        tls.sendall(down)
        info = (tls.version(), tls.cipher(), tls.server_side, hashlib.sha256(got).digest())
        tls.close()
        return info

    peer = Peer(listener, serve)
    tls = client_ctx.wrap_socket(connect(listener), server_hostname="localhost")
    assert isinstance(tls, ssl.SSLSocket)
    expect_path(mode, tls)
    if mode == "cosock":
        # A sender thread beside the reader: cosock serialises its SSL object per
        # operation (docs/transparency.md), so one socket may be used both ways at once.
        sender = threading.Thread(target=tls.sendall, args=(up,))
        sender.start()
        back = recv_all(tls, len(down))
        sender.join(20)
        assert not sender.is_alive(), "sender hung"
    else:
        # The stdlib's SSLSocket is not made for that: SSL_read and SSL_write of two
        # threads share the SSL object (its rwstate, read by SSL_get_error), and now and
        # then (about 1 run in 150 under load) a read that had to wait was reported as
        # an EOF, suppressed as ragged: recv() returned b"" before the server's bytes.
        # The server reads everything before it answers, so one thread suffices here.
        tls.sendall(up)
        back = recv_all(tls, len(down))
    version, cipher, server_side, digest = peer.result()
    assert hashlib.sha256(back).digest() == hashlib.sha256(down).digest()
    assert digest == hashlib.sha256(up).digest()
    assert (version, cipher) == (tls.version(), tls.cipher())
    assert version == "TLSv1.3" and server_side and not tls.server_side
    cert = tls.getpeercert()
    assert ("DNS", "localhost") in cert["subjectAltName"]
    assert tls.getpeercert(binary_form=True)
    assert tls.selected_alpn_protocol() is None and tls.pending() == 0
    assert tls.recv(10) == b""  # the server closed without close_notify: ragged EOF
    expect_path(mode, tls)
    tls.close()


def test_unwrap_returns_the_plain_connection(mode, listener, server_ctx, client_ctx):
    def serve(conn: socket.socket) -> Any:
        tls = server_ctx.wrap_socket(conn, server_side=True)
        assert recv_all(tls, 5) == b"hello"
        assert tls.recv(10) == b""  # the client's close_notify
        plain = tls.unwrap()
        assert plain is tls
        data = recv_all(plain, 16)
        plain.sendall(b"plain reply")
        plain.close()  # the TLS object owns the fd now (wrap_socket detached ``conn``)
        return data

    peer = Peer(listener, serve)
    tls = client_ctx.wrap_socket(connect(listener), server_hostname="localhost")
    tls.sendall(b"hello")
    plain = tls.unwrap()  # close_notify out, the server's in
    plain.sendall(b"after TLS, clear")
    assert recv_all(plain, 11) == b"plain reply"
    assert peer.result() == b"after TLS, clear"
    with pytest.raises(ValueError):
        tls.read(1)  # no SSL wrapper any more
    expect_path(mode, plain)
    plain.close()


def test_close_notify_versus_abrupt_close(mode, listener, server_ctx, client_ctx):
    def serve(conn: socket.socket) -> Any:
        tls = server_ctx.wrap_socket(conn, server_side=True)
        tls.sendall(b"bye")
        tls.unwrap()  # sends close_notify, waits for the client's
        return True

    peer = Peer(listener, serve)
    tls = client_ctx.wrap_socket(
        connect(listener), server_hostname="localhost", suppress_ragged_eofs=False
    )
    assert recv_all(tls, 3) == b"bye"
    assert tls.recv(10) == b""  # close_notify: a clean end, no error
    tls.unwrap()
    assert peer.result()
    tls.close()

    peer = Peer(listener, lambda conn: server_ctx.wrap_socket(conn, server_side=True).close())
    tls = client_ctx.wrap_socket(
        connect(listener), server_hostname="localhost", suppress_ragged_eofs=False
    )
    peer.result()
    with pytest.raises(ssl.SSLEOFError):
        tls.recv(10)  # no close_notify: a truncation the caller asked to see
    tls.close()


def test_read_and_handshake_timeouts(mode, listener, server_ctx, client_ctx):
    release = threading.Event()

    def serve(conn: socket.socket) -> Any:
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            release.wait(10)
            tls.sendall(b"late")
        return True

    peer = Peer(listener, serve)
    tls = client_ctx.wrap_socket(connect(listener, timeout=0.3), server_hostname="localhost")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="The read operation timed out"):
        tls.recv(10)
    assert time.monotonic() - t0 < 5
    release.set()
    tls.settimeout(10)
    assert recv_all(tls, 4) == b"late"
    assert peer.result()
    tls.close()

    silent = Peer(listener, lambda conn: time.sleep(1.5))  # never answers the hello
    raw = connect(listener, timeout=0.3)
    with pytest.raises(TimeoutError, match="The handshake operation timed out"):
        client_ctx.wrap_socket(raw, server_hostname="localhost")
    silent.result()
    raw.close()


def test_wrap_before_connect_and_wrapped_listener(mode, server_ctx, client_ctx):
    srv = server_ctx.wrap_socket(socket.create_server(("127.0.0.1", 0)), server_side=True)
    assert isinstance(srv, ssl.SSLSocket)
    got: list[Any] = []

    def serve() -> None:
        conn, _ = srv.accept()  # handshake on accept, like http.server over TLS
        with conn:
            expect_path(mode, conn)
            got.append(recv_all(conn, 4))
            conn.sendall(b"pong")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    cli = client_ctx.wrap_socket(socket.socket(), server_hostname="localhost")
    cli.settimeout(20)
    cli.connect(srv.getsockname())
    expect_path(mode, cli)
    cli.sendall(b"ping")
    assert recv_all(cli, 4) == b"pong"
    t.join(20)
    assert got == [b"ping"]
    cli.close()
    srv.close()


# ---------------------------------------------------------------------- non-blocking


def _until(sel: selectors.BaseSelector, sock: socket.socket, step: Callable[[], Any]) -> Any:
    """Retry ``step`` until it stops asking for I/O, waiting on the selector as it asks."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            return step()
        except ssl.SSLWantReadError:
            sel.modify(sock, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            sel.modify(sock, selectors.EVENT_WRITE)
        sel.select(5)
    raise AssertionError("no progress")


def test_nonblocking_want_read_and_want_write(mode, listener, server_ctx, client_ctx):
    blob = os.urandom(6 << 20)  # more than a ring or a socket buffer holds
    go = threading.Event()

    def serve(conn: socket.socket) -> Any:
        tls = server_ctx.wrap_socket(conn, server_side=True)
        tls.sendall(b"x")
        go.wait(20)
        data = recv_all(tls, len(blob))
        tls.sendall(hashlib.sha256(data).digest())
        tls.close()  # the TLS object owns the fd now (wrap_socket detached ``conn``)
        return len(data)

    peer = Peer(listener, serve)
    raw = connect(listener)
    raw.setblocking(False)
    tls = client_ctx.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
    sel = selectors.DefaultSelector()  # under enable(): the ring-aware one
    sel.register(tls, selectors.EVENT_READ)
    _until(sel, tls, tls.do_handshake)  # raises SSLWantReadError while the server thinks
    assert _until(sel, tls, lambda: tls.recv(10)) == b"x"
    try:
        extra = tls.recv(10)
    except ssl.SSLWantReadError:
        extra = None
    assert extra is None, extra
    # Fill every buffer until the write would block, then let the server drain.
    sent = 0
    with pytest.raises(ssl.SSLWantWriteError):
        for _ in range(10_000):
            sent += tls.send(blob[sent : sent + 65536])
    go.set()
    while sent < len(blob):
        chunk = blob[sent : sent + 65536]
        sent += _until(sel, tls, lambda c=chunk: tls.send(c))
    digest = _until(sel, tls, lambda: tls.recv(32))
    assert digest == hashlib.sha256(blob).digest()
    assert peer.result() == len(blob)
    expect_path(mode, tls)
    sel.close()
    tls.close()
    raw = connect(listener)  # never accepted: the check comes before any I/O
    raw.setblocking(False)
    with pytest.raises(ValueError, match="non-blocking"):
        client_ctx.wrap_socket(raw, server_hostname="localhost")


# ---------------------------------------------------------------------- stdlib and asyncio


def test_https_server_and_http_client(mode, server_ctx, client_ctx):
    paths: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            paths.append(getattr(self.connection, "cosock_path", "plain"))
            body = hashlib.sha256(self.path.encode()).hexdigest().encode() * 1000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    t.start()
    try:
        conn = http.client.HTTPSConnection(
            "localhost", server.server_address[1], context=client_ctx, timeout=20
        )
        for i in range(3):  # keep-alive: one TLS connection, three requests
            conn.request("GET", f"/item/{i}")
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.read() == hashlib.sha256(f"/item/{i}".encode()).hexdigest().encode() * 1000
        expect_path(mode, conn.sock)
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
        t.join(10)
    assert paths == (["shm"] * 3 if mode == "cosock" else ["plain"] * 3)


def test_asyncio_tls_echo_and_start_tls(mode, server_ctx, client_ctx):
    payload = os.urandom(2 << 20)

    async def main() -> tuple[bytes, bytes, list[str]]:
        seen: list[str] = []

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(_path(writer))
            line = await reader.readline()
            if line == b"STARTTLS\n":
                writer.write(b"GO\n")  # the client starts TLS only after this
                await writer.drain()
                await writer.start_tls(server_ctx)
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        tls_server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
        plain_server = await asyncio.start_server(echo, "127.0.0.1", 0)
        async with tls_server, plain_server:
            # TLS from the first byte.
            r, w = await asyncio.open_connection(
                "127.0.0.1",
                tls_server.sockets[0].getsockname()[1],
                ssl=client_ctx,
                server_hostname="localhost",
            )
            seen.append(_path(w))
            reading = asyncio.create_task(r.readexactly(len(payload)))  # echo flows back
            w.write(b"HELLO\n" + payload)
            await w.drain()
            first = await reading
            w.close()
            await w.wait_closed()
            # Plain, then upgraded in place (STARTTLS).
            r, w = await asyncio.open_connection(
                "127.0.0.1", plain_server.sockets[0].getsockname()[1]
            )
            w.write(b"STARTTLS\n")
            await w.drain()
            assert await r.readline() == b"GO\n"
            await w.start_tls(client_ctx, server_hostname="localhost")
            seen.append(_path(w))
            reading = asyncio.create_task(r.readexactly(100_000))
            w.write(payload[:100_000])
            await w.drain()
            second = await reading
            w.close()
            await w.wait_closed()
        return first, second, seen

    first, second, seen = asyncio.run(asyncio.wait_for(main(), 40))
    assert first == payload and second == payload[:100_000]
    assert seen == (["shm"] * len(seen) if mode == "cosock" else ["plain"] * len(seen))
    assert len(seen) == 4


def _path(writer: asyncio.StreamWriter) -> str:
    """The data path under an asyncio transport (TLS or not)."""
    sock = writer.get_extra_info("socket")
    raw = getattr(sock, "_sock", sock)
    return raw.cosock_path if isinstance(raw, CoSocket) else "plain"


def test_enable_disable_restores_sslsocket_class(cosock_agent):
    original = ssl.SSLContext.sslsocket_class
    assert original is get_original(ssl.SSLContext, "sslsocket_class")
    cosock.enable()
    try:
        assert ssl.SSLContext.sslsocket_class is not original
        assert issubclass(ssl.SSLContext.sslsocket_class, ssl.SSLSocket)
        # A socket that is not a CoSocket (Unix, or made before enable()) gets the stdlib class.
        a, b = socket.socketpair()
        ctx = ssl.create_default_context()
        wrapped = ctx.wrap_socket(a, do_handshake_on_connect=False, server_hostname="x")
        assert type(wrapped) is original
        wrapped.close()
        b.close()
    finally:
        cosock.disable()
    assert ssl.SSLContext.sslsocket_class is original


def test_mixed_peers_and_a_stale_offer_fall_back_to_plain_tls(cosock_agent, server_ctx, client_ctx):
    """A plain TLS client to a cosock server (no offer), and a plain client reusing the
    4-tuple of someone's stale offer (the server starts on a channel, then falls back with
    the ClientHello owed to the application): TLS works both times."""
    from sockutil import stale_offer_plain_pair

    plain_cls = get_original(socket, "socket")
    lsrv, plain, conn = stale_offer_plain_pair()  # its client must be a plain socket
    cosock.enable()
    try:
        srv = socket.create_server(("127.0.0.1", 0))
        peer = Peer(srv, lambda conn: _tls_echo(server_ctx, conn))
        raw = plain_cls()
        raw.settimeout(20)
        raw.connect(srv.getsockname())
        tls = client_ctx.wrap_socket(raw, server_hostname="localhost")
        assert type(tls) is get_original(ssl.SSLContext, "sslsocket_class")
        tls.sendall(b"plain client")
        assert recv_all(tls, 12) == b"plain client"
        tls.close()
        assert peer.result() == "tcp"
        srv.close()

        assert conn.cosock_path == "handshake"  # waiting for a HELLO that never comes
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(_tls_echo(server_ctx, conn)))
        t.start()
        tls = client_ctx.wrap_socket(plain, server_hostname="localhost")
        tls.sendall(b"stale offer")
        assert recv_all(tls, 11) == b"stale offer"
        tls.close()
        t.join(20)
        assert out == ["tcp"]
    finally:
        cosock.disable()
        lsrv.close()


def _tls_echo(ctx: ssl.SSLContext, conn: socket.socket) -> str:
    tls = ctx.wrap_socket(conn, server_side=True)
    while data := tls.recv(65536):
        tls.sendall(data)
    path: str = tls.cosock_path  # type: ignore[attr-defined]
    tls.close()
    return path
