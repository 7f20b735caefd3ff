"""Unmodified programs whose sockets are made in C, not by Python's ``socket`` module, so
cosock cannot see them (test_bypass.py runs them under ``cosock run``).

    bypass_programs.py uv-server|uv-client|grpc-server|grpc-client HOST PORT

Servers echo and print ``{"listening": PORT}``.  Clients send a payload, check the echo,
print one JSON line, hold the connection until a line arrives on stdin, then close and
print ``{"closed": true}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

PAYLOAD = bytes(range(256)) * 256  # 64 KiB


def _say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:  # uvloop's is no asyncio.Transport
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def uv_server(host: str, port: int) -> None:
    import uvloop

    loop = uvloop.new_event_loop()
    server = loop.run_until_complete(loop.create_server(_Echo, host, port))  # libuv binds
    _say(listening=port, sock=type(server.sockets[0]).__name__)
    loop.run_forever()


class _Collect(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[bytes]) -> None:
        self.done, self.buf = done, bytearray()

    def connection_made(self, transport: Any) -> None:
        transport.write(PAYLOAD)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= len(PAYLOAD) and not self.done.done():
            self.done.set_result(bytes(self.buf))


def uv_client(host: str, port: int) -> None:
    import uvloop

    loop = uvloop.new_event_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    # host and port, not sock=: libuv makes and connects the socket in C.
    transport, _ = loop.run_until_complete(
        loop.create_connection(lambda: _Collect(done), host, port)
    )
    echo = loop.run_until_complete(asyncio.wait_for(done, 60))
    _say(
        echo_ok=echo == PAYLOAD,
        local_port=transport.get_extra_info("sockname")[1],
        sock=type(transport.get_extra_info("socket")).__name__,
    )
    loop.run_until_complete(loop.run_in_executor(None, sys.stdin.readline))
    transport.close()
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    _say(closed=True)


def grpc_server(host: str, port: int) -> None:
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("cosock.Echo", {"Say": echo}),)
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    _say(listening=bound)
    server.wait_for_termination()


def grpc_client(host: str, port: int) -> None:
    import grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        say = channel.unary_unary("/cosock.Echo/Say")
        _say(echo_ok=say(PAYLOAD, timeout=60) == PAYLOAD)
        sys.stdin.readline()
    _say(closed=True)


_PROGRAMS = {
    "uv-server": uv_server,
    "uv-client": uv_client,
    "grpc-server": grpc_server,
    "grpc-client": grpc_client,
}

if __name__ == "__main__":
    _PROGRAMS[sys.argv[1]](sys.argv[2], int(sys.argv[3]))
