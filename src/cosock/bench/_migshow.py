"""Showing a ``cosock bench --migrate`` report: rich tables and the timeline plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ._migrate import pause_summary

PATH_COLOURS = {"shm": "#2ca02c", "tcp": "#ff7f0e", "switching": "#d62728"}
LINE_COLOURS = ("#1f77b4", "#9467bd")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def migrations_table(report: dict[str, Any]) -> Table:
    table = Table(title="migrations (pause: last byte on the old path -> first on the new)")
    dirs = list(report["directions"])
    for col in ("#", "guest", "move", "migrate ms", "paths after", *(f"pause {d}" for d in dirs)):
        table.add_column(
            col, justify="left" if col in ("guest", "move", "paths after") else "right"
        )
    for e in report["migration_events"]:
        pauses = {
            s["direction"]: f"{s['from']}->{s['to']} {s['pause_ms']:,.1f} ms"
            for s in report["switches"]
            if s["migration"] == e["n"]
        }
        table.add_row(
            str(e["n"]),
            e["guest"],
            f"{e['from']} -> {e['to']}",
            f"{e['migrate_ms']:,.0f}",
            "/".join(e.get("paths_after", {}).values()),
            *(pauses.get(d, "no switch") for d in dirs),
        )
    return table


def directions_table(report: dict[str, Any]) -> Table:
    table = Table(title="every byte checked at its stream offset, per direction")
    cols = ("direction", "sent", "verified", "lost", "dup", "reord", "corrupt", "resets")
    for col in (*cols, "MB/s shm", "MB/s tcp"):
        table.add_column(col, justify="left" if col == "direction" else "right")
    for d, r in report["directions"].items():
        rates = r["MBps_by_path"]
        table.add_row(
            d,
            f"{r['sent']:,}",
            f"{r['verified']:,}",
            *(_zero(r[k]) for k in ("lost", "duplicated", "reordered", "corrupted", "resets")),
            _ms(rates.get("shm")),
            _ms(rates.get("tcp")),
        )
    return table


def _zero(n: int) -> str:
    return "[green]0[/]" if n == 0 else f"[bold red]{n:,}[/]"


def phases_table(report: dict[str, Any]) -> Table:
    table = Table(title="phases between migrations")
    dirs = list(report["directions"])
    for col in ("phase", "mover on", "seconds", *(f"{d} MB/s (paths)" for d in dirs), "wire MB"):
        table.add_column(col, justify="left" if col == "mover on" else "right")
    for p in report["phases"]:
        cells = [f"{_ms(p[d]['MBps'])} ({', '.join(p[d]['paths'])})" for d in dirs]
        table.add_row(
            str(p["phase"]),
            p["mover_on"],
            f"{p['t_end'] - p['t_start']:.1f}",
            *cells,
            _ms(p.get("wire_MB")),
        )
    return table


def show(report: dict[str, Any], console: Console) -> None:
    console.print(migrations_table(report))
    console.print(phases_table(report))
    console.print(directions_table(report))
    for kind, s in pause_summary(report).items():
        console.print(
            f"pause {kind}: {s['n']:.0f} switches, p50 {s['p50']:,.1f} ms, max {s['max']:,.1f} ms"
        )
    console.print(f"re-upgrade: {report['reupgrade']}")
    verdict = "[bold green]OK[/]" if report["ok"] else "[bold red]FAILED[/]"
    console.print(
        f"{verdict}: {report['migrations']} migrations, {report['bytes_verified']:,} bytes"
        f" verified, lost {report['lost']}, duplicated {report['duplicated']}, reordered"
        f" {report['reordered']}, corrupted {report['corrupted']}, resets {report['resets']};"
        f" pause p50 {_ms(report['pause_ms_p50'])} ms, max {_ms(report['pause_ms_max'])} ms"
    )


def write_json(report: dict[str, Any], path: Path) -> None:
    """The report, indented, with one timeline sample per line (thousands of them)."""
    head = {k: v for k, v in report.items() if k != "timeline"}
    text = json.dumps(head, indent=2)
    samples = ",\n    ".join(json.dumps(s) for s in report.get("timeline", []))
    text = text[: text.rindex("}")].rstrip() + f',\n  "timeline": [\n    {samples}\n  ]\n}}\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def rates(samples: list[dict[str, Any]], window: float) -> list[tuple[float, float, str]]:
    """(time, MB/s over the last ``window`` seconds, path) for each sample of one direction."""
    out = []
    j = 0
    for i, s in enumerate(samples):
        while samples[j]["t"] < s["t"] - window:
            j += 1
        if i > j and s["t"] > samples[j]["t"]:
            mbps = (s["bytes"] - samples[j]["bytes"]) / (s["t"] - samples[j]["t"]) / 1e6
            out.append((s["t"], mbps, s["path"]))
    return out


def plot(report: dict[str, Any], path: Path, window: float = 0.1) -> None:
    """Throughput against time per direction, migrations marked, path lanes below."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'cosock[bench]'") from exc

    fig, (ax, lanes) = plt.subplots(
        2, 1, figsize=(12, 5.5), sharex=True, gridspec_kw={"height_ratios": [4, 1]}
    )
    dirs = list(report["directions"])
    for colour, d in zip(LINE_COLOURS, dirs, strict=False):
        samples = [s for s in report["timeline"] if s["direction"] == d and s["t"] >= 0]
        series = rates(samples, window)
        ax.plot([t for t, _, _ in series], [m for _, m, _ in series], label=d, color=colour, lw=1)
        row = dirs.index(d)
        for a, b, p in _runs(samples):
            lanes.broken_barh(
                [(a, b - a)], (row + 0.1, 0.8), color=PATH_COLOURS.get(p, "#7f7f7f"), label=p
            )
    by_path = [r for r in report["MBps_by_path"].values() if r > 0]
    if by_path and max(by_path) / min(by_path) > 30:  # linear while both paths stay readable
        ax.set_yscale("log")
    ax.set_ylim(bottom=0 if ax.get_yscale() == "linear" else None)
    for e in report["migration_events"]:
        for axis in (ax, lanes):
            axis.axvspan(e["t_start"], e["t_end"], color="#7f7f7f", alpha=0.25, lw=0)
        ax.annotate(
            f"{e['guest']} -> {e['to']}",
            (e["t_start"], 1.0),
            xycoords=("data", "axes fraction"),
            fontsize=8,
            rotation=90,
            va="top",
            ha="right",
        )
    for s in report["switches"]:
        ax.axvline(s["at_s"], color=PATH_COLOURS.get(s["to"], "k"), ls=":", lw=1)
    ax.set_ylabel(f"MB/s received ({1000 * window:.0f} ms window)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    p50, pmax = report["pause_ms_p50"], report["pause_ms_max"]
    ax.set_title(
        f"cosock bench --migrate: {report['migrations']} migrations,"
        f" {report['bytes_verified'] / 1e6:,.0f} MB verified, lost {report['lost']},"
        f" dup {report['duplicated']}, reordered {report['reordered']},"
        f" resets {report['resets']}; pause p50 {_ms(p50)} ms, max {_ms(pmax)} ms",
        fontsize=9,
    )
    lanes.set_yticks([i + 0.5 for i in range(len(dirs))], dirs, fontsize=8)
    lanes.set_xlabel("seconds")
    handles, labels = lanes.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    lanes.legend(unique.values(), unique.keys(), loc="upper right", fontsize=7, ncol=3)
    lanes.set_ylim(0, len(dirs) + 0.6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _runs(samples: list[dict[str, Any]]) -> list[tuple[float, float, str]]:
    """Consecutive samples on one path as (start, end, path) spans."""
    out: list[tuple[float, float, str]] = []
    for s in samples:
        if out and out[-1][2] == s["path"]:
            out[-1] = (out[-1][0], s["t"], s["path"])
        else:
            if out:
                out[-1] = (out[-1][0], s["t"], out[-1][2])
            out.append((s["t"], s["t"], s["path"]))
    return out
