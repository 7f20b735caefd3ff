"""One end of the migration bench's stream, run inside a lab guest:

    python -m cosock.bench._migpeer server PORT --seed S --peer-seed P
    python -m cosock.bench._migpeer client HOST PORT --seed S --peer-seed P

It sends the pattern of ``--seed`` and verifies every byte it receives against the
pattern of ``--peer-seed`` (``_pattern``), both at once, until told to stop.  A sampler
records every ``--sample-ms`` (monotonic time, bytes received, the socket's path), and
the receiver notes each change of path between two received chunks: the pause of a
switch is the time from the last chunk received on the old path to the first on the new.

Like the bench's other worker it never imports cosock: it runs under ``cosock run``'s
environment and asks the socket (``cosock_path``) which path it is on.  Commands on
stdin, one JSON line out per line in: ``status``; ``stop`` (stop sending, answer the final
count sent); ``finish`` with ``peer_sent`` (half-close, read to EOF, check, report).

The half-close waits for ``finish``, which the driver sends once *both* ends answered
``stop``: an EOF that arrives before this end was told to stop is then really early (the
peer's sender died).  Half-closing at ``stop`` made that flag a race: the driver stops the
ends one after the other, so the second one could read the first one's EOF before its
own ``stop`` line, and a clean run reported an early EOF.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from typing import Any

from ._pattern import Pattern, StreamChecker

RECV_SIZE = 1 << 18
#: A path that is neither shm nor tcp is a moment of a switch (e.g. "switching").
STABLE = ("shm", "tcp")
RESETS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def path_of(sock: socket.socket) -> str:
    return str(getattr(sock, "cosock_path", "tcp"))


class Pump:
    """Send one pattern and check the other, both ways at once, on one connection."""

    def __init__(self, sock: socket.socket, seed: int, peer_seed: int, sample_s: float) -> None:
        self.sock = sock
        self.out = Pattern(seed)
        self.checker = StreamChecker(Pattern(peer_seed))
        self.sample_s = sample_s
        self.stop = threading.Event()
        self.done = threading.Event()  # the receiver saw EOF or an error
        self.sent = 0
        self.received = 0
        self.resets = 0
        self.errors: list[str] = []
        self.eof_early = False
        self.samples: list[tuple[float, int, str]] = []
        self.switches: list[dict[str, Any]] = []
        self._threads = [
            threading.Thread(target=self._send, name="send", daemon=True),
            threading.Thread(target=self._recv, name="recv", daemon=True),
            threading.Thread(target=self._sample, name="sample", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _error(self, where: str, exc: OSError) -> None:
        if isinstance(exc, RESETS):
            self.resets += 1
        self.errors.append(f"{where}: {exc!r}")

    def _send(self) -> None:
        k = 0
        try:
            while not self.stop.is_set():
                seg = self.out.segment(k)
                self.sock.sendall(seg)
                self.sent += len(seg)
                k += 1
        except OSError as exc:
            self._error("send", exc)

    def _recv(self) -> None:
        stable = path_of(self.sock)
        last_t = time.monotonic()
        try:
            while data := self.sock.recv(RECV_SIZE):
                now = time.monotonic()
                path = path_of(self.sock)
                if path in STABLE:
                    if path != stable:
                        self.switches.append(
                            {
                                "from": stable,
                                "to": path,
                                "t_last_old": last_t,
                                "t_first_new": now,
                                "at_byte": self.received,
                            }
                        )
                    stable, last_t = path, now
                self.checker.feed(data)
                self.received += len(data)
            self.eof_early = not self.stop.is_set()
        except OSError as exc:
            self._error("recv", exc)
        finally:
            self.done.set()

    def _sample(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic(), self.received, path_of(self.sock)))
            self.done.wait(self.sample_s)
        self.samples.append((time.monotonic(), self.received, path_of(self.sock)))

    def status(self) -> dict[str, Any]:
        return {
            "path": path_of(self.sock),
            "sent": self.sent,
            "received": self.received,
            "resets": self.resets,
            "errors": self.errors,
        }

    def halt(self, timeout: float) -> dict[str, Any]:
        """Stop sending; the answer has the final count of bytes sent."""
        self.stop.set()
        self._threads[0].join(timeout)
        return {"sent": self.sent, "hung": self._threads[0].is_alive()}

    def finish(self, peer_sent: int, timeout: float) -> dict[str, Any]:
        """Half-close, read the peer's stream to its end and report; ``peer_sent`` (the
        peer's final count) tells the checker how many bytes should have arrived."""
        self.stop.set()
        self._threads[0].join(timeout)
        if not self._threads[0].is_alive():
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._error("send", exc)
        for t in self._threads:
            t.join(timeout)
        hung = any(t.is_alive() for t in self._threads)
        info = getattr(self.sock, "cosock_info", None)
        counters = None if info is None else info()
        status = self.status()
        if not hung:
            # close() before exiting, as a tidy program does: bytes the socket still
            # queues for the peer are delivered (an exit alone may not, see README).
            try:
                self.sock.close()
            except OSError as exc:
                self._error("close", exc)
        return {
            **status,
            "resets": self.resets,
            "errors": self.errors,
            "hung": hung,
            "eof_early": self.eof_early,
            "check": self.checker.finish(peer_sent),
            "switches": self.switches,
            "samples": self.samples,
            "counters": counters,
        }


def _serve(pump: Pump) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd["op"] == "status":
            _out(pump.status())
        elif cmd["op"] == "stop":
            _out(pump.halt(float(cmd.get("timeout", 60))))
        elif cmd["op"] == "finish":
            _out(pump.finish(int(cmd["peer_sent"]), float(cmd.get("timeout", 60))))
            return
        else:
            _out({"error": f"unknown op {cmd['op']!r}"})


def _out(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cosock.bench._migpeer")
    parser.add_argument("role", choices=("server", "client"))
    parser.add_argument("where", nargs="+", help="server: PORT; client: HOST PORT")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--peer-seed", type=int, required=True)
    parser.add_argument("--sample-ms", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=60.0, help="socket timeout (s)")
    args = parser.parse_args(argv)
    if args.role == "server":
        srv = socket.create_server(("0.0.0.0", int(args.where[0])))
        _out({"listening": srv.getsockname()[1], "cosock": type(srv).__name__ != "socket"})
        sock, _ = srv.accept()
        srv.close()
    else:
        sock = socket.create_connection((args.where[0], int(args.where[1])), timeout=30)
    sock.settimeout(args.timeout)  # a stuck path fails the bench instead of hanging it
    _out({"connected": True, "path": path_of(sock), "cosock": type(sock).__name__ != "socket"})
    _serve(Pump(sock, args.seed, args.peer_seed, args.sample_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
