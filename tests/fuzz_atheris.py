"""Coverage-guided fuzzing (atheris, libFuzzer) of every parser that reads peer bytes.

    python tests/fuzz_atheris.py TARGET -runs=N      # TARGET: offer, protocol, agent-wire

Each target may raise only the parser's own "you sent garbage" error; anything else (an
IndexError, a struct.error, an endless loop caught by -timeout) is a finding.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from cosock._errors import ProtocolError, RemoteProtocolError
    from cosock._events import NEED_DATA
    from cosock._offer import Offer
    from cosock._protocol import Connection, Role
    from cosock.agent._wire import LineReader, WireError, decode


def offer(data: bytes) -> None:
    if data and data[0] & 1:  # get past the magic and version half of the time
        data = b"CSKO\x01" + data[1:]
    try:
        Offer.decode(data)
    except RemoteProtocolError:
        pass


def protocol(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    role = Role.SERVER if fdp.ConsumeBool() else Role.CLIENT
    conn = Connection(role, fdp.ConsumeBytes(16).ljust(16, b"\0"))
    try:
        if role is Role.CLIENT:
            from cosock._events import Hello

            conn.send(Hello(conn.nonce))
        while fdp.remaining_bytes():
            conn.receive_data(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
            for _ in range(1000):
                if conn.next_event() is NEED_DATA:
                    break
        conn.receive_data(b"")
        for _ in range(1000):
            if conn.next_event() is NEED_DATA:
                break
    except ProtocolError:
        pass


def agent_wire(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    reader = LineReader(fdp.ConsumeIntInRange(1, 4096))
    try:
        while fdp.remaining_bytes():
            reader.feed(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300)))
            while (line := reader.next_line()) is not None:
                try:
                    decode(line)
                except WireError:
                    pass
    except WireError:
        pass


TARGETS = {"offer": offer, "protocol": protocol, "agent-wire": agent_wire}

if __name__ == "__main__":
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()
