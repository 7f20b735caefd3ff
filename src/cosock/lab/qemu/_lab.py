"""``QemuLab``: hosts made of namespaces (as in the namespace lab), guests that are QEMU VMs.

Layout of lab L, host h1, guests h1g1, h1g2::

    cs-L-h1 [br0 10.77.1.1] --- th1g1 (tap) == virtio-net == eth0 [VM h1g1 10.77.1.11]
       |                    --- th1g2 (tap) == virtio-net == eth0 [VM h1g2 10.77.1.12]
       |  /dev/shm/cosock-L-h1.ivshmem  == ivshmem BAR2 of every VM of h1
       + agent, QEMU processes (QMP on /run/cosock/labs/L/<guest>/qmp.sock)

Steps of ``up`` (each failure names its step, and everything started is stopped): packages,
kernel, initramfs, accelerator, namespaces and bridges, agents, pools, QEMUs, taps on the
bridge, boot, command servers.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..._vmagent import ENV_GATEWAY
from ...agent._vmgate import PORT as GATEWAY_PORT
from .. import _agents, _netns, _state
from .._lab import down as lab_down
from .._lab import plan_wires
from .._model import (
    BRIDGE,
    DEFAULT_NAME,
    PREFIXLEN,
    SUBNET_PREFIX,
    InvalidLabSpec,
    LabExists,
    LabNotFound,
    UnknownGuest,
    UnknownHost,
    bridge_address,
    guest_address,
    guest_name,
    host_name,
    netns_name,
    require_root,
    validate_name,
    validate_size,
)
from . import _accel, _exec, _initramfs, _kernel, _packages, _script, _vm
from ._model import (
    BOOT_TIMEOUT,
    DEFAULT_POOL_MODE,
    MAX_VM_GUESTS,
    POOL_MB,
    POOL_MODES,
    BootError,
    GuestCommandError,
    VmError,
    guest_mac,
    pair_pool_prefix,
    pool_path,
    tap_ifname,
)
from ._popen import GuestPopen

BACKEND = "qemu"
TAP_TIMEOUT = 15.0
#: How long ``restart_agent`` lets a running agent stop (its gateway unplugs the idle pair
#: pools, each acked by the guests) before it kills it (its successor adopts what is left).
AGENT_STOP_S = 10.0
#: How much longer than on namespaces a test waits for the same thing under TCG (emulated
#: vCPUs on a shared 2-core machine: Python start-up, rings and wake-ups 10-30x slower).
TCG_TIMEOUT_FACTOR = 4.0


@dataclass(frozen=True)
class VmGuest:
    """A QEMU guest: where it runs (its host's namespace), its address, its control files."""

    name: str
    host: str
    netns: str  # the host namespace its QEMU runs in (and its tap lives in)
    addresses: tuple[str, ...]
    mac: str
    pid: int
    qmp: Path
    serial: Path

    @property
    def address(self) -> str:
        return self.addresses[0]

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.netns


@dataclass(frozen=True)
class VmHost:
    """A host of a QEMU lab: its namespace, bridge address and agent (the VM gateway)."""

    name: str
    netns: str
    address: str
    agent_pid: int
    agent_socket: Path
    pool: Path


def _guest_dir(lab: str, guest: str) -> Path:
    return _state.lab_dir(lab) / "vm" / guest


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[3])


class QemuLab:
    """A running QEMU lab, built by :meth:`up` or read back by :meth:`load`."""

    backend = BACKEND

    def __init__(self, state: _state.State) -> None:
        self.name: str = state["name"]
        self._state = state
        self.accel: str = str(state.get("accel", "?"))
        self.accel_reason: str = str(state.get("accel_reason", ""))
        #: "10.0.2"; "" for a lab made before the version was recorded.
        self.qemu_version: str = str(state.get("qemu_version", ""))
        self.guests: list[VmGuest] = [
            VmGuest(
                name=g["name"],
                host=g["host"],
                netns=g["netns"],
                addresses=tuple(g["addresses"]),
                mac=g["mac"],
                pid=int(g.get("pid") or 0),
                qmp=Path(g["qmp"]),
                serial=Path(g["serial"]),
            )
            for g in state.get("guests", [])
        ]

    @property
    def status(self) -> str:
        return str(self._state.get("status", "creating"))

    @property
    def boot_seconds(self) -> dict[str, float]:
        return dict(self._state.get("boot_seconds", {}))

    @property
    def migration_warning(self) -> str | None:
        """Why a live migration of a guest that moves traffic may crash it on this QEMU."""
        if not self.qemu_version:
            return None
        version = tuple(int(x) for x in self.qemu_version.split("."))
        return _packages.migration_warning(version, self.accel)

    @property
    def timeout_factor(self) -> float:
        """Scale for a test's waits (not for what it checks): TCG is slow, KVM is not."""
        return TCG_TIMEOUT_FACTOR if self.accel == "tcg" else 1.0

    def __repr__(self) -> str:
        return f"<QemuLab {self.name!r} accel={self.accel} guests={len(self.guests)}>"

    #### Life cycle

    @classmethod
    def up(
        cls,
        name: str = DEFAULT_NAME,
        hosts: int = 1,
        guests: int = 2,
        *,
        kernel_package: str | None = None,
        boot_timeout: float = BOOT_TIMEOUT,
        spare_hosts: int = 0,
        root: str = "9p",
        pool: str = DEFAULT_POOL_MODE,
    ) -> QemuLab:
        """Build ``hosts`` hosts with ``guests`` VMs each, plus ``spare_hosts`` hosts without
        VMs (migration targets that cost no boot); returns when every command server answers.
        ``root``: "9p" (the host's root, read-only: any host file is visible; QEMU cannot
        migrate such a guest) or "image" (a read-only ext4 image of the interpreter and this
        repository: migratable; see :mod:`._rootfs`). ``pool``: "pair" (one ivshmem pool
        per pair of VMs that talk, hot-plugged into those two only) or "shared" (one pool per
        host, mapped by all its VMs: one tenant only; docs/vm-backend.md, section 4).

        Raises:
            InvalidLabSpec, NeedsRoot, LabExists: nothing started.
            MissingPackages, KernelError, InitramfsError: before any namespace exists.
            BootError, GuestCommandError, AgentStartError: everything started is torn down.
        """
        validate_name(name)
        validate_size(hosts + spare_hosts, guests)
        if root not in ("9p", "image"):
            raise InvalidLabSpec(f"invalid guest root {root!r}: use 9p or image")
        if pool not in POOL_MODES:
            raise InvalidLabSpec(f"invalid pool mode {pool!r}: use {' or '.join(POOL_MODES)}")
        if spare_hosts < 0:
            raise InvalidLabSpec(f"invalid number of spare hosts {spare_hosts}")
        if guests > MAX_VM_GUESTS:
            raise InvalidLabSpec(
                f"invalid number of guests per host {guests}: a QEMU lab allows 1..{MAX_VM_GUESTS}"
            )
        require_root("cosock lab up --backend qemu")
        _packages.check()
        if _netns.list_netns(name) or not _state.reserve(name):
            raise LabExists(
                f"lab {name!r} already exists; run `cosock lab down --name {name}` first"
            )
        try:
            kernel = _kernel.fetch(kernel_package)
            initramfs = _initramfs.build(kernel)
            qemu = _packages.qemu_binary()
            accel = _accel.choose(qemu, kernel.vmlinuz, initramfs)
            state = _plan(name, hosts, guests, kernel, initramfs, accel, spare_hosts)
            state["qemu_version"] = ".".join(map(str, _packages.qemu_version(qemu)))
            state["pool_mode"] = pool
            if root == "image":
                from . import _rootfs

                state["root_image"] = str(_rootfs.build())
            return cls._build(state, qemu, boot_timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                lab_down(name)
            raise

    @classmethod
    def _build(cls, state: _state.State, qemu: str, boot_timeout: float) -> QemuLab:
        name = state["name"]
        _state.write(name, state)
        with _state.global_lock():
            for h in state["hosts"]:
                _netns.create_netns(h["netns"])
        # Pools and tokens first: each agent's VM gateway opens its pool and guests file.
        for h in state["hosts"]:
            if pool_mode(state) == "shared":
                _make_pool(Path(h["pool"]), int(state["pool_mb"]))
        scripts: dict[str, str] = {}
        for g in state["guests"]:
            token, agent_token = secrets.token_hex(16), secrets.token_hex(16)
            _write_private(Path(g["token_file"]), token)
            _write_private(Path(g["agent_token_file"]), agent_token)
            host = next(h for h in state["hosts"] if h["name"] == g["host"])
            scripts[g["name"]] = _script.render(
                guest=g["name"],
                address=g["addresses"][0],
                prefixlen=PREFIXLEN,
                python=sys.executable,
                package_root=_package_root(),
                token=token,
                env={ENV_GATEWAY: f"{host['address']}:{GATEWAY_PORT}"},
                root_image="root_image" in state,
            )
        from ._migrate import write_vm_guests

        write_vm_guests(state)
        started = []
        for h in state["hosts"]:
            sock, log = Path(h["agent_socket"]), Path(h["agent_log"])
            proc = _agents.start(h["name"], h["netns"], sock, log, extra=_gateway_args(state, h))
            h["agent_pid"] = proc.pid
            started.append((h["name"], proc, sock, log))
        _state.write(name, state)
        with _netns.Netlinks() as nl:
            for h in state["hosts"]:
                _netns.build_host(nl, h["netns"], h["address"])
            for w in state["wires"]:
                ns_a, ns_b = netns_name(name, w["a"]), netns_name(name, w["b"])
                _netns.add_wire(nl, ns_a, w["a_ifname"], ns_b, w["b_ifname"], w["a_index"])
            booting = []
            t0 = time.monotonic()
            for g in state["guests"]:
                spec = _spec(state, g)
                _write_private(spec.script, scripts[g["name"]])
                log = Path(g["log"])
                proc = _vm.start(spec, qemu, g["netns"], log)
                g["pid"] = proc.pid
                booting.append((spec, proc, log))
            _state.write(name, state)  # pids recorded: a crash from here on can still stop them
            deadline = t0 + boot_timeout
            _plug_taps(nl, state, booting, min(deadline, t0 + TAP_TIMEOUT))
        booted = _vm.wait_booted(booting, deadline, since=t0)
        state["boot_seconds"] = {k: round(v, 2) for k, v in booted.items()}
        for g in state["guests"]:
            token = Path(g["token_file"]).read_text().strip()
            _exec.wait_ping(_netns.netns_path(g["netns"]), g["addresses"][0], token, deadline)
        _agents.wait_ready(started)
        state["status"] = "up"
        _state.write(name, state)
        return cls(state)

    @classmethod
    def load(cls, name: str = DEFAULT_NAME) -> QemuLab:
        validate_name(name)
        state = _state.read(name)
        if state is None:
            raise LabNotFound(f"no lab named {name!r} (no state in {_state.LABS_DIR})")
        if state.get("backend") != BACKEND:
            raise VmError(f"lab {name!r} is not a QEMU lab")
        return cls(state)

    def down(self) -> None:
        lab_down(self.name)

    #### Members

    def guest(self, name: str | VmGuest) -> VmGuest:
        key = name.name if isinstance(name, VmGuest) else name
        for g in self.guests:
            if g.name == key:
                return g
        known = ", ".join(g.name for g in self.guests)
        raise UnknownGuest(f"lab {self.name!r} has no guest {key!r} (guests: {known})")

    def hosts(self) -> builtins.list[dict[str, Any]]:
        return [dict(h) for h in self._state.get("hosts", [])]

    def host(self, name: str) -> VmHost:
        """One host, as the namespace lab's ``host()`` gives it (its agent's pid included)."""
        h = self._host_state(name)
        return VmHost(
            name=h["name"],
            netns=h["netns"],
            address=h["address"],
            agent_pid=int(h.get("agent_pid") or 0),
            agent_socket=Path(h["agent_socket"]),
            pool=Path(h["pool"]),
        )

    def _host_state(self, name: str) -> dict[str, Any]:
        """The host's record in the lab state (mutable: restart_agent updates its pid)."""
        for h in self._state.get("hosts", []):
            if h["name"] == name:
                return h  # type: ignore[no-any-return]
        raise UnknownHost(f"lab {self.name!r} has no host {name!r}")

    def restart_agent(self, host: str) -> int:
        """Start the host's agent (and VM gateway) again, with its options: after a crash,
        or stopped here first if it still runs (SIGTERM: it unplugs the pair pools no
        connection uses and leaves the others plugged; given ``AGENT_STOP_S`` for the
        unplugs, then killed). The new gateway unplugs the pair pools its predecessor left
        in the VMs once no connection uses them. Returns its pid.

        Raises:
            UnknownHost: no such host. AgentStartError: the new agent did not come up.
        """
        h = self._host_state(host)
        _agents.stop([int(h.get("agent_pid") or 0)], grace=AGENT_STOP_S)
        sock, log = Path(h["agent_socket"]), Path(h["agent_log"])
        proc = _agents.start(h["name"], h["netns"], sock, log, extra=_gateway_args(self._state, h))
        h["agent_pid"] = proc.pid
        _state.write(self.name, self._state)
        _agents.wait_ready([(h["name"], proc, sock, log)])
        return proc.pid

    def pool(self, host: str) -> Path:
        """The host's ivshmem pool file (what every VM of that host sees as BAR2)."""
        return self.host(host).pool

    def _token(self, guest: VmGuest) -> str:
        return (_guest_dir(self.name, guest.name) / "token").read_text().strip()

    def _require_running(self, guest: VmGuest) -> None:
        """A clear error for a guest whose QEMU is gone, instead of a refused connection."""
        if not _vm.is_qemu(guest.pid):
            raise GuestCommandError(
                f"guest {guest.name}: its QEMU (pid {guest.pid}) is not running;"
                f" serial: {_vm.tail(guest.serial) or 'empty'};"
                f" run `cosock lab down --name {self.name}`"
            )

    #### Running things in guests

    def run(
        self,
        guest: str | VmGuest,
        argv: Sequence[str],
        timeout: float | None = None,
        check: bool = False,
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside the VM (as root, in the chrooted host root); output captured."""
        g = self.guest(guest)
        require_root("running a command in a lab VM")
        self._require_running(g)
        result = _exec.run(
            g.netns_path,
            g.address,
            self._token(g),
            argv,
            env=env,
            cwd=cwd,
            stdin=input,
            timeout=timeout,
        )
        if check:
            result.check_returncode()
        return result

    def spawn(
        self,
        guest: str | VmGuest,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log: str = "/dev/null",
    ) -> int:
        """Start ``argv`` in the background inside the VM; its pid there (output: ``log``)."""
        g = self.guest(guest)
        self._require_running(g)
        result = _exec.run(
            g.netns_path, g.address, self._token(g), argv, env=env, detach=True, log=log
        )
        return int(result.stdout)

    def popen(self, guest: str | VmGuest, argv: Sequence[str], **kwargs: Any) -> GuestPopen:
        """Start ``argv`` in the VM with pipes, like the namespace lab's ``popen``: a
        :class:`GuestPopen` whose ``stdout`` is a real pipe (select + os.read work), whose
        ``stdin`` takes write/flush/close, and whose child dies with it. Keywords: ``stdin``
        and ``stdout`` (PIPE, DEVNULL or None), ``stderr`` (None: the VM's console, or
        STDOUT), ``env`` (added to the command server's), ``cwd``. A missing program is a
        finished process with status 127. The connection stays made from the host the guest
        ran on at the start: after a migration it crosses the lab's wire (a few bytes per
        exchange, counted by :meth:`wire_bytes`).

        Raises:
            ValueError: a keyword this backend does not support (named).
            GuestCommandError: the command server is unreachable or refused.
        """
        from ._popen import popen

        g = self.guest(guest)
        require_root("running a command in a lab VM")
        self._require_running(g)
        flags = {}
        for key in ("stdin", "stdout"):
            value = kwargs.pop(key, None)
            if value not in (None, subprocess.PIPE, subprocess.DEVNULL):
                raise ValueError(f"QemuLab.popen: {key}={value!r}: only PIPE, DEVNULL or None")
            flags[key] = value == subprocess.PIPE
        stderr = kwargs.pop("stderr", None)
        if stderr not in (None, subprocess.STDOUT):
            raise ValueError(f"QemuLab.popen: stderr={stderr!r}: only None (console) or STDOUT")
        env, cwd = kwargs.pop("env", None), kwargs.pop("cwd", None)
        if kwargs:
            raise ValueError(f"QemuLab.popen: unsupported arguments {sorted(kwargs)}")
        return popen(
            g.netns_path,
            g.address,
            self._token(g),
            argv,
            stdin=flags["stdin"],
            stdout=flags["stdout"],
            stderr_to_stdout=stderr == subprocess.STDOUT and flags["stdout"],
            env=env,
            cwd=cwd,
        )

    #### Migration

    def migrate(self, guest: str | VmGuest, to_host: str) -> dict[str, Any]:
        """Real QEMU live migration of ``guest`` into a QEMU started in ``to_host``'s namespace
        (see :mod:`._migrate`); returns QEMU's and our figures. The guest keeps its address,
        processes and connections.

        Raises:
            UnknownGuest, UnknownHost, MigrationError: naming the step; the guest still runs
            on its source host unless the switch-over itself happened.
        """
        from . import _migrate

        name = guest.name if isinstance(guest, VmGuest) else guest
        require_root("cosock lab migrate (qemu)")
        with _state.lab_lock(self.name):
            state = _state.read(self.name) or self._state
            figures = _migrate.migrate(state, name, to_host, _packages.qemu_binary())
            _state.write(self.name, state)
            fresh = QemuLab(state)
            self._state, self.guests = state, fresh.guests
        return figures

    def qmp(self, guest: str | VmGuest, command: str, **args: Any) -> Any:
        """One QMP command to the guest's QEMU."""
        from . import _qmp

        return _qmp.command(self.guest(guest).qmp, command, **args)

    #### Views

    def wire_bytes(self) -> int:
        """Bytes (rx + tx, headers included) that crossed the inter-host wires so far, each
        counted once at the first host's end, as the namespace lab counts them: the hosts'
        bridges are joined by the same veth wires, so a guest's traffic to a guest on another
        host crosses them (and traffic through a shared pool does not)."""
        from .._migrate import wire_ends

        require_root("reading the lab's wire counters")
        hosts = self._state.get("hosts", [])
        hub = hosts[0]["netns"] if hosts else ""
        with _state.lab_lock(self.name):
            nl = _netns.lab_netlinks(self.name)
            return sum(
                sum(_netns.link_bytes(nl, ns, ifname))
                for ns, ifname in wire_ends(self._state)
                if ns == hub
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": BACKEND,
            "accel": self.accel,
            "accel_reason": self.accel_reason,
            "qemu_version": self.qemu_version,
            "migration_warning": self.migration_warning,
            "kernel": self._state.get("kernel", ""),
            "root": "image" if self._state.get("root_image") else "9p",
            "pool": pool_mode(self._state),
            "hosts": [
                {
                    "name": h["name"],
                    "netns": h["netns"],
                    "agent_socket": h["agent_socket"],
                    "agent_pid": h.get("agent_pid", 0),
                    "pool": h["pool"],
                }
                for h in self._state.get("hosts", [])
            ],
            "guests": [
                {
                    "name": g.name,
                    "host": g.host,
                    "netns": g.netns,
                    "addresses": list(g.addresses),
                    "mac": g.mac,
                    "pid": g.pid,
                    "qmp": str(g.qmp),
                    "boot_seconds": self.boot_seconds.get(g.name),
                }
                for g in self.guests
            ],
        }


#### Building blocks


def _gateway_args(state: Mapping[str, Any], h: Mapping[str, Any]) -> builtins.list[str]:
    """The agent options that make a host's agent the VM gateway of its guests."""
    pools = (
        ["--vm-pool", h["pool"]]
        if pool_mode(state) == "shared"
        else ["--vm-pair-pools", pair_pool_prefix(state["name"], h["name"])]
    )
    return [
        "--vm-gateway",
        f"{h['address']}:{GATEWAY_PORT}",
        *pools,
        "--vm-guests",
        h["vm_guests"],
    ]


def pool_mode(state: Mapping[str, Any]) -> str:
    """ "pair" or "shared"; labs made before per-pair pools existed had the shared pool."""
    return str(state.get("pool_mode", "shared"))


def _write_private(path: Path, text: str) -> None:
    """A root-only file: tokens and scripts hold the guest's command-server secret."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _make_pool(path: Path, size_mb: int) -> None:
    """A zeroed, root-only pool file of the exact size every VM's memory backend maps, its
    header formatted for channels of the default ring size (docs/vm-backend.md, section 2)."""
    from ..._config import ring_size
    from ..._ivshmem import Pool

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size_mb << 20)
    finally:
        os.close(fd)
    with Pool(path) as pool:
        pool.format(ring_size())


def _spec(state: _state.State, g: dict[str, Any]) -> _vm.VmSpec:
    host = next(h for h in state["hosts"] if h["name"] == g["host"])
    gdir = Path(g["dir"])
    return _vm.VmSpec(
        name=g["name"],
        accel=state["accel"],
        kernel=Path(state["vmlinuz"]),
        initramfs=Path(state["initramfs"]),
        script=gdir / "run.sh",
        agent_token=Path(g["agent_token_file"]),
        tap=g["tap"],
        mac=g["mac"],
        pool=Path(host["pool"]) if pool_mode(state) == "shared" else None,
        qmp=Path(g["qmp"]),
        serial=Path(g["serial"]),
        pool_mb=int(state["pool_mb"]),
        root_image=Path(state["root_image"]) if state.get("root_image") else None,
        gateway=f"{host['address']}:{GATEWAY_PORT}",
    )


def _plug_taps(
    nl: _netns.Netlinks,
    state: _state.State,
    booting: Sequence[tuple[_vm.VmSpec, subprocess.Popen[bytes], Path]],
    deadline: float,
) -> None:
    """Put each guest's tap (created by its QEMU) on the host bridge, up.

    Raises:
        BootError: QEMU died before creating its tap, or the tap did not appear in time.
    """
    procs = {spec.name: (proc, log) for spec, proc, log in booting}
    for g in state["guests"]:
        ipr = nl(g["netns"])
        proc, log = procs[g["name"]]
        while not ipr.link_lookup(ifname=g["tap"]):
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise BootError(
                    f"guest {g['name']}: QEMU exited with status {proc.returncode} at start:"
                    f" {tail[0]}"
                )
            if time.monotonic() > deadline:
                raise BootError(f"guest {g['name']}: tap {g['tap']} did not appear")
            time.sleep(0.02)
        index = ipr.link_lookup(ifname=g["tap"])[0]
        bridge = ipr.link_lookup(ifname=BRIDGE)[0]
        ipr.link("set", index=index, master=bridge, state="up")


def _plan(
    name: str,
    n_hosts: int,
    n_guests: int,
    kernel: _kernel.Kernel,
    initramfs: Path,
    accel: _accel.Accel,
    spare_hosts: int = 0,
) -> _state.State:
    hosts: list[dict[str, Any]] = []
    guests: list[dict[str, Any]] = []
    for h in range(1, n_hosts + spare_hosts + 1):
        hname = host_name(h)
        hns = netns_name(name, hname)
        hosts.append(
            {
                "name": hname,
                "netns": hns,
                "address": bridge_address(h),
                "prefixlen": PREFIXLEN,
                "agent_socket": str(_state.agent_socket_path(name, hname)),
                "agent_log": str(_state.agent_log_path(name, hname)),
                "agent_pid": 0,
                "pool": str(pool_path(name, hname)),
                "vm_guests": str(_state.host_dir(name, hname) / "vm-guests.json"),
            }
        )
        for g in range(1, (n_guests if h <= n_hosts else 0) + 1):
            gname = guest_name(h, g)
            gdir = _guest_dir(name, gname)
            guests.append(
                {
                    "name": gname,
                    "host": hname,
                    "netns": hns,
                    "addresses": [guest_address(h, g)],
                    "prefixlen": PREFIXLEN,
                    "mac": guest_mac(h, g),
                    "tap": tap_ifname(gname),
                    "dir": str(gdir),
                    "qmp": str(gdir / "qmp.sock"),
                    "serial": str(gdir / "serial.log"),
                    "log": str(gdir / "qemu.log"),
                    "token_file": str(gdir / "token"),
                    "agent_token_file": str(gdir / "agent-token"),
                    "pid": 0,
                }
            )
    wires = plan_wires(hosts)
    return {
        "version": _state.STATE_VERSION,
        "name": name,
        "backend": BACKEND,
        "status": "creating",
        "subnet": f"{SUBNET_PREFIX}.0.0/{PREFIXLEN}",
        "accel": accel.name,
        "accel_reason": accel.reason,
        "kernel": kernel.package,
        "vmlinuz": str(kernel.vmlinuz),
        "initramfs": str(initramfs),
        "pool_mb": POOL_MB,
        "hosts": hosts,
        "guests": guests,
        "wires": wires,
    }
