"""Unmodified application programs for the transparency tests (``test_apps.py``).

Nothing here imports cosock: the tests start these programs under ``cosock run -- python
...`` (or without it), exactly as a user would start their own.

Servers (all serve the same three resources, and report in an ``x-client-port`` header
the client port they saw, so a test can tell keep-alive from new connections):

    GET  /bytes/N          N bytes of :func:`payload`, with a Content-Length
    GET  /chunked/N?c=C    the same N bytes streamed in C-byte pieces (chunked encoding)
    POST /echo             the request body back

    uvicorn:     python -m uvicorn app_programs:asgi_app --loop asyncio --http h11 ...
    aiohttp:     python -m aiohttp.web -H HOST -P PORT app_programs:aiohttp_app
    wsgiref:     python app_programs.py wsgiref-server HOST PORT
    stdlib ones: python app_programs.py {xmlrpc,forking,ftp,smtp}-server HOST PORT

Clients: ``python app_programs.py CLIENT HOST PORT``, one of ``httpx``, ``aiohttp``,
``requests``, ``urllib`` (HTTP, the script below), ``xmlrpc``, ``forking``, ``ftp``,
``smtp``.  A client prints one JSON line (what it received: length and sha256 of each
body, the client ports the server saw), then keeps its connections open until a line
arrives on stdin, so that the test can look at them in ``cosock status``; then it exits.
A server prints ``{"listening": PORT}`` when it is ready (the third-party ones log their
own start-up line instead).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

#: The HTTP exchanges every HTTP client makes, in order, on one keep-alive connection:
#: (name, method, path, request body size).  Sizes are odd on purpose.
SCRIPT: list[tuple[str, str, str, int]] = [
    ("small", "GET", "/bytes/64", 0),
    ("large", "GET", "/bytes/2097169", 0),
    ("chunked", "GET", "/chunked/1048583?c=65537", 0),
    ("echo", "POST", "/echo", 1048609),
    ("large-again", "GET", "/bytes/524309", 0),
    ("chunked-small-pieces", "GET", "/chunked/100003?c=997", 0),
    ("empty", "GET", "/bytes/0", 0),
]


def payload(n: int, seed: bytes = b"cosock-apps") -> bytes:
    """``n`` deterministic bytes in which any lost, doubled or moved piece shows."""
    return hashlib.shake_256(seed).digest(n) if n else b""


def expected() -> dict[str, list[Any]]:
    """What every HTTP client must report for :data:`SCRIPT`: name -> [length, sha256]."""
    out: dict[str, list[Any]] = {}
    for name, _method, path, upload in SCRIPT:
        if path == "/echo":
            body = payload(upload, b"upload")
        else:
            body = payload(int(path.split("/")[2].split("?")[0]))
        out[name] = [len(body), hashlib.sha256(body).hexdigest()]
    return out


def _digest(body: bytes) -> list[Any]:
    return [len(body), hashlib.sha256(body).hexdigest()]


def _parse(path: str) -> tuple[str, int, int]:
    """``/bytes/N`` or ``/chunked/N?c=C`` -> (kind, N, C)."""
    route, _, query = path.partition("?")
    _, kind, n = route.split("/")
    chunk = int(query.split("=")[1]) if query else 65536
    return kind, int(n), chunk


def _hold_then_exit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)
    sys.stdin.readline()


#### uvicorn (ASGI)


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    port = str(scope["client"][1]).encode()
    path = scope["path"] + ("?" + scope["query_string"].decode() if scope["query_string"] else "")
    if path == "/echo":
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(b"content-length", str(len(body)).encode()), (b"x-client-port", port)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": bytes(body)})
        return
    kind, n, chunk = _parse(path)
    data = payload(n)
    if kind == "bytes":
        headers = [(b"content-length", str(n).encode()), (b"x-client-port", port)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})
        return
    # No Content-Length and several body messages: uvicorn sends chunked encoding.
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"x-client-port", port)]}
    )
    for i in range(0, n, chunk):
        await send({"type": "http.response.body", "body": data[i : i + chunk], "more_body": True})
    await send({"type": "http.response.body", "body": b""})


#### aiohttp server


def aiohttp_app(argv: list[str]) -> Any:
    from aiohttp import web

    def port_of(request: web.Request) -> str:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return str(peer[1]) if peer else "?"

    async def get_bytes(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        return web.Response(body=payload(n), headers={"x-client-port": port_of(request)})

    async def get_chunked(request: web.Request) -> web.StreamResponse:
        n, chunk = int(request.match_info["n"]), int(request.query.get("c", "65536"))
        response = web.StreamResponse(headers={"x-client-port": port_of(request)})
        response.enable_chunked_encoding()
        await response.prepare(request)
        data = payload(n)
        for i in range(0, n, chunk):
            await response.write(data[i : i + chunk])
        await response.write_eof()
        return response

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return web.Response(body=body, headers={"x-client-port": port_of(request)})

    app = web.Application(client_max_size=64 << 20)
    app.add_routes(
        [
            web.get("/bytes/{n}", get_bytes),
            web.get("/chunked/{n}", get_chunked),
            web.post("/echo", echo),
        ]
    )
    return app


#### HTTP clients


def client_httpx(base: str) -> dict[str, Any]:
    import httpx

    bodies, ports = {}, set()
    client = httpx.Client(base_url=base, timeout=30)
    for name, method, path, upload in SCRIPT:
        content = payload(upload, b"upload") if upload else None
        if path.startswith("/chunked"):
            with client.stream(method, path) as r:
                body = b"".join(r.iter_raw())  # as it streams in, no decoding
                assert r.headers.get("transfer-encoding") == "chunked", r.headers
        else:
            r = client.request(method, path, content=content)
            body = r.content
        assert r.status_code == 200, r.status_code
        bodies[name] = _digest(body)
        ports.add(r.headers["x-client-port"])
    _hold_then_exit({"bodies": bodies, "ports": sorted(ports)})
    client.close()
    return {}


def client_requests(base: str) -> dict[str, Any]:
    import requests

    bodies, ports = {}, set()
    session = requests.Session()
    for name, method, path, upload in SCRIPT:
        data = payload(upload, b"upload") if upload else None
        stream = path.startswith("/chunked")
        r = session.request(method, base + path, data=data, stream=stream, timeout=30)
        if stream:
            assert r.headers.get("transfer-encoding") == "chunked", r.headers
            body = b"".join(r.iter_content(chunk_size=8191))
        else:
            body = r.content
        assert r.status_code == 200, r.status_code
        bodies[name] = _digest(body)
        ports.add(r.headers["x-client-port"])
    _hold_then_exit({"bodies": bodies, "ports": sorted(ports)})
    session.close()
    return {}


def client_aiohttp(base: str) -> dict[str, Any]:
    import asyncio

    import aiohttp

    async def main() -> None:
        bodies, ports = {}, set()
        async with aiohttp.ClientSession(base) as session:
            for name, method, path, upload in SCRIPT:
                data = payload(upload, b"upload") if upload else None
                async with session.request(method, path, data=data) as r:
                    assert r.status == 200, r.status
                    if path.startswith("/chunked"):
                        assert r.headers.get("transfer-encoding") == "chunked", r.headers
                        parts = [p async for p in r.content.iter_chunked(8191)]
                        body = b"".join(parts)
                    else:
                        body = await r.read()
                    bodies[name] = _digest(body)
                    ports.add(r.headers["x-client-port"])
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                None, _hold_then_exit, {"bodies": bodies, "ports": sorted(ports)}
            )

    asyncio.run(main())
    return {}


def client_aiohttp_uvloop(base: str) -> dict[str, Any]:
    """The aiohttp client on uvloop: libuv makes the socket, Python never sees it."""
    import asyncio

    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return client_aiohttp(base)


def client_uvloop_streams(base: str, own_socket: bool = False) -> dict[str, Any]:
    """asyncio streams on uvloop (libuv makes the socket), raw HTTP/1.1 keep-alive GETs.
    With ``own_socket`` the connection is made in Python first and handed to the loop
    (``open_connection(sock=...)``)."""
    import asyncio
    import socket
    from urllib.parse import urlsplit

    import uvloop

    url = urlsplit(base)
    gets = [(n, m, p) for n, m, p, _ in SCRIPT if m == "GET" and p.startswith("/bytes/")]

    async def main() -> dict[str, Any]:
        if own_socket:
            sock = socket.create_connection((url.hostname, url.port), timeout=10)
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
        else:
            reader, writer = await asyncio.open_connection(url.hostname, url.port)
        bodies, ports = {}, set()
        for name, _method, path in gets:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            head = raw_head.decode(errors="replace").lower().split("\r\n")
            headers = dict(h.split(": ", 1) for h in head[1:] if h)
            assert head[0].startswith("http/1.1 200"), head
            bodies[name] = _digest(await reader.readexactly(int(headers["content-length"])))
            ports.add(headers["x-client-port"])
        sockname = writer.get_extra_info("socket")
        result = {"bodies": bodies, "ports": sorted(ports), "sock": type(sockname).__name__}
        await asyncio.get_running_loop().run_in_executor(None, _hold_then_exit, result)
        writer.close()
        return result

    uvloop.run(main())
    return {}


def client_urllib(base: str) -> dict[str, Any]:
    """urllib.request: one connection per request (it sends Connection: close).  The last
    request is held with its body half read, so its connection is open while the test
    looks; the body's digest follows on a second line."""
    import urllib.request

    bodies, ports = {}, set()
    for name, method, path, upload in SCRIPT:
        data = payload(upload, b"upload") if upload else None
        req = urllib.request.Request(base + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
            bodies[name] = _digest(body)
            ports.add(r.headers["x-client-port"])
    with urllib.request.urlopen(base + f"/bytes/{HELD}", timeout=30) as r:
        first = r.read(1000)
        _hold_then_exit(
            {"bodies": bodies, "ports": sorted(ports), "held": r.headers["x-client-port"]}
        )
        body = first + r.read()
    print(json.dumps({"held": _digest(body)}), flush=True)
    return {}


#: A body larger than a ring (1 MiB by default): its sender blocks while the reader holds.
HELD = 6_291_469


def client_hold_get(host: str, port: int) -> None:
    """http.client GET /held.bin, held after its first bytes (its connection open while
    the test looks); then the rest, and the whole body's digest on a second line."""
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/held.bin")
    response = conn.getresponse()
    first = response.read(1000)
    sock = response.fp.raw._sock  # type: ignore[union-attr]  # HTTP/1.0: the response owns it
    _hold_then_exit({"status": response.status, "port": sock.getsockname()[1]})
    print(json.dumps({"held": _digest(first + response.read())}), flush=True)
    conn.close()


#### uvloop: a listening socket made in Python, handed to the loop (as gunicorn does)


def server_uvloop_sock(host: str, port: int) -> None:
    import asyncio
    import socket

    import uvloop

    class Upper(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data.upper())

    async def main() -> None:
        sock = socket.create_server((host, port), family=_family(host))
        server = await asyncio.get_running_loop().create_server(Upper, sock=sock)
        _ready(sock.getsockname()[1])
        await server.serve_forever()

    uvloop.run(main())


def server_uvloop_accepted(host: str, port: int) -> None:
    """Accept one connection in Python, talk on it (on a co-resident pair: through the
    rings), then hand it to uvloop's ``connect_accepted_socket`` to upper-case the rest."""
    import asyncio
    import socket

    import uvloop

    class Upper(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data.upper())

    srv = socket.create_server((host, port), family=_family(host))
    _ready(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.settimeout(10)
    line = b""
    while not line.endswith(b"\n"):  # exactly the first line: the rest stays unread
        line += conn.recv(1)
    conn.sendall(f"{getattr(conn, 'cosock_path', 'plain')}\n".encode())

    async def main() -> None:
        conn.setblocking(False)
        await asyncio.get_running_loop().connect_accepted_socket(Upper, conn)
        await asyncio.Event().wait()

    uvloop.run(main())


def client_upper_many(host: str, port: int) -> None:
    """Lines to the uvloop-accepted server, some sent before it hands the connection over
    (unread in its ring then), the rest after; every byte must come back upper-cased."""
    import socket

    blob = b"".join(b"line %05d %s\n" % (i, b"x" * 1000) for i in range(300))
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"first\n")
        sock.sendall(blob[:100_000])
        first = b""
        while not first.endswith(b"\n"):
            first += sock.recv(1)
        sock.sendall(blob[100_000:])
        got = bytearray()
        while len(got) < len(blob):
            chunk = sock.recv(len(blob) - len(got))
            if not chunk:
                break
            got += chunk
        _hold_then_exit(
            {
                "ok": got == blob.upper(),
                "server_path_before": first.decode().strip(),
                "path": getattr(sock, "cosock_path", "plain"),
            }
        )


def client_upper(host: str, port: int) -> None:
    import socket

    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"hello uvloop\n")
        try:
            got = sock.recv(100).decode()
        except OSError as exc:
            got = repr(exc)
        _hold_then_exit({"got": got})


#### wsgiref


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    port = environ.get("REMOTE_PORT", "?")
    path = environ["PATH_INFO"] + ("?" + environ["QUERY_STRING"] if environ["QUERY_STRING"] else "")
    if path == "/echo":
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    else:
        _kind, n, _chunk = _parse(path)
        body = payload(n)
    start_response("200 OK", [("Content-Length", str(len(body))), ("x-client-port", port)])
    return [body]


def server_wsgiref(host: str, port: int) -> None:
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Handler(WSGIRequestHandler):
        def get_environ(self) -> dict[str, Any]:
            env = super().get_environ()
            env["REMOTE_PORT"] = str(self.client_address[1])
            return env

        def log_message(self, *args: Any) -> None:
            pass

    class Server(WSGIServer):
        address_family = _family(host)

    with make_server(host, port, wsgi_app, Server, Handler) as httpd:
        _ready(httpd.server_address[1])
        httpd.serve_forever()


#### xmlrpc


def server_xmlrpc(host: str, port: int) -> None:
    import xmlrpc.client
    from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

    class Handler(SimpleXMLRPCRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: ServerProxy reuses its connection

        def log_message(self, *args: Any) -> None:
            pass

    class Server(SimpleXMLRPCServer):
        address_family = _family(host)

    with Server((host, port), Handler, allow_none=True) as server:

        def blob(n: int) -> xmlrpc.client.Binary:
            return xmlrpc.client.Binary(payload(n))

        def digest(data: xmlrpc.client.Binary) -> list[Any]:
            return _digest(data.data)

        server.register_function(blob)
        server.register_function(digest)
        server.register_function(lambda a, b: a + b, "add")
        _ready(server.server_address[1])
        server.serve_forever()


def client_xmlrpc(host: str, port: int) -> None:
    import xmlrpc.client

    proxy = xmlrpc.client.ServerProxy(f"http://{_url_host(host)}:{port}/")
    got = {
        "add": proxy.add(20, 22),
        "blob": _digest(proxy.blob(1_500_007).data),
        "digest": proxy.digest(xmlrpc.client.Binary(payload(999_983, b"upload"))),
    }
    conn = proxy("transport")._connection[1]  # the kept-alive http.client connection
    _hold_then_exit({"results": got, "port": conn.sock.getsockname()[1]})
    proxy("close")()


#### ForkingTCPServer: a line-echo service, each connection in a forked child


def server_forking(host: str, port: int) -> None:
    import socketserver

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            # Upper-cases each line, then reports its pid so the test sees the fork.
            for line in self.rfile:
                if line == b"BYE\n":
                    break
                self.wfile.write(line.upper())
            self.wfile.write(f"pid {os.getpid()}\n".encode())
            self.wfile.flush()

    class Server(socketserver.ForkingTCPServer):
        address_family = _family(host)
        allow_reuse_address = True

    with Server((host, port), Handler) as server:
        _ready(server.server_address[1])
        server.serve_forever()


def client_forking(host: str, port: int) -> None:
    import socket

    lines = [payload(4096 + i, bytes([i])).hex().encode() + b"\n" for i in range(40)]
    with socket.create_connection((host, port), timeout=30) as sock:
        f = sock.makefile("rwb")
        got = []
        for line in lines:
            f.write(line)
            f.flush()
            got.append(f.readline())
        ok = got == [line.upper() for line in lines]
        _hold_then_exit({"ok": ok, "lines": len(got), "port": sock.getsockname()[1]})
        f.write(b"BYE\n")
        f.flush()
        pid_line = f.readline().decode().split()
        f.close()
    print(json.dumps({"child_pid": int(pid_line[1])}), flush=True)


#### FTP-style: a control connection and a passive data connection per transfer


def server_ftp(host: str, port: int) -> None:
    """A minimal FTP server (USER/PASS/TYPE/PASV/EPSV/RETR/STOR/SIZE/QUIT), stdlib only,
    enough for ftplib: every transfer opens a second connection to a passive port."""
    import socket
    import socketserver

    files = {"big.bin": payload(3_000_017), "small.txt": b"hello ftp\r\n"}

    class Handler(socketserver.StreamRequestHandler):
        def reply(self, text: str) -> None:
            self.wfile.write(text.encode() + b"\r\n")
            self.wfile.flush()

        def handle(self) -> None:
            self.reply("220 cosock test ftp")
            passive: socket.socket | None = None
            while True:
                line = self.rfile.readline().decode().rstrip("\r\n")
                if not line:
                    return
                cmd, _, arg = line.partition(" ")
                cmd = cmd.upper()
                if cmd == "USER":
                    self.reply("331 password please")
                elif cmd == "PASS":
                    self.reply("230 logged in")
                elif cmd == "TYPE":
                    self.reply("200 type set")
                elif cmd in ("PASV", "EPSV"):
                    if passive is not None:
                        passive.close()
                    passive = socket.create_server((self.server.server_address[0], 0))
                    pport = passive.getsockname()[1]
                    if cmd == "EPSV":
                        self.reply(f"229 Entering Extended Passive Mode (|||{pport}|)")
                    else:
                        h = self.server.server_address[0].replace(".", ",")
                        self.reply(f"227 Entering Passive Mode ({h},{pport >> 8},{pport & 255})")
                elif cmd == "SIZE":
                    self.reply(f"213 {len(files[arg])}" if arg in files else "550 no such file")
                elif cmd in ("RETR", "STOR") and passive is not None:
                    self.reply("150 opening data connection")
                    data, _ = passive.accept()
                    passive.close()
                    passive = None
                    with data:
                        if cmd == "RETR":
                            data.sendall(files[arg])
                        else:
                            chunks = []
                            while chunk := data.recv(65536):
                                chunks.append(chunk)
                            files[arg] = b"".join(chunks)
                    self.reply("226 transfer complete")
                elif cmd == "QUIT":
                    self.reply("221 bye")
                    return
                else:
                    self.reply("502 not implemented")

    class Server(socketserver.ThreadingTCPServer):
        address_family = _family(host)
        allow_reuse_address = True
        daemon_threads = True

    with Server((host, port), Handler) as server:
        _ready(server.server_address[1])
        server.serve_forever()


def client_ftp(host: str, port: int) -> None:
    import ftplib
    import io

    ftp = ftplib.FTP()
    ftp.connect(host, port, timeout=30)
    ftp.login("user", "secret")
    got: dict[str, Any] = {}
    parts: list[bytes] = []
    ftp.retrbinary("RETR big.bin", parts.append, blocksize=32768)
    got["big.bin"] = _digest(b"".join(parts))
    upload = payload(1_234_577, b"upload")
    ftp.storbinary("STOR up.bin", io.BytesIO(upload), blocksize=65536)
    parts = []
    ftp.retrbinary("RETR up.bin", parts.append)
    got["up.bin"] = _digest(b"".join(parts))
    lines: list[str] = []
    ftp.retrlines("RETR small.txt", lines.append)
    got["small.txt"] = lines
    got["size"] = ftp.size("big.bin")
    # Hold a transfer half read: control and data connection are both open.
    ftp.voidcmd("TYPE I")
    data = ftp.transfercmd("RETR big.bin")
    first = data.recv(1000)
    ports = {"control": ftp.sock.getsockname()[1], "data": data.getsockname()[1]}
    _hold_then_exit({"results": got, "ports": ports})
    rest = [first]
    while chunk := data.recv(65536):
        rest.append(chunk)
    data.close()
    ftp.voidresp()
    print(json.dumps({"held": _digest(b"".join(rest))}), flush=True)
    ftp.quit()


#### SMTP-style line protocol through makefile


def server_smtp(host: str, port: int) -> None:
    """A minimal SMTP server (EHLO/MAIL/RCPT/DATA/QUIT) on socketserver + makefile; each
    message's length and sha256 are sent back in the 250 reply after DATA."""
    import socketserver

    class Handler(socketserver.StreamRequestHandler):
        def reply(self, text: str) -> None:
            self.wfile.write(text.encode() + b"\r\n")

        def handle(self) -> None:
            self.reply("220 cosock smtp ready")
            while True:
                line = self.rfile.readline()
                if not line:
                    return
                cmd = line[:4].upper()
                if cmd in (b"EHLO", b"HELO"):
                    self.wfile.write(b"250-cosock\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n")
                elif cmd in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    self.reply("250 ok")
                elif cmd == b"DATA":
                    self.reply("354 end with <CRLF>.<CRLF>")
                    body = bytearray()
                    while (data := self.rfile.readline()) != b".\r\n":
                        if not data:
                            return
                        body += data[1:] if data.startswith(b"..") else data
                    n, sha = _digest(bytes(body))
                    self.reply(f"250 queued {n} {sha}")
                elif cmd == b"QUIT":
                    self.reply("221 bye")
                    return
                else:
                    self.reply("502 not implemented")

    class Server(socketserver.ThreadingTCPServer):
        address_family = _family(host)
        allow_reuse_address = True
        daemon_threads = True

    with Server((host, port), Handler) as server:
        _ready(server.server_address[1])
        server.serve_forever()


def smtp_messages() -> list[bytes]:
    """Messages as smtplib puts them on the wire (CRLF lines), a dot-stuffed one included."""
    big = payload(300_000).hex()
    body = "\r\n".join(big[i : i + 76] for i in range(0, len(big), 76))
    return [
        b"Subject: hi\r\n\r\nsmall one\r\n",
        f"Subject: big\r\n\r\n{body}\r\n".encode(),
        b"Subject: dots\r\n\r\n.starts with a dot\r\n..two\r\n",
    ]


def client_smtp(host: str, port: int) -> None:
    import smtplib

    replies = []
    with smtplib.SMTP(host, port, timeout=30) as smtp:
        smtp.ehlo("client")
        for msg in smtp_messages():
            smtp.mail("a@example.org")
            smtp.rcpt("b@example.org")
            code, text = smtp.data(msg)
            replies.append([code, text.decode()])
        _hold_then_exit({"replies": replies, "port": smtp.sock.getsockname()[1]})


#### helpers


def _family(host: str) -> int:
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _ready(port: int) -> None:
    print(json.dumps({"listening": port}), flush=True)


_SERVERS = {
    "wsgiref-server": server_wsgiref,
    "xmlrpc-server": server_xmlrpc,
    "forking-server": server_forking,
    "ftp-server": server_ftp,
    "smtp-server": server_smtp,
    "uvloop-sock-server": server_uvloop_sock,
    "uvloop-accepted": server_uvloop_accepted,
}
_HTTP_CLIENTS = {
    "httpx": client_httpx,
    "requests": client_requests,
    "aiohttp": client_aiohttp,
    "aiohttp-uvloop": client_aiohttp_uvloop,
    "uvloop-streams": client_uvloop_streams,
    "uvloop-streams-sock": lambda base: client_uvloop_streams(base, own_socket=True),
    "urllib": client_urllib,
}
_CLIENTS = {
    "xmlrpc": client_xmlrpc,
    "forking": client_forking,
    "ftp": client_ftp,
    "smtp": client_smtp,
    "upper": client_upper,
    "upper-many": client_upper_many,
    "hold-get": client_hold_get,
}


def main(argv: list[str]) -> None:
    what, host, port = argv[0], argv[1], int(argv[2])
    if what in _SERVERS:
        _SERVERS[what](host, port)
    elif what in _HTTP_CLIENTS:
        _HTTP_CLIENTS[what](f"http://{_url_host(host)}:{port}")
    else:
        _CLIENTS[what](host, port)


if __name__ == "__main__":
    main(sys.argv[1:])
