"""``cosock lab bench`` on a QEMU lab: TCP over virtio-net vs cosock in ivshmem.

The seed's experiment between two VMs of one host: stream (MB/s, bytes checked by sha256) and
request/response (64 B, p50/p99), with the accelerator named, since TCG and KVM differ by
orders of magnitude. Three transports: "tcp" (plain sockets over virtio-net), "cosock" (the
same program with ``cosock.enable()``: ``CoSocket``s that take a pool slot through the host
agent's gateway; a run that fell back to TCP is an error) and "ring" (the raw data path: the
project's rings in a slot the bench hands out itself, TCP wake-ups, no socket layer).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..._ivshmem import Pool
from ._lab import QemuLab
from ._model import VmError

PEER = str(Path(__file__).with_name("_peer.py"))
SRC = str(Path(__file__).resolve().parents[3])
BASE_PORT = 5100


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def server_output(lab: QemuLab, guest: str, log: str, want: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        text = lab.run(guest, ["cat", log], timeout=60).stdout.decode(errors="replace")
        for item in _json_lines(text):
            if want in item:
                return item
        if time.monotonic() > deadline:
            raise VmError(f"bench: the server in {guest} gave no {want!r} ({text.strip()[-200:]})")
        time.sleep(0.3)


def one(
    lab: QemuLab,
    kind: str,
    mode: str,
    n: int,
    port: int,
    server: str,
    client: str,
    slot: int,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one (tcp|cosock|ring, stream|rr) measurement; the client's figures plus the
    server's. ``env``: more environment for both peers (e.g. ``COSOCK_SPIN_US``)."""
    env = {"PYTHONPATH": SRC, **(env or {})}
    log = f"/tmp/bench-{kind}-{mode}-{port}-{time.time_ns()}.log"
    argv = [sys.executable, PEER, "server", kind, mode, str(port)]
    if kind == "ring":
        argv += [str(slot), str(n)]
    lab.spawn(server, argv, env=env, log=log)
    server_output(lab, server, log, "listening", 120)
    cargv = [
        sys.executable,
        PEER,
        "client",
        kind,
        mode,
        lab.guest(server).address,
        str(port),
        str(n),
    ]
    if kind == "ring":
        cargv.append(str(slot))
    r = lab.run(client, cargv, env=env, timeout=600)
    if r.returncode != 0:
        raise VmError(f"bench {kind} {mode}: client failed: {r.stderr.decode()[-300:]}")
    result = _json_lines(r.stdout.decode())[-1]
    served = server_output(lab, server, log, "round_trips" if mode == "rr" else "bytes", 120)
    if kind == "cosock" and (result.get("path"), served.get("path")) != ("shm", "shm"):
        raise VmError(
            f"bench cosock {mode}: the connection took {result.get('path')}/"
            f"{served.get('path')}, not shm (reason {result.get('reason') or served.get('reason')})"
        )
    if mode == "stream":
        expected = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
        if (served["bytes"], served["sha256"]) != (n, hashlib.sha256(expected).hexdigest()):
            raise VmError(f"bench {kind} stream: bytes arrived wrong ({served})")
    elif mode == "blast" and served["bytes"] != n:
        raise VmError(f"bench {kind} blast: {served['bytes']} bytes arrived, not {n}")
    return result


def run(lab: QemuLab, stream_bytes: int = 64 << 20, round_trips: int = 2000) -> dict[str, Any]:
    """Both transports, both workloads, between the first two guests of the first host."""
    guests = [g for g in lab.guests if g.host == lab.guests[0].host]
    if len(guests) < 2:
        raise VmError("bench needs a host with two guests: cosock lab up --backend qemu --guests 2")
    server, client = guests[0].name, guests[1].name
    with Pool(lab.pool(guests[0].host)) as pool:  # the agent's part: a fresh slot
        layout = pool.layout()
        slot = layout.slot_count - 2
        results: dict[str, Any] = {
            "accel": lab.accel,
            "accel_reason": lab.accel_reason,
            "qemu_version": lab.qemu_version,
            "between": [server, client],
            "ring_capacity": layout.capacity,
        }
        port = BASE_PORT
        for kind in ("tcp", "cosock", "ring"):
            # A short checked stream first (sha256 in the guest), then the timed runs.
            for mode, n in (("stream", 4 << 20), ("blast", stream_bytes), ("rr", round_trips)):
                if kind == "ring":
                    pool.format_slot(layout, slot)
                figures = one(lab, kind, mode, n, port, server, client, slot)
                results[f"{kind}_{mode}" if mode != "blast" else f"{kind}_stream"] = figures
                port += 1
    tcp, ring = results["tcp_stream"], results["ring_stream"]
    results["stream_ratio"] = ring["mb_s"] / tcp["mb_s"]
    results["rr_p50_ratio"] = results["tcp_rr"]["p50_us"] / results["ring_rr"]["p50_us"]
    results["cosock_stream_ratio"] = results["cosock_stream"]["mb_s"] / tcp["mb_s"]
    results["cosock_steady_ratio"] = results["cosock_stream"]["mb_s_steady"] / tcp["mb_s_steady"]
    results["cosock_rr_p50_ratio"] = results["tcp_rr"]["p50_us"] / results["cosock_rr"]["p50_us"]
    return results


def show(results: dict[str, Any], console: Any, lab: str) -> None:
    """The side-by-side table and the ratios, accelerator in the title."""
    from rich.table import Table

    table = Table(
        title=f"lab {lab}: {results['between'][0]} <-> {results['between'][1]},"
        f" QEMU {results.get('qemu_version') or '?'},"
        f" accelerator {results['accel']} ({results['accel_reason']})"
    )
    for col in ("transport", "stream MB/s", "2nd half MB/s", "rr p50 µs", "rr p99 µs"):
        table.add_column(col)
    rows = (
        ("tcp", "tcp (virtio-net)"),
        ("cosock", "cosock: CoSocket over an ivshmem slot"),
        ("ring", "raw rings in an ivshmem slot"),
    )
    for kind, label in rows:
        st, rr = results[f"{kind}_stream"], results[f"{kind}_rr"]
        steady = f"{st['mb_s_steady']:.1f}" if "mb_s_steady" in st else "-"
        table.add_row(
            label, f"{st['mb_s']:.1f}", steady, f"{rr['p50_us']:.0f}", f"{rr['p99_us']:.0f}"
        )
    console.print(table)
    console.print(
        f"cosock/tcp: stream x{results['cosock_stream_ratio']:.1f}"
        f" (2nd half x{results['cosock_steady_ratio']:.1f}),"
        f" rr p50 x{results['cosock_rr_p50_ratio']:.1f};"
        f" raw ring/tcp: stream x{results['stream_ratio']:.1f},"
        f" rr p50 x{results['rr_p50_ratio']:.1f} (the seed's targets: 9x stream, 10x rr)"
    )


def command(quick: bool, json_path: Path | None, lab_name: str | None) -> dict[str, Any]:
    """``cosock bench --backend qemu``: build a QEMU lab (1 host, 2 VMs), measure, tear down."""
    from rich.console import Console

    name = lab_name or "benchvm"
    err = Console(stderr=True)
    err.print(f"booting 2 VMs in lab {name} (TCG: ~30-60 s) ...")
    # The raw-ring row maps a slot of the host's pool in both VMs: the shared pool.
    lab = QemuLab.up(name, hosts=1, guests=2, pool="shared")
    try:
        results = run(
            lab,
            stream_bytes=(16 if quick else 64) << 20,
            round_trips=500 if quick else 2000,
        )
    finally:
        lab.down()
    show(results, Console(), name)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        err.print(f"report written to {json_path}")
    return results
