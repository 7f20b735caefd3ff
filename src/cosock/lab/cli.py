"""``cosock lab``: build, inspect, use and remove a lab from the shell.

Mounted by the main CLI as a sub-app; standalone: ``python -c 'from cosock.lab.cli import app;
app()' up``. Expected failures (lab exists, unknown guest, not root, bad sizes) print one line on
stderr and exit 1; only bugs show a traceback.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from . import _netns
from ._lab import Lab, down, load_any
from ._model import (
    DEFAULT_NAME,
    MAX_GUESTS,
    MAX_HOSTS,
    InvalidLabSpec,
    LabError,
    LabNotFound,
    validate_name,
)

if TYPE_CHECKING:
    from .qemu import QemuLab

app = typer.Typer(
    name="lab",
    help="Hosts and guests (network namespaces or QEMU VMs) on this machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

NameOpt = Annotated[
    str, typer.Option("--name", "-n", help="Lab name: 1-8 characters, a-z and 0-9.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _fail(err: BaseException, code: int = 1) -> NoReturn:
    """One line on stderr, no traceback: these are the user's problems, not bugs."""
    message = " ".join(str(err).split()) or type(err).__name__
    typer.echo(f"cosock lab: error: {message}", err=True)
    raise typer.Exit(code)


def _expected_errors() -> tuple[type[BaseException], ...]:
    from pyroute2.netlink.exceptions import NetlinkError

    return (LabError, OSError, NetlinkError)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _print_lab(lab: Lab) -> None:
    console = Console()
    hosts = Table(title=f"lab {lab.name}: hosts")
    for col in ("host", "netns", "agent pid", "agent socket"):
        hosts.add_column(col)
    for h in lab.hosts:
        pid = str(h.agent_pid) if h.agent_pid and _netns.alive(h.agent_pid) else "-"
        hosts.add_row(h.name, h.netns, pid, str(h.agent_socket))
    guests = Table(title=f"lab {lab.name}: guests")
    for col in ("guest", "host", "address", "netns"):
        guests.add_column(col)
    for g in lab.guests:
        guests.add_row(g.name, g.host, ", ".join(g.addresses), g.netns)
    console.print(hosts)
    console.print(guests)


def _pair_pools(lab: str, host: str) -> str:
    """The per-pair pools of a host that exist now (plugged into their two VMs)."""
    from .qemu._model import pair_pool_prefix

    prefix = pair_pool_prefix(lab, host)
    found = sorted(p.name for p in Path(prefix).parent.glob(Path(prefix).name + "*.ivshmem"))
    return ", ".join(found) or "per pair (none plugged now)"


def _print_vm_lab(lab: QemuLab) -> None:
    console = Console()
    info = lab.to_json()
    console.print(
        f"lab {lab.name}: QEMU {lab.qemu_version or '?'} guests, accelerator {lab.accel}"
        f" ({lab.accel_reason}), guest root {info['root']}, ivshmem pools {info['pool']}"
    )
    if lab.migration_warning:
        console.print(f"[yellow]warning:[/] {lab.migration_warning}")
    hosts = Table(title=f"lab {lab.name}: hosts")
    for col in ("host", "netns", "agent pid", "ivshmem pool"):
        hosts.add_column(col)
    for h in lab.hosts():
        pid = int(h.get("agent_pid") or 0)
        pool = h["pool"] if info["pool"] == "shared" else _pair_pools(lab.name, h["name"])
        hosts.add_row(h["name"], h["netns"], str(pid) if _netns.alive(pid) else "-", pool)
    guests = Table(title=f"lab {lab.name}: guests (VMs)")
    for col in ("guest", "host", "address", "qemu pid", "boot s"):
        guests.add_column(col)
    boot = lab.boot_seconds
    for g in lab.guests:
        qemu_pid = str(g.pid) if _netns.alive(g.pid) else "- (dead)"
        secs = boot.get(g.name)
        guests.add_row(g.name, g.host, g.address, qemu_pid, f"{secs:.1f}" if secs else "-")
    console.print(hosts)
    console.print(guests)


def _print_any(lab: Lab | QemuLab) -> None:
    from .qemu import QemuLab

    if isinstance(lab, QemuLab):
        _print_vm_lab(lab)
    else:
        _print_lab(lab)


def _count(raw: str, what: str) -> int:
    """Parse a count ourselves: a typer ``int`` would answer "abc" with a multi-line panel."""
    try:
        return int(raw)
    except ValueError:
        raise InvalidLabSpec(f"invalid number of {what} {raw!r}: not an integer") from None


@app.command()
def up(
    hosts: Annotated[
        str | None,
        typer.Option(
            "--hosts", metavar="N", help=f"Number of hosts (1..{MAX_HOSTS}; default 2, qemu: 1)."
        ),
    ] = None,
    guests: Annotated[
        str | None,
        typer.Option(
            "--guests", metavar="M", help=f"Guests per host (1..{MAX_GUESTS}; qemu: 1..4)."
        ),
    ] = None,
    name: NameOpt = DEFAULT_NAME,
    as_json: JsonOpt = False,
    backend: Annotated[
        str,
        typer.Option("--backend", help="netns: guests are namespaces; qemu: guests are QEMU VMs."),
    ] = "netns",
    kernel_package: Annotated[
        str | None,
        typer.Option(
            "--kernel-package",
            metavar="PKG",
            help="qemu: exact guest kernel package (default: what linux-image-amd64 names).",
        ),
    ] = None,
    boot_timeout: Annotated[
        str | None,
        typer.Option("--boot-timeout", metavar="S", help="qemu: seconds for all guests to boot."),
    ] = None,
    root: Annotated[
        str,
        typer.Option(
            "--root",
            help="qemu: 9p (the host's root, read-only) or image (ext4 image: migratable).",
        ),
    ] = "9p",
    spare_hosts: Annotated[
        str | None,
        typer.Option(
            "--spare-hosts", metavar="K", help="qemu: K more hosts without VMs (migration targets)."
        ),
    ] = None,
    pool: Annotated[
        str,
        typer.Option(
            "--pool",
            help="qemu: pair (one ivshmem pool per pair of VMs that talk, only they map it) or"
            " shared (one pool per host that all its VMs map: one tenant only).",
        ),
    ] = "pair",
) -> None:
    """Create hosts (namespace + bridge + agent) and guests: namespaces with eth0 on the bridge
    (--backend netns) or QEMU VMs with virtio-net on the bridge (--backend qemu)."""
    try:
        if backend not in ("netns", "qemu"):
            raise InvalidLabSpec(f"invalid backend {backend!r}: use netns or qemu")
        default_hosts = "1" if backend == "qemu" else "2"
        n_hosts = _count(hosts or default_hosts, "hosts")
        n_guests = _count(guests or "2", "guests per host")
        lab: Lab | QemuLab
        if backend == "qemu":
            from .qemu import BOOT_TIMEOUT, QemuLab

            lab = QemuLab.up(
                name,
                hosts=n_hosts,
                guests=n_guests,
                kernel_package=kernel_package,
                boot_timeout=_seconds(boot_timeout) if boot_timeout else BOOT_TIMEOUT,
                spare_hosts=_count(spare_hosts or "0", "spare hosts"),
                root=root,
                pool=pool,
            )
        else:
            lab = Lab.up(name, hosts=n_hosts, guests=n_guests)
    except _expected_errors() as err:
        _fail(err)
    if as_json:
        _print_json(lab.to_json())
    else:
        _print_any(lab)


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise InvalidLabSpec(f"invalid timeout {raw!r}: not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise InvalidLabSpec(f"invalid timeout {raw!r}: must be a positive number of seconds")
    return value


@app.command("ls")
def ls(name: Annotated[str | None, NameOpt] = None, as_json: JsonOpt = False) -> None:
    """List labs, or show one lab's hosts and guests with --name."""
    try:
        if name is not None:
            lab = load_any(validate_name(name))
            if as_json:
                _print_json(lab.to_json())
            else:
                _print_any(lab)
            return
        rows: list[dict[str, Any]] = []
        for lab_name in Lab.list():
            try:
                loaded = load_any(lab_name)
                rows.append({**loaded.to_json(), "status": loaded.status})
            except LabNotFound:
                rows.append({"name": lab_name, "hosts": [], "guests": [], "status": "stale"})
    except _expected_errors() as err:
        _fail(err)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        typer.echo("no labs")
        return
    table = Table(title="labs")
    for col in ("lab", "hosts", "guests", "status"):
        table.add_column(col)
    for row in rows:
        status = row["status"]
        if status == "stale":
            status = f"stale: run `cosock lab down --name {row['name']}`"
        table.add_row(row["name"], str(len(row["hosts"])), str(len(row["guests"])), status)
    Console().print(table)


@app.command(
    "exec",
    context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
)
def exec_(
    guest: Annotated[str, typer.Argument(help="Guest name, e.g. h1g2.")],
    cmd: Annotated[
        list[str] | None, typer.Argument(help="Command and arguments (after --).")
    ] = None,
    name: NameOpt = DEFAULT_NAME,
) -> None:
    """Run CMD inside GUEST with the guest's environment; exit with CMD's status."""
    # Options stop at GUEST (so CMD's own options pass through), hence "--" may arrive here.
    argv = list(cmd or [])
    if argv[:1] == ["--"]:
        argv = argv[1:]
    try:
        if not argv:
            raise LabError("no command given: cosock lab exec GUEST -- CMD [ARGS...]")
        lab = load_any(name)
        lab.guest(guest)
        if isinstance(lab, Lab):
            result = lab.run(guest, argv)
        else:  # a VM: output comes back whole, then is written out
            result = lab.run(guest, argv)
            sys.stdout.buffer.write(result.stdout or b"")
            sys.stdout.buffer.flush()
            sys.stderr.buffer.write(result.stderr or b"")
            sys.stderr.buffer.flush()
    except FileNotFoundError as err:
        _fail(err, code=127)
    except _expected_errors() as err:
        _fail(err)
    except KeyboardInterrupt:
        raise typer.Exit(128 + signal.SIGINT) from None
    rc = result.returncode
    raise typer.Exit(128 - rc if rc < 0 else rc)


def _delay(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidLabSpec(f"invalid delay {raw!r}: not a number of milliseconds") from None
    if not value >= 0 or value == float("inf"):
        raise InvalidLabSpec(f"invalid delay {raw!r}: must be a finite number >= 0")
    return value


def migrate_guest(name: str, guest: str, to: str, delay_ms: str | None, as_json: bool) -> None:
    """What ``cosock lab migrate`` and ``cosock migrate`` do: one line (or JSON) or one error."""
    try:
        delay = _delay(delay_ms)
        any_lab = load_any(validate_name(name))
        if not isinstance(any_lab, Lab):
            if delay is not None:
                raise InvalidLabSpec("--delay-ms is not supported for QEMU labs")
            before = any_lab.guest(guest).host
            if any_lab.migration_warning:
                typer.echo(f"warning: {any_lab.migration_warning}", err=True)
            figures = any_lab.migrate(guest, to)
            if as_json:
                _print_json({"lab": name, "guest": guest, "from": before, "to": to, **figures})
            else:
                typer.echo(
                    f"guest {guest} live-migrated (QEMU) from {before} to {to}:"
                    f" {figures['total_time_ms']} ms, downtime {figures['downtime_ms']} ms"
                )
            return
        lab = any_lab
        before = lab.guest(guest).host
        start = time.monotonic()
        moved = lab.migrate(guest, to, delay_ms=delay)
        seconds = time.monotonic() - start
    except _expected_errors() as err:
        _fail(err)
    if as_json:
        _print_json(
            {
                "lab": lab.name,
                "guest": moved.name,
                "from": before,
                "to": moved.host,
                "seconds": round(seconds, 4),
                "wire_delay_ms": delay,
            }
        )
        return
    extra = f", wire delay {delay:g} ms" if delay is not None else ""
    typer.echo(
        f"guest {moved.name} migrated from {before} to {moved.host}"
        f" in {seconds * 1000:.0f} ms{extra}"
    )


GuestArg = Annotated[str, typer.Argument(help="Guest name, e.g. h1g1.")]
ToOpt = Annotated[str, typer.Option("--to", metavar="HOST", help="Host to move the guest to.")]
DelayOpt = Annotated[
    str | None,
    typer.Option(
        "--delay-ms",
        metavar="X",
        help="Also delay every inter-host wire by X ms each way (needs tc netem).",
    ),
]


@app.command("migrate")
def migrate_(
    guest: GuestArg,
    to: ToOpt,
    name: NameOpt = DEFAULT_NAME,
    delay_ms: DelayOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Live-migrate GUEST to another host: processes keep running, the link moves."""
    migrate_guest(name, guest, to, delay_ms, as_json)


@app.command("bench")
def bench_(
    name: NameOpt = DEFAULT_NAME,
    stream_mib: Annotated[
        int, typer.Option("--stream-mib", min=1, max=4096, help="MiB per stream run.")
    ] = 64,
    round_trips: Annotated[
        int, typer.Option("--round-trips", min=10, max=1_000_000, help="64 B round trips.")
    ] = 2000,
    as_json: JsonOpt = False,
) -> None:
    """QEMU lab: TCP over virtio-net vs CoSocket and raw rings in ivshmem, two VMs of a host."""
    try:
        from .qemu import QemuLab, _bench

        lab = QemuLab.load(validate_name(name))
        results = _bench.run(lab, stream_bytes=stream_mib << 20, round_trips=round_trips)
    except _expected_errors() as err:
        _fail(err)
    if as_json:
        _print_json(results)
        return
    _bench.show(results, Console(), lab.name)


@app.command("restart-agent")
def restart_agent_(
    host: Annotated[str, typer.Argument(help="The host whose agent to (re)start.")],
    name: NameOpt = DEFAULT_NAME,
) -> None:
    """QEMU lab: start HOST's agent (its VM gateway) again, e.g. after it crashed; a running
    one is stopped first. The new one unplugs the pair pools its predecessor left once unused."""
    try:
        from .qemu import QemuLab

        lab = QemuLab.load(validate_name(name))
        pid = lab.restart_agent(host)
    except _expected_errors() as err:
        _fail(err)
    typer.echo(f"agent of {host} in lab {lab.name} running, pid {pid}")


@app.command("down")
def down_(name: NameOpt = DEFAULT_NAME) -> None:
    """Remove the lab: agents, processes in its guests, namespaces, state. Idempotent."""
    try:
        down(name)
    except _expected_errors() as err:
        _fail(err)
    typer.echo(f"lab {name} is down")
