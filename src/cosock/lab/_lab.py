"""The ``Lab``: build, load, use and tear down a set of hosts and guests made of namespaces.

Layout of lab L with hosts h1..hN and guests g1..gM per host::

    cs-L-h1  [br0 10.77.1.1] --- vh1g1 ==veth== eth0 [cs-L-h1g1 10.77.1.11]
       |  \\                 --- vh1g2 ==veth== eth0 [cs-L-h1g2 10.77.1.12]
       |   wh2 ==veth== wh1 [br0 of cs-L-h2] --- vh2g1 ...
       + agent (python -m cosock.agent) on /run/cosock/labs/L/h1/agent.sock

Hosts are wired as a star from h1, so every guest is on one L2 segment (10.77.0.0/16).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._config import ENV_AGENT
from . import _agents, _migrate, _netns, _state
from ._model import (
    BRIDGE,
    DEFAULT_NAME,
    GUEST_IFNAME,
    PREFIXLEN,
    SUBNET_PREFIX,
    Guest,
    Host,
    LabError,
    LabExists,
    LabNotFound,
    UnknownGuest,
    UnknownHost,
    bridge_address,
    guest_address,
    guest_name,
    host_name,
    lab_of_netns,
    netns_name,
    port_ifname,
    require_root,
    validate_name,
    validate_size,
    wire_ifname,
)

if TYPE_CHECKING:
    from .qemu import QemuLab

ENV_GUEST = "COSOCK_GUEST"
ENV_LAB = "COSOCK_LAB"
#: How long links may take to pass packets after being set up (linkwatch runs every 1 s).
LINK_TIMEOUT = 5.0
WIRE_IFINDEX_BASE = 1000


class Lab:
    """A running lab, built by :meth:`up` or read back by :meth:`load`."""

    #: Scale for a test's waits; the QEMU lab's is larger under TCG (same tests, both labs).
    timeout_factor = 1.0

    def __init__(self, state: _state.State) -> None:
        self.name: str = state["name"]
        self._state = state
        self.hosts: list[Host] = [
            Host(
                name=h["name"],
                netns=h["netns"],
                agent_socket=Path(h["agent_socket"]),
                agent_pid=int(h.get("agent_pid") or 0),
            )
            for h in state.get("hosts", [])
        ]
        self.guests: list[Guest] = [
            Guest(
                name=g["name"],
                netns=g["netns"],
                host=g["host"],
                addresses=tuple(g["addresses"]),
            )
            for g in state.get("guests", [])
        ]

    @property
    def status(self) -> str:
        """ "up" once complete; "creating" while (or if a crash stopped) ``up`` building it."""
        return str(self._state.get("status", "creating"))

    def __repr__(self) -> str:
        return f"<Lab {self.name!r} hosts={len(self.hosts)} guests={len(self.guests)}>"

    #### Life cycle

    @classmethod
    def up(cls, name: str = DEFAULT_NAME, hosts: int = 2, guests: int = 2) -> Lab:
        """Build a lab of ``hosts`` hosts with ``guests`` guests each, agents running.

        Raises:
            InvalidLabSpec: bad name or sizes.  NeedsRoot: not root.
            LabExists: state file or namespaces of that name already there.
            AgentStartError: an agent did not come up (everything is torn down first).
        """
        validate_name(name)
        validate_size(hosts, guests)
        require_root("cosock lab up")
        if _netns.list_netns(name):
            raise LabExists(
                f"lab {name!r} already exists (namespaces cs-{name}-* present);"
                f" run `cosock lab down --name {name}` first"
            )
        if not _state.reserve(name):
            raise LabExists(
                f"lab {name!r} already exists; run `cosock lab down --name {name}` first"
            )
        try:
            return cls._build(name, hosts, guests)
        except BaseException:
            # Anything half-built (namespaces, agents, files) goes, then the original error.
            with contextlib.suppress(Exception):
                down(name)
            raise

    @classmethod
    def _build(cls, name: str, n_hosts: int, n_guests: int) -> Lab:
        state = _plan(name, n_hosts, n_guests)
        _state.write(name, state)  # the plan first: a crash from here on leaves a usable record
        with _state.global_lock():
            for rec in [*state["hosts"], *state["guests"]]:
                _netns.create_netns(rec["netns"])
        # Agents first: their interpreter start-up overlaps with building the network.
        started = []
        for h in state["hosts"]:
            sock, log = Path(h["agent_socket"]), Path(h["agent_log"])
            proc = _agents.start(h["name"], h["netns"], sock, log)
            h["agent_pid"] = proc.pid
            started.append((h["name"], proc, sock, log))
        _state.write(name, state)  # pids recorded at once: a crash can still kill them

        with _netns.Netlinks() as nl:
            for h in state["hosts"]:
                _netns.build_host(nl, h["netns"], h["address"])
            for w in state["wires"]:
                ns_a, ns_b = netns_name(name, w["a"]), netns_name(name, w["b"])
                _netns.add_wire(nl, ns_a, w["a_ifname"], ns_b, w["b_ifname"], w["a_index"])
            for g in state["guests"]:
                link = g["link"]
                address = g["addresses"][0]
                _netns.attach_guest(nl, link["netns"], g["netns"], link["ifname"], address)
                g["mac"] = _netns.mac_of(nl, g["netns"], GUEST_IFNAME)
            _wait_links(nl, state)
        for rec in [*state["hosts"], *state["guests"]]:
            rec["netns_inode"] = os.stat(_netns.netns_path(rec["netns"])).st_ino
        for g in state["guests"]:
            _state.point_guest(name, g["name"], g["host"])
            g["agent_link"] = str(_state.guest_agent_socket(name, g["name"]))
        _agents.wait_ready(started)

        lab = cls(state)
        for guest in lab.guests:
            lab._register(guest)
        state["status"] = "up"
        _state.write(name, state)
        return lab

    @classmethod
    def load(cls, name: str = DEFAULT_NAME) -> Lab:
        """The lab recorded in the state file.  Raises LabNotFound."""
        validate_name(name)
        state = _state.read(name)
        if state is None:
            raise LabNotFound(f"no lab named {name!r} (no state in {_state.LABS_DIR})")
        state.setdefault("name", name)
        if state.get("backend", "netns") != "netns":
            raise LabError(
                f"lab {name!r} is a {state['backend']} lab; use cosock.lab.load_any({name!r})"
            )
        return cls(state)

    @staticmethod
    def list() -> builtins.list[str]:
        """Names of labs with a state file or with namespaces left over (e.g. after a crash)."""
        found = set(_state.names())
        found.update(lab for ns in _netns.list_netns() if (lab := lab_of_netns(ns)))
        return sorted(found)

    def down(self) -> None:
        """Tear the lab down; see :func:`down`."""
        down(self.name)

    def close(self) -> None:
        """Close the netlink sockets :meth:`migrate` keeps open in this process (one per
        namespace, so the next migration is cheap). Only needed by a process that migrates
        guests of a lab another process tears down: an open one keeps its namespace alive.
        :func:`down` closes them itself."""
        _netns.close_lab_netlinks(self.name)

    #### Members

    def host(self, name: str | Host) -> Host:
        key = name.name if isinstance(name, Host) else name
        for h in self.hosts:
            if h.name == key:
                return h
        raise UnknownHost(f"lab {self.name!r} has no host {key!r}")

    def guest(self, name: str | Guest) -> Guest:
        key = name.name if isinstance(name, Guest) else name
        for g in self.guests:
            if g.name == key:
                return g
        known = ", ".join(g.name for g in self.guests)
        raise UnknownGuest(f"lab {self.name!r} has no guest {key!r} (guests: {known})")

    def guests_of(self, host: str | Host) -> builtins.list[Guest]:
        h = self.host(host)
        return [g for g in self.guests if g.host == h.name]

    #### Running things in guests

    def env(self, guest: str | Guest) -> dict[str, str]:
        """Environment of processes in ``guest``: ours plus where its agent is and who it is.

        The agent path is the guest's own (``<lab>/guests/<guest>/agent.sock``), a link that
        :meth:`migrate` re-points, so processes started before a migration find the new
        host's agent when they reconnect.
        """
        g = self.guest(guest)
        env = dict(os.environ)
        link = self._guest_record(g.name).get("agent_link")
        env[ENV_AGENT] = str(link or self.host(g.host).agent_socket)
        env[ENV_GUEST] = g.name
        env[ENV_LAB] = self.name
        return env

    def popen(
        self, guest: str | Guest, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the guest's namespace, environment :meth:`env` + ``env=``.

        Any ``preexec_fn`` given runs after the switch into the guest namespace.
        """
        g = self.guest(guest)
        require_root("running a command in a lab guest")
        env = self.env(g)
        env.update(kwargs.pop("env", None) or {})
        user_preexec: Callable[[], Any] | None = kwargs.pop("preexec_fn", None)
        proc: subprocess.Popen[Any] | None = None
        with _netns.open_netns(g.netns) as fd:
            try:
                with _netns.forking():
                    proc = subprocess.Popen(
                        list(argv),
                        env=env,
                        preexec_fn=_netns.setns_preexec(fd, user_preexec),
                        **kwargs,
                    )
            except BaseException:
                if proc is not None:  # a Ctrl-C during the fork: no orphan in the guest
                    proc.kill()
                    proc.wait()
                raise
        return proc

    def run(
        self,
        guest: str | Guest,
        argv: Sequence[str],
        timeout: float | None = None,
        check: bool = False,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """Like :func:`subprocess.run`, inside the guest (the child is killed on timeout)."""
        input_data = kwargs.pop("input", None)
        if input_data is not None:
            kwargs.setdefault("stdin", subprocess.PIPE)
        if kwargs.pop("capture_output", False):
            kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
        with self.popen(guest, argv, **kwargs) as proc:
            try:
                out, err = proc.communicate(input_data, timeout=timeout)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    #### Migration

    def migrate(
        self, guest: str | Guest, to_host: str | Host, *, delay_ms: float | None = None
    ) -> Guest:
        """Live-migrate ``guest`` to ``to_host``; returns the guest's new record.

        Its processes keep running with unchanged addresses and sockets; its port moves to
        the new host's bridge (traffic to its old neighbours now crosses the inter-host
        wire); the state file, the guest's agent path and both agents are updated, and the
        old agent hangs up on the guest's processes so they reconnect to the new one. When
        this returns, every process's next :meth:`AgentClient.poll` sees the new residency.
        ``delay_ms`` (if given) first sets the delay of every inter-host wire (see
        :meth:`set_wire_delay`).

        Raises:
            UnknownGuest, UnknownHost, MigrationError (already on that host): nothing done.
            NetemUnavailable: a delay was asked for without tc netem; nothing done.
            AgentUnavailable: the new host's agent could not register the guest (the network
            move has happened and is recorded).
        """
        g_name = guest.name if isinstance(guest, Guest) else guest
        h_name = to_host.name if isinstance(to_host, Host) else to_host
        _migrate.check(self._state, g_name, h_name)  # clear errors before asking for root
        require_root("cosock lab migrate")
        with _state.lab_lock(self.name):
            state = _state.read(self.name) or self._state  # the newest, under the lock
            g, h = _migrate.check(state, g_name, h_name)
            old = next(r for r in state["hosts"] if r["name"] == g["host"])
            if delay_ms is not None:
                _migrate.set_wire_delay(state, delay_ms)
            _migrate.replug(state, g, h)
            _state.write(self.name, state)
            self._reload(state)
            _migrate.hand_over(state, g, old)
        return self.guest(g_name)

    def set_wire_delay(self, delay_ms: float) -> None:
        """Delay every packet on every inter-host wire by ``delay_ms`` each way (0: none).

        Raises:
            NetemUnavailable: the kernel has no tc netem; nothing was changed.
        """
        require_root("setting the lab's wire delay")
        with _state.lab_lock(self.name):
            state = _state.read(self.name) or self._state
            _migrate.set_wire_delay(state, delay_ms)
            _state.write(self.name, state)
            self._reload(state)

    def _reload(self, state: _state.State) -> None:
        fresh = Lab(state)
        self._state, self.hosts, self.guests = state, fresh.hosts, fresh.guests

    def _guest_record(self, name: str) -> dict[str, Any]:
        for rec in self._state.get("guests", []):
            if rec["name"] == name:
                return dict(rec)
        raise UnknownGuest(f"lab {self.name!r} has no guest {name!r}")

    #### Agents

    def _register(self, guest: Guest) -> None:
        from ..agent import client  # the agent layer is below us, loaded only when needed

        host = self.host(guest.host)
        client.register_guest(
            host.agent_socket, guest.name, guest.netns_inode(), list(guest.addresses), host.name
        )

    #### Views

    def link_of(self, guest: str | Guest) -> Mapping[str, str]:
        """Where the guest's bridge-side veth is (``{"netns", "ifname"}``): what migration moves."""
        return dict(self._guest_record(self.guest(guest).name)["link"])

    def wire_ends(self) -> builtins.list[tuple[str, str]]:
        """(host namespace, ifname) of both ends of every inter-host wire."""
        return _migrate.wire_ends(self._state)

    def wire_bytes(self) -> int:
        """Bytes (rx + tx, headers included) that crossed the inter-host wires so far, each
        counted once at the hub's end: proof that a migrated guest's traffic takes the wire."""
        require_root("reading the lab's wire counters")
        hub = self.hosts[0].netns if self.hosts else ""
        with _state.lab_lock(self.name):
            nl = _netns.lab_netlinks(self.name)
            return sum(
                sum(_netns.link_bytes(nl, ns, ifname))
                for ns, ifname in self.wire_ends()
                if ns == hub
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hosts": [
                {
                    "name": h.name,
                    "netns": h.netns,
                    "agent_socket": str(h.agent_socket),
                    "agent_pid": h.agent_pid,
                }
                for h in self.hosts
            ],
            "guests": [
                {"name": g.name, "host": g.host, "netns": g.netns, "addresses": list(g.addresses)}
                for g in self.guests
            ],
        }


def plan_wires(hosts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The inter-host wires of a lab (any backend): h1 to every other host."""
    first = host_name(1)
    return [
        {
            "a": first,
            "a_ifname": wire_ifname(h["name"]),
            "b": h["name"],
            "b_ifname": wire_ifname(first),
            # Far above the few links a host has, so the two ends never share an ifindex.
            "a_index": WIRE_IFINDEX_BASE + n,
        }
        for n, h in enumerate(hosts[1:], start=2)
    ]


def _plan(name: str, n_hosts: int, n_guests: int) -> _state.State:
    """The full state record of a lab before anything exists: names, addresses, links."""
    hosts: list[dict[str, Any]] = []
    guests: list[dict[str, Any]] = []
    for h in range(1, n_hosts + 1):
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
            }
        )
        for g in range(1, n_guests + 1):
            gname = guest_name(h, g)
            guests.append(
                {
                    "name": gname,
                    "netns": netns_name(name, gname),
                    "host": hname,
                    "addresses": [guest_address(h, g)],
                    "prefixlen": PREFIXLEN,
                    "ifnames": {"guest": GUEST_IFNAME, "port": port_ifname(gname)},
                    # Which host namespace holds the bridge-side veth: migration moves this.
                    "link": {"netns": hns, "ifname": port_ifname(gname)},
                }
            )
    wires = plan_wires(hosts)
    return {
        "version": _state.STATE_VERSION,
        "name": name,
        "status": "creating",
        "subnet": f"{SUBNET_PREFIX}.0.0/{PREFIXLEN}",
        "hosts": hosts,
        "guests": guests,
        "wires": wires,
    }


def _wait_links(nl: _netns.Netlinks, state: _state.State, timeout: float = LINK_TIMEOUT) -> None:
    """Every veth end and bridge of the lab passing packets (see wait_operational)."""
    deadline = time.monotonic() + timeout
    ports: dict[str, list[str]] = {h["netns"]: [BRIDGE] for h in state["hosts"]}
    for w in state["wires"]:
        ports[netns_name(state["name"], w["a"])].append(w["a_ifname"])
        ports[netns_name(state["name"], w["b"])].append(w["b_ifname"])
    for g in state["guests"]:
        ports[g["link"]["netns"]].append(g["link"]["ifname"])
        ports[g["netns"]] = [GUEST_IFNAME]
    for ns, ifnames in ports.items():
        _netns.wait_operational(nl, ns, ifnames, deadline)


def load_any(name: str = DEFAULT_NAME) -> Lab | QemuLab:
    """The lab ``name`` whatever its backend: a :class:`Lab` (namespaces) or a
    :class:`cosock.lab.qemu.QemuLab` (virtual machines), as its state file says."""
    validate_name(name)
    state = _state.read(name)
    if state is not None and state.get("backend") == "qemu":
        from .qemu import QemuLab

        return QemuLab.load(name)
    return Lab.load(name)


def down(name: str = DEFAULT_NAME) -> None:
    """Remove every trace of lab ``name``; idempotent, and works without (or with a stale)
    state file, e.g. after a crash.

    Order matters: agents get a SIGTERM first (clean socket removal), then every process still
    inside a lab namespace is killed (nothing may keep running in a namespace we drop), then the
    namespaces go, then the files.
    """
    validate_name(name)
    require_root("cosock lab down")
    state = _state.read(name) or {}
    from .qemu import _teardown  # QEMU guests first: SIGTERM lets each remove its tap

    _teardown.stop_vms(state)
    pids = [int(h.get("agent_pid") or 0) for h in state.get("hosts", []) if isinstance(h, dict)]
    _agents.stop(pids)
    _netns.close_lab_netlinks(name)

    namespaces = _netns.list_netns(name)
    keys = {key for ns in namespaces if (key := _netns.netns_key(ns)) is not None}
    _netns.kill_all_in(keys)
    _agents.reap()
    with _state.global_lock():
        for ns in namespaces:
            _netns.remove_netns(ns)
    shutil.rmtree(_state.lab_dir(name), ignore_errors=True)
    _teardown.remove_pools(name)
    _state.remove(name)
