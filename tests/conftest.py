"""Fixtures shared by the whole test suite.

Lab fixtures build real network namespaces, so they need root; without it they skip. Each lab
gets a short name unique per pytest process and xdist worker, so ``pytest -n N`` and several
sessions at once never collide, and each is torn down even when its test fails.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings

# Timings are not what the properties check: on a loaded 2-core CI machine one example
# can take 300 ms where it takes 2 ms alone (FlakyFailure "Unreliable test timings").
settings.register_profile("cosock", deadline=None)
settings.load_profile("cosock")

if TYPE_CHECKING:
    from cosock.lab import Lab

IS_ROOT = os.geteuid() == 0
#: Mark for tests that create namespaces themselves (fixtures below skip on their own).
requires_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root: the lab creates network namespaces, bridges and veths"
)

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_counter = itertools.count()


def _b36(n: int) -> str:
    digits = ""
    while True:
        n, d = divmod(n, 36)
        digits = _B36[d] + digits
        if n == 0:
            return digits


def unique_lab_name() -> str:
    """``t`` + pid (2 chars) + xdist worker number + counter: at most 8 chars of [a-z0-9]."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    wid = _b36(int(worker[2:])) if worker[2:].isdigit() else "m"
    return f"t{_b36(os.getpid() % 1296):0>2}{wid}{_b36(next(_counter))}"[:8]


def _skip_unless_root() -> None:
    if not IS_ROOT:
        pytest.skip("needs root: the lab creates network namespaces, bridges and veths")


@pytest.fixture
def lab_name() -> Iterator[str]:
    """A fresh lab name, not built; whatever gets built under it is removed afterwards."""
    _skip_unless_root()
    from cosock.lab import down

    name = unique_lab_name()
    yield name
    down(name)


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """``lab_factory(hosts=2, guests=2) -> Lab``: build labs that are all torn down afterwards."""
    _skip_unless_root()
    from cosock.lab import Lab, LabExists, down

    made: list[str] = []

    def make(hosts: int = 2, guests: int = 2) -> Lab:
        for _ in range(5):  # a stale lab from a killed session may hold a name: skip it
            name = unique_lab_name()
            made.append(name)
            try:
                return Lab.up(name, hosts=hosts, guests=guests)
            except LabExists:
                made.pop()
        raise RuntimeError("could not find a free lab name")

    yield make
    errors = []
    for name in made:
        try:
            down(name)
        except Exception as exc:  # tear down the others anyway
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def lab(lab_factory: Callable[..., Lab]) -> Lab:
    """A running lab with 2 hosts x 2 guests (h1g1, h1g2, h2g1, h2g2) and their agents."""
    return lab_factory(2, 2)


#### Agent


def start_agent(path: Path, host: str = "local", auto: bool = True) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSOCK_")}
    argv = [sys.executable, "-m", "cosock.agent", "--socket", str(path), "--host", host]
    proc = subprocess.Popen([*argv, "--auto"] if auto else argv, env=env)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
            return proc
        except OSError:
            time.sleep(0.02)
        finally:
            probe.close()
    proc.kill()
    raise RuntimeError("agent did not start")


@pytest.fixture
def cosock_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Agent socket path; COSOCK_AGENT points at it for this process and its children."""
    # Unix socket paths hold 108 bytes; pytest's tmp_path under xdist gets close to that.
    short = Path(tempfile.mkdtemp(prefix="csa-", dir="/tmp"))
    path = short / "agent.sock"
    proc = start_agent(path)
    monkeypatch.setenv("COSOCK_AGENT", str(path))
    from cosock.agent.client import AgentClient

    AgentClient.reset_shared()
    yield path
    AgentClient.reset_shared()
    proc.kill()
    proc.wait()
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def peers() -> Iterator[Callable[..., Any]]:
    """``peers(lab, guest, *args)``: start a labpeers.Peer; all are killed afterwards."""
    from labpeers import Peer

    started: list[Peer] = []

    def start(lab: Lab, guest: str, *args: str) -> Peer:
        peer = Peer(lab, guest, *args)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.close()


#### Leaks


def _singleton_fds() -> list[int]:
    """Process-lifetime fds that are not leaks: the offer sender socket (one per process),
    the shared agent client's wake-up epoll and the residency watch's wake-up eventfd."""
    from cosock import _rendezvous, _residency
    from cosock.agent.client import AgentClient

    fds = []
    if _residency._wake_fd is not None:
        fds.append(_residency._wake_fd)
    sender = _rendezvous._sender  # per process (a forked child makes its own)
    if sender is not None and sender.fileno() >= 0:
        fds.append(sender.fileno())
    # The shared agent client's wake-up epoll, made lazily by the residency watch's first
    # round (before or during a test, as scheduling has it); it lives as long as the client.
    client = AgentClient._shared
    epoll = None if client is None else client._epoll
    if epoll is not None and not epoll.closed:
        fds.append(epoll.fileno())
    return fds


@contextlib.contextmanager
def leaks_checked() -> Iterator[None]:
    """Fail if the body leaves fds, memfds, memfd mappings, threads, child processes or lab
    namespaces of this process behind, once they had ``settled_leaks``' bounded time to go.

    The ``leak_check`` fixture wraps every test in it; a module-scoped fixture that owns a
    resource across tests (set up before the first test's snapshot, torn down after the
    last test's check) wraps its own life in it, so the check runs at its teardown."""
    import gc

    from cosock import _pool
    from cosock._leaks import Snapshot, settled_leaks, snapshot
    from cosock.lab._model import NETNS_PREFIX

    ours = [f"{NETNS_PREFIX}t{_b36(os.getpid() % 1296):0>2}"]  # this process's labs only

    def take() -> Snapshot:
        _pool.reset()  # stocked, never-offered channels are the pool's, not leaks
        gc.collect()
        return snapshot(ours, _singleton_fds())

    before = take()
    yield
    leaks = settled_leaks(before, take)
    found = {kind: items for kind, items in leaks.items() if items}
    assert not found, f"leaked: {found}"


@pytest.fixture(autouse=True)
def leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test fails if it leaves fds, memfds, memfd mappings, threads, child processes or
    lab namespaces behind (issue 6, item 4).  Autouse, so it is set up before, and checked
    after, every function-scoped fixture (``cosock_agent``, ``lab``, ...): their teardown is
    part of what is checked.  Module-scoped fixtures are set up before it and torn down
    after it; they check themselves with :func:`leaks_checked`.  Tests marked
    ``leaks_checked_by_module`` grow a module-scoped resource (a VM migrated into a new QEMU
    process, say): the module's fixture checks the whole at its teardown instead."""
    if request.node.get_closest_marker("leaks_checked_by_module"):
        yield
        return
    with leaks_checked():
        yield


#### The same tests on both backends (issue 8, item 4)

#: The VM modules run in two xdist groups, one per worker of ``make test``'s ``-n 2``: each
#: module's lab boots once, at most two labs run at once, and the ~25 min of TCG work is split
#: (lab, exec, ivshmem, cosock between VMs, status | the suites on both backends, pair pools).
QEMU_GROUP = "qemu-lab"
QEMU_GROUP_2 = "qemu-lab-2"

#: Marks of a test's QEMU variant: VMs, one worker for the module's shared VM lab, checked for
#: leaks by that lab's fixture (a migration starts a new QEMU: a new child), TCG-sized timeout.
#: They run in ``make test`` (CI) with QEMU >= 10; under TCG, QEMU 7.2 corrupts a guest migrated
#: while it moves traffic (docs/vm-backend.md, section 6), and ``.ci/run`` installs 10.0.
QEMU_MARKS = [
    pytest.mark.vm,
    pytest.mark.xdist_group(QEMU_GROUP_2),
    pytest.mark.leaks_checked_by_module,
    pytest.mark.timeout(900),
]
#: ``@pytest.fixture(params=BACKENDS)``: each test once on namespaces, once on QEMU VMs.
BACKENDS = ["netns", pytest.param("qemu", marks=QEMU_MARKS)]


def skip_on_qemu(lab: Any, reason: str) -> None:
    """Skip a both-backends test's QEMU variant, with the reason it cannot run there."""
    if getattr(lab, "backend", "netns") == "qemu":
        pytest.skip(f"QEMU: {reason}")


def qemu_unavailable() -> str | None:
    """Why this machine cannot boot a QEMU lab (None: it can)."""
    if not IS_ROOT:
        return "needs root: the QEMU lab creates namespaces, taps and /dev/shm pools"
    from cosock.lab.qemu import _packages

    absent = _packages.missing()
    if absent:
        return f"needs the packages {', '.join(absent)} (.ci/run installs them)"
    return None


class SharedQemuLab:
    """One QEMU lab (2 hosts x 2 VMs, migratable ``image`` root) for a module's tests: boots
    take a minute under TCG, so tests share it. Before each test every guest is moved back
    to its own host; a lab with a dead QEMU or agent (a test killed it) is replaced."""

    def __init__(self) -> None:
        self.lab: Any = None
        self.boots = 0

    def fresh(self) -> Any:
        from cosock.lab import _netns
        from cosock.lab.qemu import _vm

        lab = self.lab
        if lab is not None:
            dead = [g.name for g in lab.guests if not _vm.is_qemu(g.pid)]
            dead += [h["name"] for h in lab.hosts() if not _netns.alive(int(h["agent_pid"]))]
            if dead:
                self.close()
        if self.lab is None:
            self.lab = self._up()
        for g in self.lab.guests:
            home = g.name.partition("g")[0]  # h1g2 -> h1
            if g.host != home:
                self.lab.migrate(g.name, home)
        return self.lab

    def _up(self) -> Any:
        from cosock.lab import LabExists, down
        from cosock.lab.qemu import QemuLab

        for _ in range(5):  # a stale lab from a killed session may hold a name
            name = unique_lab_name()
            try:
                lab = QemuLab.up(name, hosts=2, guests=2, root="image")
            except LabExists:
                continue
            except BaseException:
                down(name)
                raise
            self.boots += 1
            return lab
        raise RuntimeError("could not find a free lab name")

    def close(self) -> None:
        if self.lab is not None:
            lab, self.lab = self.lab, None
            lab.down()


@pytest.fixture(scope="module")
def shared_qemu_lab() -> Iterator[SharedQemuLab]:
    """The module's :class:`SharedQemuLab` (booted by its first test), downed at the end and
    checked for leaks as a whole."""
    reason = qemu_unavailable()
    if reason:
        pytest.skip(reason)
    shared = SharedQemuLab()
    with leaks_checked():
        try:
            yield shared
        finally:
            shared.close()


def backend_lab(request: pytest.FixtureRequest) -> Any:
    """For a fixture parametrized with :data:`BACKENDS`: a fresh 2x2 namespace lab, or the
    module's shared QEMU lab with every guest at home."""
    if request.param == "netns":
        return request.getfixturevalue("lab_factory")(2, 2)
    shared: SharedQemuLab = request.getfixturevalue("shared_qemu_lab")
    return shared.fresh()
