"""``cosock bench``: the command line of the bench (options, progress bar, output files).

Mounted lazily by ``cosock.cli``: this module is imported only when ``bench`` runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20}
_SIZE_RE = re.compile(r"\s*(\d+)\s*([A-Za-z]*)\s*")


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"64,1K,64KiB,1M"`` -> ``(64, 1024, 65536, 1048576)``."""
    out = []
    for part in text.split(","):
        m = _SIZE_RE.fullmatch(part)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise typer.BadParameter(f"bad size {part.strip()!r} (use e.g. 64, 4K, 1MiB)")
        out.append(int(m.group(1)) * _UNITS[unit])
    return tuple(out)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip() and x.strip() != "none")


@app.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="a first look in under a minute")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="write throughput/latency plot (PNG)")
    ] = None,
    sizes: Annotated[
        str | None, typer.Option(help="stream message sizes, e.g. 64,4K,64K,1M")
    ] = None,
    rr_sizes: Annotated[str | None, typer.Option(help="RR message sizes, e.g. 64,1K")] = None,
    duration: Annotated[
        float | None, typer.Option(help="seconds per measurement", min=0.01)
    ] = None,
    runs: Annotated[int | None, typer.Option(help="runs per figure (median)", min=1)] = None,
    transports: Annotated[
        str, typer.Option(help="comma list of tcp,uds,cosock,cosock-remote")
    ] = "tcp,uds,cosock,cosock-remote",
    tests: Annotated[
        str, typer.Option(help="comma list of stream,rr,crr,idle ('none' with --app)")
    ] = "stream,rr,crr,idle",
    idle: Annotated[
        float | None, typer.Option("--idle", help="seconds of idle-connection CPU", min=0.1)
    ] = None,
    app_bench: Annotated[
        bool, typer.Option("--app", help="also unmodified HTTP (uvicorn+httpx) and asyncio echo")
    ] = False,
    mode: Annotated[str, typer.Option(help="auto (lab if root), lab, or loopback")] = "auto",
    lab_name: Annotated[
        str | None,
        typer.Option(help="name of the lab the bench builds [default: bench, benchmig]"),
    ] = None,
    pin: Annotated[
        bool, typer.Option("--pin", help="servers on one CPU, clients on another (netperf -T)")
    ] = False,
    migrate: Annotated[
        bool,
        typer.Option(
            "--migrate",
            help="instead: stream both ways while a guest migrates away and back (root)",
        ),
    ] = False,
    migrations: Annotated[
        int | None, typer.Option(help="--migrate: how many migrations [10; quick: 4]", min=1)
    ] = None,
    seconds: Annotated[
        float | None,
        typer.Option(help="--migrate: seconds of streaming between migrations [3; quick: 2]"),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="netns: namespace guests; qemu: two QEMU VMs, tcp over virtio-net vs cosock's"
            " rings in ivshmem (root; see docs/vm-backend.md)",
        ),
    ] = "netns",
) -> None:
    """Every transport side by side in one run: tcp, uds, cosock, cosock-remote.

    With --migrate: a live stream both ways between two co-resident guests while one of
    them migrates to another host and back; every byte checked, pauses measured.
    """
    from rich.console import Console

    if backend not in ("netns", "qemu"):
        raise typer.BadParameter(f"--backend must be netns or qemu, not {backend!r}")
    if backend == "qemu":
        from ..lab import LabError
        from ..lab.qemu import _bench as vm_bench

        try:
            vm_bench.command(quick, json_path, lab_name)
        except (LabError, OSError) as exc:
            Console(stderr=True).print(f"[bold red]cosock bench FAILED:[/] {exc}")
            raise typer.Exit(1) from None
        return
    if migrate:
        _bench_migrate(quick, json_path, plot_path, migrations, seconds, lab_name)
        return
    lab_name = lab_name or "bench"

    from ._report import show, write_json
    from ._runner import BenchError, BenchOptions, run_bench

    overrides: dict[str, Any] = {
        "transports": _names(transports),
        "tests": _names(tests),
        "app": app_bench,
        "mode": mode,
        "lab_name": lab_name,
        "pin": pin,
    }
    for key, value in (
        ("stream_sizes", sizes and parse_sizes(sizes)),
        ("rr_sizes", rr_sizes and parse_sizes(rr_sizes)),
        ("duration", duration),
        ("runs", runs),
        ("idle_seconds", idle),
    ):
        if value is not None:
            overrides[key] = value
    options = BenchOptions.quick(**overrides) if quick else BenchOptions(**overrides)
    try:
        options.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None

    console = Console()
    if not console.is_terminal:
        console = Console(width=130)  # files and pipes: wide enough for every column
    err = Console(stderr=True)
    try:
        with _ProgressBar(err) as progress:
            report = run_bench(options, progress)
    except BenchError as exc:
        err.print(f"[bold red]cosock bench FAILED:[/] {exc}")
        raise typer.Exit(1) from None
    show(report, console)
    if json_path is not None:
        write_json(report, json_path)
        err.print(f"report written to {json_path}")
    if plot_path is not None:
        from ._plot import plot

        plot(report, plot_path)
        err.print(f"plot written to {plot_path}")


def _bench_migrate(
    quick: bool,
    json_path: Path | None,
    plot_path: Path | None,
    migrations: int | None,
    seconds: float | None,
    lab_name: str | None,
) -> None:
    from rich.console import Console

    from ._migrate import MigrateOptions, run_migrate
    from ._migshow import plot, show, write_json
    from ._runner import BenchError

    overrides: dict[str, Any] = {}
    for key, value in (("migrations", migrations), ("seconds", seconds), ("lab_name", lab_name)):
        if value is not None:
            overrides[key] = value
    options = MigrateOptions.quick(**overrides) if quick else MigrateOptions(**overrides)
    try:
        options.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    err = Console(stderr=True)
    try:
        with _ProgressBar(err) as progress:
            report = run_migrate(options, progress)
    except BenchError as exc:
        err.print(f"[bold red]cosock bench --migrate FAILED:[/] {exc}")
        raise typer.Exit(1) from None
    show(report, console)
    if json_path is not None:
        write_json(report, json_path)
        err.print(f"report written to {json_path}")
    if plot_path is not None:
        plot(report, plot_path)
        err.print(f"plot written to {plot_path}")
    if not report["ok"]:
        raise typer.Exit(1)


class _ProgressBar:
    """A rich progress bar (on stderr) fed by the runner's progress callback."""

    def __init__(self, console: Any) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description:<44}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._task = self._bar.add_task("starting", total=None)

    def __enter__(self) -> _ProgressBar:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.__exit__(*exc)

    def __call__(self, label: str, done: int, total: int) -> None:
        self._bar.update(self._task, description=label, completed=done, total=total)
