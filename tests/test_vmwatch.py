"""The VM gateway pushes each VM's guest list on a change (``watch``), without VMs.

A real gateway on loopback with a real pool file (test_vmgate.py's fixture); the guests file
is rewritten as the lab does. The same push drives the residency watch of processes in real
VMs (test_vm_status.py measures an idle process there).
"""

from __future__ import annotations

import json
import os
import select
import time
from pathlib import Path
from typing import Any

import pytest

from cosock._vmagent import GatewayMoved, VmAgent
from cosock._vmchannel import VmDirectory
from sockutil import wait_for
from test_vmgate import A, B, C, gateway  # noqa: F401

pytestmark = pytest.mark.timeout(60)

Gateway = tuple[tuple[str, int], Path]


def _rewrite(path: Path, change: Any, step: int) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    later = time.time_ns() + step * 10**9  # a new mtime even within one clock tick
    os.utime(path, ns=(later, later))


def test_a_watch_gets_the_list_at_once_then_each_change_then_the_redirect(
    gateway: Gateway,  # noqa: F811
    tmp_path: Path,
) -> None:
    addr, _ = gateway
    guests = tmp_path / "vm-guests.json"
    with VmAgent(addr, token="tok-a") as w:
        assert w.watch() == {"h1g1": A, "h1g2": B, "h1g3": C}
        _rewrite(guests, lambda d: d["guests"]["h1g3"].update(leaving=True), 1)
        assert w.next_push() == {"h1g1": A, "h1g2": B}  # nobody sees a leaving VM
        _rewrite(guests, lambda d: d["guests"]["h1g1"].update(leaving=True), 2)
        assert w.next_push() == {}  # a leaving VM sees no neighbours
        t = time.monotonic()

        def moved(d: dict[str, Any]) -> None:
            del d["guests"]["h1g1"]
            d["moved"] = {"h1g1": {"token": "tok-a", "gateway": "10.77.2.1:7071"}}

        _rewrite(guests, moved, 3)
        with pytest.raises(GatewayMoved) as info:
            w.next_push()
        assert info.value.address == ("10.77.2.1", 7071)
        assert time.monotonic() - t < 5


def test_a_watch_only_after_hello_and_a_closed_watch_ends_its_handler(
    gateway: Gateway,  # noqa: F811
) -> None:
    import socket

    addr, _ = gateway
    with socket.create_connection(addr, timeout=10) as raw:
        raw.sendall(b'{"op": "watch"}\n')
        f = raw.makefile("rb")
        assert json.loads(f.readline()) == {"ok": False, "error": "say hello with your token first"}
        f.close()
    for _ in range(20):  # the handlers of closed watches return (bounded: 20 closes)
        with VmAgent(addr, token="tok-b") as w:
            w.watch()
    with VmAgent(addr, token="tok-b") as a:
        assert a.guests() == {"h1g1": A, "h1g2": B, "h1g3": C}  # the gateway still serves


def test_the_directory_takes_pushed_lists_instead_of_asking(
    gateway: Gateway,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process's directory opens a watch with its gateway connection: its residency
    watch then sleeps on the watch's eventfd and reads each change without a request."""
    addr, _ = gateway
    token = tmp_path / "token"
    token.write_text("tok-a")
    token.chmod(0o600)
    monkeypatch.setenv("COSOCK_VM_GATEWAY", f"{addr[0]}:{addr[1]}")
    monkeypatch.setenv("COSOCK_VM_TOKEN_FILE", str(token))
    guests = tmp_path / "vm-guests.json"
    d = VmDirectory()
    try:
        assert d.lookup(B, 9000)[0] is not None  # connects (one request), then the watch
        assert d.guest_owning(B) is not None
        fd = d.wait_fileno()
        assert fd is not None and d._watch is not None
        asked_at = d._guests_at
        version = d.version
        _rewrite(guests, lambda x: x["guests"]["h1g2"].update(leaving=True), 1)
        assert select.select([fd], [], [], 10)[0] == [fd]  # woken by the push
        d.poll()
        assert d.version > version
        assert d.guest_owning(B) is None  # h1g2 is leaving: not co-resident any more
        _rewrite(guests, lambda x: x["guests"]["h1g2"].pop("leaving"), 2)
        wait_for(lambda: d.guest_owning(B) is not None, timeout=10)
        time.sleep(1.2)  # past the list's 1 s cache: still no request
        assert d.guest_owning(C) is not None
        assert d._guests_at == asked_at  # every list since the first came as a push

        # The watch ends (the gateway closed it): the directory asks again, then reopens one.
        watch = d._watch
        assert watch is not None
        watch._agent._sock.shutdown(2)
        wait_for(lambda: watch.current() is None, timeout=10)
        assert d.guest_owning(B) is not None  # answered by a request
        assert d._guests_at != asked_at
        wait_for(lambda: d._watched() is not None and d._watch is not watch, timeout=10)
    finally:
        d.close()
    assert d._watch is None


def test_the_gateway_repeats_the_list_and_a_silent_watch_is_dead(
    gateway: Gateway,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every few seconds without a change the gateway sends the list again; a watch that
    hears nothing for longer (its host vanished without a FIN) ends, so the process asks."""
    import socket
    import threading

    from cosock import _vmagent
    from cosock._errors import AgentUnavailable
    from cosock.agent import _vmgate

    addr, _ = gateway
    monkeypatch.setattr(_vmgate, "WATCH_KEEPALIVE_S", 0.5)
    with VmAgent(addr, token="tok-a") as w:
        first = w.watch()
        t = time.monotonic()
        assert w.next_push() == first  # the repeat
        assert time.monotonic() - t < 5
    # A gateway that answers the watch once and then says nothing (nor closes).
    monkeypatch.setattr(_vmagent, "WATCH_TIMEOUT_S", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        done = threading.Event()

        def serve() -> None:
            conn, _ = silent.accept()
            with conn, conn.makefile("rwb") as f:
                f.readline()
                f.write(b'{"ok": true, "guest": "h1g1", "address": "10.77.1.11"}\n')
                f.flush()
                f.readline()
                f.write(b'{"ok": true, "guests": {}}\n')
                f.flush()
                done.wait(30)

        server = threading.Thread(target=serve)
        server.start()
        try:
            with VmAgent(silent.getsockname(), token="tok-a") as w:
                assert w.watch() == {}
                t = time.monotonic()
                with pytest.raises(AgentUnavailable, match="timed out"):
                    w.next_push()
                assert time.monotonic() - t < 10
        finally:
            done.set()
            server.join(10)
