"""The ``cosock`` command.  Sub-commands import their modules lazily, so ``cosock run``
starts fast and ``cosock --help`` works even where a layer cannot load."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Transparent shared-memory TCP between co-resident guests.",
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"cosock: {message}", err=True)
    raise typer.Exit(code)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def run(ctx: typer.Context) -> None:
    """Run a Python program with cosock enabled (children included): cosock run -- CMD..."""
    from ._run import exec_with_cosock

    argv = list(ctx.args)
    if not argv:
        _fail("no command given: use cosock run -- CMD [ARGS...]")
    try:
        exec_with_cosock(argv)
    except FileNotFoundError:
        _fail(f"command not found: {argv[0]}", 127)
    except (OSError, ValueError) as exc:
        _fail(str(exc))


@app.command()
def agent(
    socket_path: Annotated[Path, typer.Option("--socket", help="Unix socket path")],
    host: Annotated[str, typer.Option(help="host name shown in tables")] = "local",
    auto: Annotated[bool, typer.Option(help="auto-register unknown netns as guests")] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            help="also serve GET /metrics (Prometheus text) on 127.0.0.1:PORT (0: any)",
        ),
    ] = None,
) -> None:
    """Run a host agent in the foreground."""
    from ._errors import CosockError
    from .agent.server import serve

    try:
        serve(socket_path, host, auto_guests=auto, metrics_port=metrics_port)
    except (CosockError, OSError) as exc:
        _fail(str(exc), 1)


@app.command()
def status(
    socket_path: Annotated[
        Path | None, typer.Option("--socket", help="agent socket (default: COSOCK_AGENT)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    prometheus: Annotated[
        bool, typer.Option("--prometheus", help="print the counters in Prometheus text format")
    ] = False,
    watch: Annotated[bool, typer.Option("--watch", help="refresh until Ctrl-C")] = False,
    count: Annotated[
        int | None, typer.Option("--count", min=1, help="refresh N times, then exit")
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, max=3600, help="seconds between refreshes")
    ] = 1.0,
) -> None:
    """Connections of this host's processes (path, bytes, switches, fallback reason),
    the agent's guests and listeners."""
    from . import _config

    path = socket_path or _config.agent_path()
    if prometheus and (as_json or watch or count is not None):
        _fail("--prometheus prints once: no --json, --watch or --count with it")
    try:
        if prometheus:
            from .agent.client import metrics

            typer.echo(metrics(path), nl=False)
            return
        from .status_view import gather

        if watch or count is not None:
            _watch(path, as_json, count, interval)
            return
        state = gather(path)
    except Exception as exc:
        _fail(f"agent at {path} unreachable: {exc}")
        return
    if as_json:
        typer.echo(json.dumps(state, indent=2))
        return
    from rich.console import Console

    from .status_view import render

    Console().print(render(state, path))


def _watch(path: Path, as_json: bool, count: int | None, interval: float) -> None:
    """Refresh ``count`` times (or until Ctrl-C): a live table, or one JSON line each."""
    import time

    from .status_view import gather, render

    shown = 0
    if as_json:
        while count is None or shown < count:
            if shown:
                time.sleep(interval)
            typer.echo(json.dumps(gather(path), separators=(",", ":")))
            shown += 1
        return
    from rich.live import Live

    with Live(render(gather(path), path), auto_refresh=False) as live:
        shown = 1
        while count is None or shown < count:
            time.sleep(interval)
            live.update(render(gather(path), path), refresh=True)
            shown += 1


@app.command()
def demo(
    size: Annotated[int, typer.Option("--bytes", help="payload each way", min=1)] = 256 << 20,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    lab_name: Annotated[str, typer.Option("--lab-name", help="lab to build (root)")] = "demo",
    backend: Annotated[
        str,
        typer.Option(
            help="netns: namespace guests; qemu: QEMU VMs, ivshmem vs virtio-net and a live"
            " migration (root)"
        ),
    ] = "netns",
) -> None:
    """Real guests, real traffic: shows the path each connection took and the speed-up."""
    from .demo import run_demo

    if backend not in ("netns", "qemu"):
        _fail(f"--backend must be netns or qemu, not {backend!r}", 1)
    try:
        if backend == "qemu":
            from .lab.qemu import _demo

            result = _demo.run(lab_name="demovm" if lab_name == "demo" else lab_name, quiet=as_json)
        else:
            result = run_demo(size, quiet=as_json, lab_name=lab_name)
    except KeyboardInterrupt:
        _fail("interrupted (cleaned up)", 130)
        return
    except Exception as exc:
        _fail(f"demo failed: {exc}", 1)
        return
    if as_json:
        typer.echo(json.dumps(result, indent=2))


@app.command(
    add_help_option=False,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def bench(ctx: typer.Context) -> None:
    """Every transport side by side: tcp, uds, cosock, cosock-remote (see bench --help)."""
    from .bench.cli import app as bench_app

    bench_app(args=list(ctx.args), prog_name="cosock bench", standalone_mode=False)


@app.command()
def migrate(
    guest: Annotated[str, typer.Argument(help="Guest name, e.g. h1g1.")],
    to: Annotated[str, typer.Option("--to", metavar="HOST", help="Host to move it to.")],
    lab: Annotated[str, typer.Option("--lab", help="Lab name (default: lab).")] = "lab",
    delay_ms: Annotated[
        str | None,
        typer.Option("--delay-ms", metavar="X", help="Delay the inter-host wires by X ms."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Live-migrate a lab guest to another host (same as `cosock lab migrate`)."""
    try:
        from .lab.cli import migrate_guest
    except ImportError as exc:  # pragma: no cover - lab needs pyroute2
        _fail(f"lab unavailable ({exc})", 1)
        return
    migrate_guest(lab, guest, to, delay_ms, as_json)


@app.command()
def torture(
    seconds: Annotated[float, typer.Option(min=1, max=3600, help="how long to run")] = 30,
    json_path: Annotated[Path | None, typer.Option("--json", help="write figures here")] = None,
    connections: Annotated[
        int, typer.Option(min=1, max=256, help="client threads making connections at once")
    ] = 8,
    seed: Annotated[int | None, typer.Option(help="random seed (printed if not given)")] = None,
    mode: Annotated[str, typer.Option(help="auto (lab if root), loopback or lab")] = "auto",
) -> None:
    """Bounded soak: connects, transfers with sha256, half-closes, peer kills, agent
    restarts; fails (exit 1) on lost or duplicated bytes, hangs or leaks."""
    from .torture import torture as run_torture

    if mode not in ("auto", "loopback", "lab"):
        _fail(f"--mode must be auto, loopback or lab, not {mode!r}")
    figures = run_torture(
        seconds, connections, seed, mode, log=lambda m: typer.echo(f"torture: {m}", err=True)
    )
    text = json.dumps(figures, indent=2)
    if json_path is not None:
        json_path.write_text(text + "\n")
    typer.echo(text)
    bad = figures["lost_bytes"] or figures["duplicated_bytes"] or figures["hangs"]
    if bad or any(figures["leaks"].values()):
        raise typer.Exit(1)


def _mount_lab() -> None:
    try:
        from .lab.cli import app as lab_app
    except ImportError as exc:  # pragma: no cover - lab needs pyroute2
        sys.stderr.write(f"cosock: lab unavailable ({exc})\n")
        return
    app.add_typer(lab_app, name="lab", help="Hosts and guests made of network namespaces.")


_mount_lab()


def main() -> None:
    """Entry point: usage errors become one line on stderr (exit 2), not a box."""
    from typer.core import _click  # type: ignore[attr-defined]  # vendored click

    exceptions = _click.exceptions
    try:
        result = app(standalone_mode=False)
    except exceptions.NoArgsIsHelpError as exc:
        if exc.ctx is not None:
            typer.echo(exc.ctx.get_help())
        sys.exit(0)
    except exceptions.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "cosock"
        typer.echo(f"cosock: error: {exc.format_message()} (see '{where} --help')", err=True)
        sys.exit(2)
    except exceptions.ClickException as exc:
        typer.echo(f"cosock: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("cosock: interrupted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
