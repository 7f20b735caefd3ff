"""The lab's QEMU backend with real VMs: boot, addresses, virtio-net, ivshmem, exec, QMP, down.

One lab (host h1 with 3 VMs, hosts h2 and h3 without: migration targets) is booted once for
the module and shared; every test here is in one xdist group so ``pytest -n 2`` boots it once, not
once per worker. Under TCG on 2 cores the boot
takes ~10-40 s; the whole module stays within a few minutes. Needs root and the packages
qemu-system-x86, busybox-static, cpio and kmod (``.ci/run`` installs them); the guest kernel is
fetched by the backend on first use and cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import QEMU_GROUP, qemu_unavailable, unique_lab_name

pytestmark = [
    pytest.mark.vm,
    pytest.mark.xdist_group(QEMU_GROUP),
    pytest.mark.timeout(600),
    pytest.mark.leaks_checked_by_module,  # vmlab checks itself, migrations included
]

PY = sys.executable
COSOCK = str(Path(sys.executable).with_name("cosock"))
SLOT_PEER = str(Path(__file__).with_name("vm_slot_peer.py"))
COSOCK_PEER = str(Path(__file__).with_name("vm_cosock_peer.py"))

#: Find the ivshmem BAR in the guest and read or write its first bytes (stdlib only).
IVSHMEM = """
import glob, mmap, sys
dev = next(d for d in glob.glob("/sys/bus/pci/devices/*")
           if open(d + "/vendor").read().strip() == "0x1af4"
           and open(d + "/device").read().strip() == "0x1110")
with open(dev + "/resource2", "r+b") as f:
    m = mmap.mmap(f.fileno(), 0)
    if sys.argv[1] == "write":
        m[4096:4096 + len(sys.argv[2])] = sys.argv[2].encode()
    else:
        print(m[4096:4096 + int(sys.argv[2])].decode(), len(m))
"""

SERVER = """
import hashlib, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001))
s.listen()
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while b := c.recv(1 << 16):
    h.update(b)
    n += len(b)
c.sendall(f"{n} {h.hexdigest()}".encode())
c.close()
"""

CLIENT = """
import socket, sys, time
data = bytes(range(256)) * (int(sys.argv[2]) // 256)
for _ in range(600):
    try:
        c = socket.create_connection((sys.argv[1], 5001), timeout=60)
        break
    except ConnectionRefusedError:
        time.sleep(0.2)
t = time.perf_counter()
c.sendall(data)
c.shutdown(socket.SHUT_WR)
reply = c.recv(200).decode()
print(reply, time.perf_counter() - t)
"""


@contextlib.contextmanager
def running_lab(**up: Any) -> Iterator[Any]:
    """A QEMU lab for one module (``QemuLab.up(name, **up)``), skipped with the reason when
    this machine cannot run one; downed however the module ends, its leaks checked."""
    reason = qemu_unavailable()
    if reason:
        pytest.skip(reason)
    from conftest import leaks_checked
    from cosock.lab import down
    from cosock.lab.qemu import QemuLab

    name = unique_lab_name()
    with leaks_checked():
        try:
            lab = QemuLab.up(name, **up)
        except BaseException:
            down(name)
            raise
        try:
            yield lab
        finally:
            down(name)


@pytest.fixture(scope="module")
def vmlab() -> Iterator[object]:
    # h2, h3: migration targets; root "image": migratable (QEMU refuses with 9p). The shared
    # pool: the raw ivshmem and ring tests here map one pool in two VMs by hand (per-pair
    # pools, the default, and migration with them: test_vm_pairpool.py).
    with running_lab(hosts=1, guests=3, spare_hosts=2, root="image", pool="shared") as lab:
        yield lab


def test_guests_boot_with_their_addresses(vmlab: object) -> None:
    from cosock.lab.qemu import QemuLab

    assert isinstance(vmlab, QemuLab)
    assert vmlab.accel in ("tcg", "kvm") and vmlab.accel_reason
    assert set(vmlab.boot_seconds) == {"h1g1", "h1g2", "h1g3"}
    for g in vmlab.guests:
        out = vmlab.run(g, ["ip", "-4", "-o", "addr", "show", "eth0"], timeout=60, check=True)
        assert f"inet {g.address}/16" in out.stdout.decode()
        assert vmlab.run(g, ["hostname"], timeout=60).stdout.decode().strip() == g.name
        # A real VM: its own kernel, not the host's.
        assert vmlab.run(g, ["uname", "-r"], timeout=60).stdout.decode().strip() != os.uname()[2]


def test_exec_returns_status_and_output(vmlab: object) -> None:
    from cosock.lab.qemu import QemuLab

    assert isinstance(vmlab, QemuLab)
    r = vmlab.run("h1g1", ["sh", "-c", "echo out; echo err >&2; exit 7"], timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
    r = vmlab.run("h1g1", ["no-such-command-here"], timeout=60)
    assert r.returncode == 127
    r = vmlab.run("h1g1", ["cat"], input=b"through stdin", timeout=60)
    assert r.stdout == b"through stdin"


def test_cli_exec_and_ls(vmlab: object) -> None:
    from cosock.lab.qemu import QemuLab

    assert isinstance(vmlab, QemuLab)
    argv = [COSOCK, "lab", "exec", "--name", vmlab.name, "h1g2", "--", "sh", "-c"]
    r = subprocess.run([*argv, "echo $COSOCK_GUEST; exit 3"], capture_output=True, timeout=120)
    assert (r.returncode, r.stdout) == (3, b"h1g2\n"), r.stderr
    r = subprocess.run(
        [COSOCK, "lab", "ls", "--name", vmlab.name, "--json"], capture_output=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert b'"backend": "qemu"' in r.stdout and b"10.77.1.12" in r.stdout


def test_ping_and_tcp_between_vms_over_virtio_net(vmlab: object) -> None:
    from cosock.lab.qemu import QemuLab

    assert isinstance(vmlab, QemuLab)
    a, b = vmlab.guest("h1g1"), vmlab.guest("h1g2")
    r = vmlab.run(b, ["busybox", "ping", "-c", "2", "-W", "5", a.address], timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    size = 8 << 20
    vmlab.spawn(a, [PY, "-c", SERVER], log="/tmp/server.log")
    r = vmlab.run(b, [PY, "-c", CLIENT, a.address, str(size)], timeout=180, check=True)
    count, digest, _seconds = r.stdout.decode().split()
    expected = hashlib.sha256(bytes(range(256)) * (size // 256)).hexdigest()
    assert (int(count), digest) == (size, expected)


def test_ivshmem_write_in_one_vm_is_read_in_the_other(vmlab: object) -> None:
    from cosock.lab.qemu import QemuLab

    assert isinstance(vmlab, QemuLab)
    word = f"cosock-{time.monotonic_ns()}"
    vmlab.run("h1g1", [PY, "-c", IVSHMEM, "write", word], timeout=60, check=True)
    r = vmlab.run("h1g2", [PY, "-c", IVSHMEM, "read", str(len(word))], timeout=60, check=True)
    seen, size = r.stdout.decode().split()
    assert seen == word and int(size) == 64 << 20
    with open(vmlab.pool("h1"), "rb") as pool:  # the host's file is the same memory
        pool.seek(4096)
        assert pool.read(len(word)) == word.encode()


def test_rings_in_an_ivshmem_slot_carry_data_between_vms(vmlab: object) -> None:
    """The library inside each guest maps one slot of the pool through its own BAR2 and moves
    bytes with the project's rings (stream checked by sha256 in the guest; RR spinning); TCP
    over virtio-net carries only the wake-ups. Same code as ``cosock lab bench``."""
    from cosock._ivshmem import Pool
    from cosock.lab.qemu import QemuLab, _bench

    assert isinstance(vmlab, QemuLab)
    with Pool(vmlab.pool("h1")) as pool:  # the agent's part: hand out and format a slot
        layout = pool.layout()
        slot = layout.slot_count - 1
        pool.format_slot(layout, slot)
        stream = _bench.one(vmlab, "ring", "stream", 16 << 20, 5002, "h1g1", "h1g2", slot)
        assert stream["bytes"] == 16 << 20 and stream["mb_s"] > 0
        pool.format_slot(layout, slot)
        rr = _bench.one(vmlab, "ring", "rr", 200, 5003, "h1g1", "h1g2", slot)
        assert rr["round_trips"] == 200 and 0 < rr["p50_us"] <= rr["p99_us"]


def test_a_slot_from_the_host_agent_carries_one_connection_between_vms(vmlab: object) -> None:
    """Both guests reach their host agent's VM gateway on the bridge address with their fw_cfg
    tokens; the client gets a slot for its connection, offers it in-band, the server claims it
    (a claim for another 4-tuple is refused) and 4 MiB cross through the slot, checked."""
    from cosock.lab.qemu import QemuLab, _bench

    assert isinstance(vmlab, QemuLab)
    a, b = vmlab.guest("h1g1"), vmlab.guest("h1g2")
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    log = f"/tmp/slot-server-{time.time_ns()}.log"
    vmlab.spawn(a, [PY, SLOT_PEER, "server", "5004"], env=env, log=log)
    _bench.server_output(vmlab, "h1g1", log, "listening", 120)
    size = 4 << 20
    r = vmlab.run(b, [PY, SLOT_PEER, "client", a.address, "5004", str(size)], env=env, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout.decode().splitlines()[-1])["guest"] == "h1g2"
    deadline = time.monotonic() + 60
    while True:
        lines = vmlab.run(a, ["cat", log], timeout=60).stdout.decode().splitlines()
        done = [json.loads(x) for x in lines if x.startswith("{") and '"bytes"' in x]
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    expected = hashlib.sha256(bytes(range(256)) * (size // 256)).hexdigest()
    assert done and done[0] == {"bytes": size, "sha256": expected, "forged_claim": "refused"}


def test_qmp_reports_running(vmlab: object) -> None:
    from cosock.lab.qemu import QemuLab

    assert isinstance(vmlab, QemuLab)
    for g in vmlab.guests:
        assert vmlab.qmp(g, "query-status")["status"] == "running"


def test_a_pool_replugged_at_once_waits_for_qemu_to_free_the_old_one(vmlab: object) -> None:
    """QEMU frees an unplugged pool's RAM block only after an RCU grace period; plugging the
    pool again before that aborts QEMU ("RAMBlock ... already registered") and a migration
    begun before sends a block the target has not got ("Unknown ramblock": the CI's broken
    pipe). Unplug and re-plug five times without a pause: QEMU keeps running, after each
    unplug no pool block is left, after each plug exactly one, and the guest sees the device."""
    from cosock.lab.qemu import QemuLab, _migrate, _qmp

    assert isinstance(vmlab, QemuLab)
    g = vmlab.guest("h1g3")
    pool, size_mb = vmlab.pool(g.host), int(vmlab._state["pool_mb"])

    def pool_blocks() -> list[str]:
        return [b for b in _qmp.ramblocks(g.qmp) if b.endswith("/pool")]

    for _ in range(5):
        _migrate.unplug_pool(g.qmp)
        _migrate.wait_pool_ram_released(g.qmp)
        assert pool_blocks() == []
        _migrate.plug_pool(g.qmp, pool, size_mb)
        assert len(pool_blocks()) == 1
        assert vmlab.qmp(g, "query-status")["status"] == "running"
    out = vmlab.run(g, ["sh", "-c", "cat /sys/bus/pci/devices/*/device"], timeout=60).stdout
    deadline = time.monotonic() + 30
    while b"0x1110" not in out and time.monotonic() < deadline:  # the guest's rescan
        time.sleep(0.5)
        out = vmlab.run(g, ["sh", "-c", "cat /sys/bus/pci/devices/*/device"], timeout=60).stdout
    assert b"0x1110" in out


ECHO_CLIENT = """
import json, socket, sys, time
c = socket.create_connection((sys.argv[1], 5010), timeout=30)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
ok, errors, gap, last = 0, [], 0.0, time.monotonic()
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    msg = f"{ok:08d}".encode()
    try:
        c.sendall(msg)
        got = c.recv(8, socket.MSG_WAITALL)
        if got != msg:
            errors.append(repr(got))
        ok += 1
    except OSError as exc:
        errors.append(str(exc))
        break
    now = time.monotonic()
    gap, last = max(gap, now - last), now
    time.sleep(0.05)
print(json.dumps({"ok": ok, "errors": errors, "max_gap_ms": round(gap * 1000)}), flush=True)
"""

ECHO_SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5010))
s.listen()
print('{"listening": 5010}', flush=True)
c, _ = s.accept()
while b := c.recv(4096):
    c.sendall(b)
"""


def test_live_migration_keeps_the_guest_its_processes_and_its_tcp_connection(
    vmlab: object,
) -> None:
    """A real QEMU live migration of h1g2 to h2 while it talks TCP to h1g1 every 50 ms, and
    while an unmodified program under ``cosock run`` streams echoes (1 B..64 KiB, each checked)
    to a ``cosock run`` echo server in h1g1 through an ivshmem slot: both connections and the
    processes carry on, the cosock one switched to TCP at its exact offset before the pool was
    unplugged (shm -> TCP to the old neighbour), the guest is not rebooted, and its ivshmem
    BAR is now h2's pool (hot-unplugged before, hot-plugged after)."""
    from cosock.lab import MigrationError, _netns
    from cosock.lab.qemu import QemuLab, _bench

    assert isinstance(vmlab, QemuLab)
    with pytest.raises(MigrationError, match="already runs on h1"):
        vmlab.migrate("h1g2", "h1")
    a, b = vmlab.guest("h1g1"), vmlab.guest("h1g2")
    uptime = float(vmlab.run(b, ["cat", "/proc/uptime"], timeout=60).stdout.split()[0])
    assert _fw_cfg_gateway(vmlab, b) == _gateway_of(vmlab, "h1")
    vmlab.spawn(a, [PY, "-c", ECHO_SERVER], log="/tmp/echo-server.log")
    _bench.server_output(vmlab, "h1g1", "/tmp/echo-server.log", "listening", 120)
    run = [PY, "-m", "cosock", "run", "--", PY, COSOCK_PEER]
    vmlab.spawn(a, [*run, "echo-server", "0.0.0.0", "6010"], log="/tmp/co-echo.log")
    _bench.server_output(vmlab, "h1g1", "/tmp/co-echo.log", "listening", 120)
    # A loopback connection inside the moving VM: a memfd in guest RAM (the VM's own agent),
    # which migrates with the guest and never leaves shm.
    vmlab.spawn(b, [*run, "echo-server", "127.0.0.1", "6011"], log="/tmp/lo-echo.log")
    _bench.server_output(vmlab, "h1g2", "/tmp/lo-echo.log", "listening", 120)
    lo_soak = "/tmp/lo-soak.log"
    vmlab.spawn(b, [*run, "soak-client", "127.0.0.1", "6011", "90"], log=lo_soak)
    assert _bench.server_output(vmlab, "h1g2", lo_soak, "started", 120) == {"started": "shm"}
    soak = "/tmp/co-soak.log"
    vmlab.spawn(b, [*run, "soak-client", a.address, "6010", "30"], log=soak)
    assert _bench.server_output(vmlab, "h1g2", soak, "started", 120) == {"started": "shm"}
    log = "/tmp/echo-client.log"
    vmlab.spawn(b, [PY, "-c", ECHO_CLIENT, a.address, "20"], log=log)
    time.sleep(5)
    figures = vmlab.migrate("h1g2", "h2")
    moved = vmlab.guest("h1g2")
    assert moved.host == "h2" and moved.pid != b.pid and not _netns.alive(b.pid)
    assert QemuLab.load(vmlab.name).guest("h1g2").host == "h2"  # recorded
    assert figures["total_time_ms"] > 0 and figures["downtime_ms"] is not None
    out = _bench.server_output(vmlab, "h1g2", log, "ok", 120)
    assert out["errors"] == [] and out["ok"] > 50, out
    co = _bench.server_output(vmlab, "h1g2", soak, "paths", 180)
    assert co["ok"] and co["errors"] == [] and co["paths"] == ["shm", "tcp"], co
    echoed = _bench.server_output(vmlab, "h1g1", "/tmp/co-echo.log", "echoed", 60)
    assert echoed == {"echoed": co["bytes"], "path": "tcp", "reason": None}
    lo = _bench.server_output(vmlab, "h1g2", lo_soak, "paths", 180)
    assert lo["ok"] and lo["errors"] == [] and lo["paths"] == ["shm"], lo
    assert figures["switch_s"] >= 0
    assert float(vmlab.run(moved, ["cat", "/proc/uptime"], timeout=60).stdout.split()[0]) > uptime
    # The guest reads the fw_cfg of the QEMU running it now: its new host's gateway.
    assert _fw_cfg_gateway(vmlab, moved) == _gateway_of(vmlab, "h2")
    word = f"moved-{time.monotonic_ns()}"
    deadline = time.monotonic() + 30
    while True:  # the hot-plugged device appears once the guest has rescanned
        r = vmlab.run(moved, [PY, "-c", IVSHMEM, "write", word], timeout=60)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.returncode == 0, r.stderr.decode()
    with open(vmlab.pool("h2"), "rb") as pool:
        pool.seek(4096)
        assert pool.read(len(word)) == word.encode()
    print(f"migration of h1g2 under {vmlab.accel}: {figures}, echo client {out}, cosock {co}")


def _fw_cfg_gateway(lab: Any, guest: Any) -> str:
    r = lab.run(guest, ["cat", "/sys/firmware/qemu_fw_cfg/by_name/opt/cosock/gateway/raw"])
    assert r.returncode == 0, r.stderr.decode()
    return str(r.stdout.decode().strip())


def _gateway_of(lab: Any, host: str) -> str:
    from cosock.agent._vmgate import PORT

    return f"{next(h for h in lab.hosts() if h['name'] == host)['address']}:{PORT}"


def _lines(lab: object, guest: str, log: str) -> list[dict[str, object]]:
    from cosock.lab.qemu import QemuLab, _bench

    assert isinstance(lab, QemuLab)
    return _bench._json_lines(lab.run(guest, ["cat", log], timeout=60).stdout.decode())


def _wait_path(lab: object, guest: str, log: str, path: str, after: int, timeout: float) -> float:
    """The soak client's ``{"path", "t"}`` lines: wait for the first ``path`` change beyond
    the first ``after`` of them; its time on the VM's clock."""
    deadline = time.monotonic() + timeout
    while True:
        changes = [x for x in _lines(lab, guest, log) if "t" in x]
        if len(changes) > after and changes[after]["path"] == path:
            return float(str(changes[after]["t"]))
        assert len(changes) <= after, f"{guest} {log}: unexpected path changes {changes}"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{guest} {log}: no change to {path} ({changes}); {_diagnose(lab)}"
            )
        time.sleep(0.3)


def _diagnose(lab: object) -> str:
    """What a failed wait reports: each VM's QEMU, neighbours, pool device, last kernel lines
    and cosock logs, and what its library says about the others."""
    from cosock.lab.qemu import QemuLab, _vm

    assert isinstance(lab, QemuLab)
    out = []
    for g in lab.guests:
        out.append(f"== {g.name} on {g.host}: qemu {'up' if _vm.is_qemu(g.pid) else 'gone'}")
        out.append(f"serial: {_vm.tail(g.serial, 5)}")
        others = " ".join(x.address for x in lab.guests if x.name != g.name)
        probe = (
            "ip neigh; grep -l 0x1110 /sys/bus/pci/devices/*/device; dmesg | tail -5;"
            " tail -3 /tmp/re-*.log /tmp/gw-*.log 2>/dev/null;"
            f' for a in {others}; do {PY} -c "{WHY}" $a; done'
        )
        try:
            r = lab.run(g, ["sh", "-c", probe], timeout=60)
            out.append(r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")[-800:])
        except Exception as exc:  # the report must not hide the failure it explains
            out.append(f"(no command server: {exc})")
    for h in lab.hosts():
        out.append(f"== agent {h['name']}: {_vm.tail(Path(h['agent_log']), 5)}")
    return "\n".join(out)


#: What the moved VM's library says about a destination (lookup's reason).
WHY = """
import sys
from cosock import _vmchannel
print(sys.argv[1], _vmchannel.directory().lookup(sys.argv[1], 1))
"""


def _co_located(lab: object, guests: dict[str, str]) -> None:
    """Move each guest to its host if it is elsewhere (earlier tests migrate some)."""
    from cosock.lab.qemu import QemuLab

    assert isinstance(lab, QemuLab)
    for name, host in guests.items():
        if lab.guest(name).host != host:
            lab.migrate(name, host)


def test_a_moved_vm_upgrades_to_its_new_neighbours_and_keeps_its_old_ones_on_tcp(
    vmlab: object,
) -> None:
    """Issue 8, item 5: h1g1 (M) holds two live ``cosock run`` connections under load, to h1g2
    (N) and to h1g3 (O), both through slots of h1's pool. N migrates to h2 first: M-N goes
    shm -> TCP. Then M migrates to h2 as well: its library is sent from h1's gateway to h2's,
    reopens the pool (h2's, hot-plugged after the move), and M-N goes TCP -> shm (a fresh slot
    of h2's pool, UPGRADE) while M-O goes shm -> TCP; every echo is checked, and both servers
    echoed exactly what the client sent. New connections from M then take shm to N and TCP
    (``not-coresident``) to O."""
    from cosock.lab.qemu import QemuLab, _bench

    assert isinstance(vmlab, QemuLab)
    _co_located(vmlab, {"h1g1": "h1", "h1g2": "h1", "h1g3": "h1"})
    m, n, o = vmlab.guest("h1g1"), vmlab.guest("h1g2"), vmlab.guest("h1g3")
    run = [PY, "-m", "cosock", "run", "--", PY, COSOCK_PEER]
    vmlab.spawn(n, [*run, "echo-server", "0.0.0.0", "6020"], log="/tmp/re-n.log")
    vmlab.spawn(o, [*run, "echo-server", "0.0.0.0", "6021"], log="/tmp/re-o.log")
    # Servers that only listen through both moves (no gateway request of their own).
    vmlab.spawn(n, [*run, "server", "0.0.0.0", "6022", "1"], log="/tmp/re-n2.log")
    vmlab.spawn(o, [*run, "server", "0.0.0.0", "6023", "1"], log="/tmp/re-o2.log")
    for guest, log in (("h1g2", "/tmp/re-n.log"), ("h1g3", "/tmp/re-o.log")):
        _bench.server_output(vmlab, guest, log, "listening", 120)
    for guest, log in (("h1g2", "/tmp/re-n2.log"), ("h1g3", "/tmp/re-o2.log")):
        assert _bench.server_output(vmlab, guest, log, "listening", 120)["path"] == "tcp"
    stop = "/tmp/re-stop"
    to_n, to_o = "/tmp/re-mn.log", "/tmp/re-mo.log"
    vmlab.spawn(m, [*run, "soak-client", n.address, "6020", "900", stop], log=to_n)
    vmlab.spawn(m, [*run, "soak-client", o.address, "6021", "900", stop], log=to_o)
    assert _bench.server_output(vmlab, "h1g1", to_n, "started", 120) == {"started": "shm"}
    assert _bench.server_output(vmlab, "h1g1", to_o, "started", 120) == {"started": "shm"}
    try:
        first = vmlab.migrate("h1g2", "h2")  # N leaves M: shm -> TCP
        _wait_path(vmlab, "h1g1", to_n, "tcp", 0, 60)
        second = vmlab.migrate("h1g1", "h2")  # M joins N (TCP -> shm) and leaves O
        ended = time.monotonic()
        vm_ended = float(vmlab.run(m, ["cat", "/proc/uptime"], timeout=60).stdout.split()[0])
        vm_shm = _wait_path(vmlab, "h1g1", to_n, "shm", 1, 120)
        host_s = time.monotonic() - ended
        assert _wait_path(vmlab, "h1g1", to_o, "tcp", 0, 30)
        # New connections from the moved VM: to its new neighbour through h2's pool (to a
        # server that moved too, and only listened: re-published at h2 on its own); to its
        # old one on TCP.
        new_n = vmlab.run(m, [*run, "plain-client", n.address, "6022"], timeout=120)
        new_o = vmlab.run(m, [*run, "plain-client", o.address, "6023"], timeout=120)
        assert json.loads(new_n.stdout.decode().splitlines()[-1]) == {
            "answer": "3",
            "path": "shm",
            "reason": None,
        }, new_n.stderr.decode()[-2000:]
        assert json.loads(new_o.stdout.decode().splitlines()[-1]) == {
            "answer": "3",
            "path": "tcp",
            "reason": "not-coresident",
        }, new_o.stderr.decode()[-2000:]
        assert _bench.server_output(vmlab, "h1g2", "/tmp/re-n2.log", "cmd", 60)["path"] == "shm"
        time.sleep(3)  # the upgraded connection carries on under load for a while
    finally:
        vmlab.run(m, ["touch", stop], timeout=60)
    mn = _bench.server_output(vmlab, "h1g1", to_n, "paths", 180)
    mo = _bench.server_output(vmlab, "h1g1", to_o, "paths", 180)
    assert mn["ok"] and mn["errors"] == [] and mn["paths"] == ["shm", "tcp", "shm"], mn
    assert mo["ok"] and mo["errors"] == [] and mo["paths"] == ["shm", "tcp"], mo
    assert _bench.server_output(vmlab, "h1g2", "/tmp/re-n.log", "echoed", 60) == {
        "echoed": mn["bytes"],
        "path": "shm",
        "reason": None,
    }
    assert _bench.server_output(vmlab, "h1g3", "/tmp/re-o.log", "echoed", 60) == {
        "echoed": mo["bytes"],
        "path": "tcp",
        "reason": None,
    }
    print(
        f"re-upgrade after migration under {vmlab.accel}: N moved {first}, M moved {second};"
        f" tcp -> shm {vm_shm - vm_ended:.2f} s after the migration ended (VM clock, from"
        f" the first command after it; host-side upper bound {host_s:.2f} s); M-N {mn}; M-O {mo}"
    )


def test_a_vm_moved_to_a_host_without_a_gateway_stays_on_tcp_with_a_reason(
    vmlab: object,
) -> None:
    """Bad input: h3's agent (its VM gateway) is down when h1g1 migrates there. Its live
    connection to h1g2 switches to TCP before the move as always and carries on, byte-exact;
    after the move its library asks h3's gateway (fw_cfg names it, or the old gateway's
    redirect), which does not answer, so nothing is upgraded and a new connection falls back
    to TCP at once with ``agent-unreachable``."""
    from cosock.lab import _agents
    from cosock.lab.qemu import QemuLab, _bench

    assert isinstance(vmlab, QemuLab)
    _co_located(vmlab, {"h1g1": "h2", "h1g2": "h2"})
    m, n = vmlab.guest("h1g1"), vmlab.guest("h1g2")
    h3 = next(h for h in vmlab.hosts() if h["name"] == "h3")
    _agents.stop([int(h3["agent_pid"])])
    run = [PY, "-m", "cosock", "run", "--", PY, COSOCK_PEER]
    vmlab.spawn(n, [*run, "echo-server", "0.0.0.0", "6030"], log="/tmp/gw-n.log")
    _bench.server_output(vmlab, "h1g2", "/tmp/gw-n.log", "listening", 120)
    stop, soak = "/tmp/gw-stop", "/tmp/gw-mn.log"
    vmlab.spawn(m, [*run, "soak-client", n.address, "6030", "600", stop], log=soak)
    assert _bench.server_output(vmlab, "h1g1", soak, "started", 120) == {"started": "shm"}
    try:
        vmlab.migrate("h1g1", "h3")
        _wait_path(vmlab, "h1g1", soak, "tcp", 0, 60)
        vmlab.spawn(n, [*run, "server", "0.0.0.0", "6031", "1"], log="/tmp/gw-n2.log")
        _bench.server_output(vmlab, "h1g2", "/tmp/gw-n2.log", "listening", 120)
        new = vmlab.run(
            m, [*run, "plain-client", n.address, "6031"], env={"PEER_TIMING": "1"}, timeout=120
        )
        report = json.loads(new.stdout.decode().splitlines()[-1])
        took = report.pop("connect_s")
        assert report == {"answer": "3", "path": "tcp", "reason": "agent-unreachable"}, (
            new.stderr.decode()[-2000:]
        )
        assert took < 15, took  # one refused connect to h3's gateway, not a hang
        # Why, as the library says it: h3's gateway (the one fw_cfg names now) refused.
        why = vmlab.run(m, [PY, "-c", WHY, n.address], timeout=120).stdout.decode()
        assert "agent-unreachable" in why and "10.77.3.1:7071" in why, why
        time.sleep(3)
    finally:
        vmlab.run(m, ["touch", stop], timeout=60)
    mn = _bench.server_output(vmlab, "h1g1", soak, "paths", 180)
    assert mn["ok"] and mn["errors"] == [] and mn["paths"] == ["shm", "tcp"], mn
    echoed = _bench.server_output(vmlab, "h1g2", "/tmp/gw-n.log", "echoed", 60)
    assert echoed == {"echoed": mn["bytes"], "path": "tcp", "reason": None}
    print(f"moved to a host without a gateway: connect() took {took:.2f} s; {why.strip()}; {mn}")


def test_z_a_dead_qemu_is_named_and_down_still_cleans(vmlab: object) -> None:
    """Runs just before the teardown test: kill one guest's QEMU as a crash would."""
    import signal

    from cosock.lab.qemu import GuestCommandError, QemuLab, _qmp

    assert isinstance(vmlab, QemuLab)
    victim = vmlab.guest("h1g2")
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    from cosock.lab import _netns

    while _netns.alive(victim.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(GuestCommandError, match=r"guest h1g2: its QEMU .* is not running"):
        vmlab.run(victim, ["true"], timeout=30)
    with pytest.raises(_qmp.QmpError, match="cannot connect"):
        _qmp.command(victim.qmp, "query-status")
    assert vmlab.run("h1g1", ["true"], timeout=60).returncode == 0  # the other one lives on


def test_zz_down_removes_everything(vmlab: object) -> None:
    """Runs last in the module (name order in the group); the finalizer's down is a no-op."""
    from cosock.lab import _netns, down
    from cosock.lab._state import lab_dir, state_path
    from cosock.lab.qemu import QemuLab

    assert isinstance(vmlab, QemuLab)
    pids = [g.pid for g in vmlab.guests]
    pool = vmlab.pool("h1")
    down(vmlab.name)
    down(vmlab.name)  # idempotent
    assert not _netns.list_netns(vmlab.name)
    assert not pool.exists()
    assert not any(_netns.alive(pid) for pid in pids)
    assert not state_path(vmlab.name).exists() and not lab_dir(vmlab.name).exists()


#### Bad input: each fails with a clear error naming the step, leaving nothing behind


def _assert_nothing_left(name: str) -> None:
    from cosock.lab import _netns
    from cosock.lab._state import state_path
    from cosock.lab.qemu._model import SHM_DIR, pool_glob

    assert not _netns.list_netns(name)
    assert not list(SHM_DIR.glob(pool_glob(name)))
    assert not state_path(name).exists()


def test_unknown_kernel_package_is_a_clear_error() -> None:
    reason = qemu_unavailable()
    if reason:
        pytest.skip(reason)
    from cosock.lab.qemu import KernelError, QemuLab

    name = unique_lab_name()
    with pytest.raises(KernelError, match=r"downloading linux-image-0\.0\.0-99-amd64"):
        QemuLab.up(name, guests=1, kernel_package="linux-image-0.0.0-99-amd64")
    _assert_nothing_left(name)
    with pytest.raises(KernelError, match="cloud flavour"):
        QemuLab.up(name, guests=1, kernel_package="linux-image-cloud-amd64")
    _assert_nothing_left(name)


def test_boot_timeout_is_a_clear_error_and_stops_everything() -> None:
    reason = qemu_unavailable()
    if reason:
        pytest.skip(reason)
    from cosock.lab import _netns
    from cosock.lab.qemu import BootError, QemuLab, _vm

    name = unique_lab_name()
    before = set(_vm._children)
    with pytest.raises(BootError, match=r"guest h1g1 did not boot within the timeout"):
        QemuLab.up(name, guests=1, boot_timeout=2.0)
    _assert_nothing_left(name)
    started = set(_vm._children) - before
    assert not any(_netns.alive(pid) for pid in started)


def test_missing_packages_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cosock.lab.qemu import MissingPackages, _packages

    monkeypatch.setenv("PATH", str(tmp_path))  # a real, empty PATH: no qemu, cpio, kmod
    with pytest.raises(MissingPackages, match=r"qemu-system-x86.*cpio.*kmod.*apt-get install"):
        _packages.check()


def test_the_qemu_version_is_read_and_an_old_one_is_named_before_migrating_under_tcg() -> None:
    reason = qemu_unavailable()
    if reason:
        pytest.skip(reason)
    from cosock.lab.qemu import _packages

    binary = _packages.qemu_binary()
    version = _packages.qemu_version(binary)
    said = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    assert said.stdout.startswith("QEMU emulator version " + ".".join(map(str, version)))
    assert _packages.qemu_version("/bin/true") == (0, 0, 0)  # says nothing: no version
    old = _packages.migration_warning((7, 2, 22), "tcg")
    assert old is not None and "QEMU 7.2.22 under TCG" in old and "bookworm-backports" in old
    assert _packages.migration_warning((7, 2, 22), "kvm") is None
    assert _packages.migration_warning((10, 0, 2), "tcg") is None


def test_the_vm_modules_keep_to_their_xdist_group(request: pytest.FixtureRequest) -> None:
    """Under ``pytest -n`` a VM module must stay on one worker, or its lab boots on both and
    more TCG labs run at once than the machine has cores (pytest 9.2 broke xdist 3.8's
    groups: pyproject pins pytest below it)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("not under pytest-xdist: there are no groups to keep")
    assert request.node.nodeid.endswith(f"@{QEMU_GROUP}"), request.node.nodeid


def test_cli_rejects_an_unknown_backend() -> None:
    r = subprocess.run(
        [COSOCK, "lab", "up", "--backend", "xen", "--name", "zz"], capture_output=True, timeout=60
    )
    assert r.returncode == 1
    assert b"invalid backend 'xen'" in r.stderr
    r = subprocess.run([COSOCK, "demo", "--backend", "xen"], capture_output=True, timeout=60)
    assert r.returncode == 1 and b"--backend must be netns or qemu" in r.stderr
    r = subprocess.run([COSOCK, "bench", "--backend", "xen"], capture_output=True, timeout=60)
    assert r.returncode != 0 and b"--backend must be netns or qemu" in r.stderr


def test_cli_rejects_an_unknown_pool_mode_before_starting_anything() -> None:
    from cosock.lab import InvalidLabSpec
    from cosock.lab.qemu import QemuLab

    name = unique_lab_name()
    with pytest.raises(InvalidLabSpec, match="invalid pool mode 'global': use pair or shared"):
        QemuLab.up(name, pool="global")
    r = subprocess.run(
        [COSOCK, "lab", "up", "--backend", "qemu", "--pool", "global", "--name", name],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 1 and b"invalid pool mode 'global'" in r.stderr, r.stderr
    _assert_nothing_left(name)


def test_a_9p_root_guest_sees_host_files_and_a_refused_migration_rolls_back() -> None:
    """The default guest root is the host's root over 9p (any host file is visible), which
    QEMU refuses to migrate: the error names the step, the target QEMU started in h2 is
    stopped, and the guest runs on in h1 with its ivshmem pool plugged back."""
    reason = qemu_unavailable()
    if reason:
        pytest.skip(reason)
    from cosock.lab import MigrationError, _netns, down
    from cosock.lab.qemu import QemuLab

    name = unique_lab_name()
    try:
        lab = QemuLab.up(name, hosts=1, guests=1, spare_hosts=1, pool="shared")
        r = lab.run("h1g1", ["cat", "/etc/os-release"], timeout=60, check=True)
        assert r.stdout == Path("/etc/os-release").read_bytes()
        before = lab.guest("h1g1")
        with pytest.raises(MigrationError, match=r"migration step 'migrate': .*VirtFS"):
            lab.migrate("h1g1", "h2")
        after = QemuLab.load(name).guest("h1g1")
        assert (after.host, after.pid) == ("h1", before.pid)
        assert lab.qmp(after, "query-status")["status"] == "running"
        h2 = next(h for h in lab.hosts() if h["name"] == "h2")
        key = _netns.netns_key(h2["netns"])
        assert key is not None
        assert [p for p in _netns.pids_in({key}) if "qemu-system" in _netns.cmdline(p)] == []
        word = f"back-{time.monotonic_ns()}"
        deadline = time.monotonic() + 30
        while True:
            r = lab.run(after, [PY, "-c", IVSHMEM, "write", word], timeout=60)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.returncode == 0, r.stderr.decode()
        with open(lab.pool("h1"), "rb") as pool:
            pool.seek(4096)
            assert pool.read(len(word)) == word.encode()
    finally:
        down(name)
    _assert_nothing_left(name)
