"""Unmodified applications for ``cosock bench --app``: ``python -m cosock.bench._apps ...``.

    http-server --host H            uvicorn (asyncio + h11) serving a tiny ASGI app
    http-client --url U --duration  httpx, sequential GETs on one keep-alive connection
    echo-server --host H            asyncio streams echo (stdlib only)
    echo-client --host H --port P   asyncio streams, 64 B request/response

Nothing here imports cosock: started under ``cosock run``'s environment they go through
it, otherwise through plain TCP.  Each reports which path its connection took by reading
the ``cosock_path`` attribute of its socket objects if there is one (plain sockets have
none: "tcp"), so a third-party stack that escapes interception shows up as "tcp".
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import socket
import sys
import time
from typing import Any

from ._stats import percentile

_BLOB = bytes(range(256)) * 4096  # 1 MiB


def socket_paths() -> dict[str, int]:
    """Paths of this process's open, connected TCP sockets (listeners excluded)."""
    out: dict[str, int] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, socket.socket) or obj.fileno() < 0:
            continue
        if obj.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        try:
            if obj.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue
        except OSError:
            continue
        path = str(getattr(obj, "cosock_path", "tcp"))
        out[path] = out.get(path, 0) + 1
    return out


def _path_of(sock: Any) -> str:
    sock = getattr(sock, "_sock", sock)  # asyncio hands out a TransportSocket wrapper
    return str(getattr(sock, "cosock_path", "tcp")) if sock is not None else "unknown"


def _reason_of(sock: Any) -> str | None:
    """cosock's recorded fallback reason of a socket (None: none, or a plain socket)."""
    reason = getattr(getattr(sock, "_sock", sock), "cosock_fallback_reason", None)
    return None if reason is None else str(getattr(reason, "value", reason))


def _summary(lat_ns: list[int], seconds: float, moved: int) -> dict[str, Any]:
    lat_ns.sort()
    us = [x / 1000 for x in lat_ns]
    return {
        "ops": len(us),
        "seconds": seconds,
        "ops_per_s": len(us) / seconds,
        "MBps": moved / seconds / 1e6,
        "p50_us": percentile(us, 50),
        "p99_us": percentile(us, 99),
    }


#### HTTP: uvicorn + httpx


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """GET /bytes/N -> N bytes; GET /paths -> this server's connection paths as JSON."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path: str = scope["path"]
    if path == "/paths":
        body = json.dumps(socket_paths()).encode()
    elif path.startswith("/bytes/"):
        n = min(int(path.rsplit("/", 1)[1]), len(_BLOB))
        body = _BLOB[:n]
    else:
        body = b""
    await send(
        {
            "type": "http.response.start",
            "status": 200 if body or path.startswith("/bytes/") else 404,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _http_server(host: str) -> None:
    import uvicorn

    config = uvicorn.Config(
        asgi_app,
        host=host,
        port=0,
        log_level="warning",
        access_log=False,
        lifespan="on",
        loop="asyncio",
        http="h11",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise RuntimeError("uvicorn exited during start-up")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    print(
        json.dumps({"listening": [host, port], "server": f"uvicorn {uvicorn.__version__}"}),
        flush=True,
    )
    await task


def http_client(url: str, size: int, duration: float) -> dict[str, Any]:
    import httpx

    lat: list[int] = []
    clock = time.perf_counter_ns
    with httpx.Client(base_url=url, timeout=20) as client:
        first = client.get(f"/bytes/{size}")  # connects; not timed
        stream = first.extensions.get("network_stream")
        client_sock = stream.get_extra_info("socket") if stream is not None else None
        streams = {id(stream)}
        t0 = clock()
        end = t0 + int(duration * 1e9)
        now = t0
        while now < end:
            start = now
            response = client.get(f"/bytes/{size}")
            streams.add(id(response.extensions.get("network_stream")))
            if response.status_code != 200 or len(response.content) != size:
                raise RuntimeError(
                    f"bad response: {response.status_code}, {len(response.content)} B"
                )
            now = clock()
            lat.append(now - start)
        seconds = (now - t0) / 1e9
        last = client.get("/paths")
        server_paths = last.json()
        stream = last.extensions.get("network_stream")
        client_sock = stream.get_extra_info("socket") if stream is not None else None
        client_path = _path_of(client_sock)  # of the connection in use, while it is open
    return {
        **_summary(lat, seconds, size * len(lat)),
        "client_path": client_path,
        "client_reason": _reason_of(client_sock),
        # More than 1: the keep-alive connection was dropped and re-opened during the run.
        "connections": len(streams),
        "server_path": _one_path(server_paths),
        "server_paths": server_paths,
    }


def _one_path(paths: dict[str, int]) -> str:
    """The server's path for our connection: the only one it has, or all it has."""
    return next(iter(paths)) if len(paths) == 1 else "+".join(sorted(paths)) or "none"


#### asyncio echo (stdlib)


async def _echo_server(host: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        # The client half-closed: tell it which path this end took, then close.
        writer.write(_path_of(writer.get_extra_info("socket")).encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, 0)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"listening": [host, port], "server": "asyncio streams"}), flush=True)
    async with server:
        await server.serve_forever()


async def _echo_client(host: str, port: int, size: int, duration: float) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(host, port)
    request = bytes(size)
    lat: list[int] = []
    clock = time.perf_counter_ns
    writer.write(request)  # warm the connection up, not timed
    await writer.drain()
    await reader.readexactly(size)
    t0 = clock()
    end = t0 + int(duration * 1e9)
    now = t0
    while now < end:
        start = now
        writer.write(request)
        await writer.drain()
        await reader.readexactly(size)
        now = clock()
        lat.append(now - start)
    seconds = (now - t0) / 1e9
    client_path = _path_of(writer.get_extra_info("socket"))
    client_reason = _reason_of(writer.get_extra_info("socket"))
    writer.write_eof()
    server_path = (await reader.read()).decode() or "none"
    writer.close()
    await writer.wait_closed()
    return {
        **_summary(lat, seconds, 2 * size * len(lat)),
        "client_path": client_path,
        "client_reason": client_reason,
        "server_path": server_path,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cosock.bench._apps")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("http-server", "echo-server"):
        sub.add_parser(name).add_argument("--host", required=True)
    hc = sub.add_parser("http-client")
    hc.add_argument("--url", required=True)
    ec = sub.add_parser("echo-client")
    ec.add_argument("--host", required=True)
    ec.add_argument("--port", type=int, required=True)
    for p in (hc, ec):
        p.add_argument("--size", type=int, default=64)
        p.add_argument("--duration", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.cmd == "http-server":
        asyncio.run(_http_server(args.host))
    elif args.cmd == "echo-server":
        asyncio.run(_echo_server(args.host))
    elif args.cmd == "http-client":
        print(json.dumps(http_client(args.url, args.size, args.duration)), flush=True)
    else:
        client = _echo_client(args.host, args.port, args.size, args.duration)
        result = asyncio.run(asyncio.wait_for(client, args.duration + 20))
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
