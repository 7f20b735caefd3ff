"""Showing a bench report: rich tables (with a ratio column against ``tcp``), the DESIGN
targets met or missed, and the JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

#: DESIGN.md targets: (ratio key, comparison, bound, what it means).
TARGETS = (
    ("stream_64KiB", ">=", 9.0, "stream 64 KiB throughput vs tcp"),
    ("stream_1MiB", ">=", 10.0, "stream 1 MiB throughput vs tcp"),
    ("rr_64B_p50", ">=", 10.0, "RR 64 B p50 latency, tcp / cosock"),
    ("rr_64B_p99", ">=", 5.0, "RR 64 B p99 latency, tcp / cosock"),
    ("crr_p50", "<=", 1.5, "CRR p50 time, cosock / tcp"),
)
#: Idle CPU (client + server, % of one core) below which a connection counts as idle.
IDLE_CPU_PERCENT = 0.5


def size_label(size: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _advantage(row: dict[str, Any], tcp: dict[str, Any] | None) -> float | None:
    """How many times better than tcp (> 1 = better): throughput, or p50 latency."""
    if tcp is None or row["transport"] == "tcp":
        return None
    if row["test"] == "stream":
        return row["MBps"] / tcp["MBps"] if tcp["MBps"] else None
    return tcp["p50_us"] / row["p50_us"] if row["p50_us"] else None


def results_table(report: dict[str, Any]) -> Table:
    m = report["machine"]
    pinned = ", pinned" if m.get("pinned") else ""
    table = Table(
        title=f"cosock bench ({m['mode']}, {m['cpus']} CPUs giving"
        f" {m.get('parallel_cpu_capacity', '?')} CPU of parallel work,"
        f" median of {m['runs']} runs x {m['duration_s']:g} s{pinned})",
        caption="vs tcp: throughput (stream) or p50 latency (rr, crr) advantage; >1 = faster",
    )
    for col in ("test", "size", "transport", "MB/s", "ops/s", "p50 µs", "p99 µs", "p99.9 µs"):
        table.add_column(col, justify="left" if col in ("test", "transport") else "right")
    table.add_column("spread", justify="right")
    table.add_column("vs tcp", justify="right", style="bold")
    tcp_rows = {(r["test"], r["size"]): r for r in report["results"] if r["transport"] == "tcp"}
    last = None
    for r in report["results"]:
        key = (r["test"], r["size"])
        if last is not None and key != last:
            table.add_section()
        last = key
        adv = _advantage(r, tcp_rows.get(key))
        table.add_row(
            r["test"],
            size_label(r["size"]),
            r["transport"],
            _num(r["MBps"]),
            _num(r["ops_per_s"]),
            _num(r["p50_us"], 1),
            _num(r["p99_us"], 1),
            _num(r["p999_us"], 1),
            f"{100 * r['spread']:.0f}%",
            "" if adv is None else f"{adv:.2f}x",
        )
    return table


def targets_table(report: dict[str, Any]) -> Table:
    table = Table(title="DESIGN targets (cosock between co-resident guests)")
    for col in ("target", "measured", "goal", "met"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for key, cmp, bound, what in TARGETS:
        value = report["ratios"].get(key)
        ok = None if value is None else (value >= bound if cmp == ">=" else value <= bound)
        table.add_row(
            what,
            _num(value, 2) + ("x" if value is not None else ""),
            f"{cmp} {bound:g}x",
            _mark(ok),
        )
    uds = beats_uds(report)
    if uds is not None:
        table.add_row(
            "cosock above uds at every stream size >= 4 KiB",
            ", ".join(f"{size_label(s)}: {x:.2f}x" for s, x in uds.items()),
            "> 1x each",
            _mark(all(x > 1 for x in uds.values())),
        )
    for name, x in app_advantage(report).items():
        table.add_row(f"app: {name} requests/s vs tcp", f"{x:.2f}x", "> 1x", _mark(x > 1))
    for r in report.get("idle", []):
        if r["transport"] == "cosock":
            table.add_row(
                "idle connection CPU (client + server)",
                f"{r['cpu_percent']:.2f}%",
                f"< {IDLE_CPU_PERCENT}%",
                _mark(r["cpu_percent"] < IDLE_CPU_PERCENT),
            )
    return table


def beats_uds(report: dict[str, Any]) -> dict[int, float] | None:
    """cosock / uds stream throughput at each size >= 4 KiB (None without both)."""
    rows = {(r["transport"], r["size"]): r for r in report["results"] if r["test"] == "stream"}
    out = {
        size: rows[("cosock", size)]["MBps"] / rows[("uds", size)]["MBps"]
        for (t, size) in sorted(rows)
        if t == "cosock" and size >= 4096 and ("uds", size) in rows
    }
    return out or None


def app_advantage(report: dict[str, Any]) -> dict[str, float]:
    """cosock / tcp requests per second of each HTTP app row (empty without --app)."""
    rows = report.get("app", {}).get("results", [])
    by = {(r["app"], r["transport"]): r["ops_per_s"] for r in rows}
    return {
        app: by[(app, "cosock")] / by[(app, "tcp")]
        for (app, t) in by
        if t == "tcp" and app.startswith("http") and by.get((app, "cosock")) and by[(app, t)]
    }


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("[green]yes[/]" if ok else "[red]NO[/]")


def cpu_table(report: dict[str, Any]) -> Table:
    table = Table(
        title="CPU cost, client + server: s per GB moved (stream), µs per operation (rr, crr)"
    )
    transports = sorted({r["transport"] for r in report["cpu"]}, key=_order)
    table.add_column("test")
    table.add_column("size", justify="right")
    for t in transports:
        table.add_column(t, justify="right")
    by = {(r["transport"], r["test"], r["size"]): r["cpu"] for r in report["cpu"]}
    keys = sorted(
        {(r["test"], r["size"]) for r in report["cpu"]}, key=lambda k: (k[0] != "stream", k)
    )
    for test, size in keys:
        digits = 2 if test == "stream" else 0
        table.add_row(
            test, size_label(size), *(_num(by.get((t, test, size)), digits) for t in transports)
        )
    return table


def idle_table(report: dict[str, Any]) -> Table:
    table = Table(title="one idle open connection, both ends blocked in recv")
    for col in ("transport", "seconds", "client CPU ms", "server CPU ms", "CPU %"):
        table.add_column(col, justify="left" if col == "transport" else "right")
    for r in sorted(report["idle"], key=lambda r: _order(r["transport"])):
        table.add_row(
            r["transport"],
            f"{r['seconds']:.1f}",
            f"{r['client_cpu_ms']:.1f}",
            f"{r['server_cpu_ms']:.1f}",
            f"{r['cpu_percent']:.2f}",
        )
    return table


def app_table(report: dict[str, Any]) -> Table:
    app = report["app"]
    table = Table(
        title="unmodified applications between two co-resident guests", caption=app.get("note", "")
    )
    for col in (
        "app",
        "transport",
        "path (client/server)",
        "req/s",
        "MB/s",
        "p50 µs",
        "p99 µs",
        "spread",
        "vs tcp",
    ):
        table.add_column(col, justify="left" if col in ("app", "transport") else "right")
    base = {r["app"]: r for r in app["results"] if r["transport"] == "tcp"}
    for r in app["results"]:
        b = base.get(r["app"])
        adv = None
        if b and r["transport"] != "tcp" and r["ops_per_s"] and b["ops_per_s"]:
            adv = r["ops_per_s"] / b["ops_per_s"]
        table.add_row(
            r["app"],
            r["transport"],
            f"{r['client_path']}/{r['server_path']}",
            _num(r["ops_per_s"]),
            _num(r.get("MBps"), 1),
            _num(r["p50_us"], 1),
            _num(r["p99_us"], 1),
            f"{100 * r['spread']:.0f}%",
            f"{adv:.2f}x" if adv else "",
        )
    return table


def _order(transport: str) -> int:
    from ._runner import TRANSPORTS

    return TRANSPORTS.index(transport) if transport in TRANSPORTS else 99


def show(report: dict[str, Any], console: Console) -> None:
    if report["results"]:
        console.print(results_table(report))
    if report["cpu"]:
        console.print(cpu_table(report))
    if report["idle"]:
        console.print(idle_table(report))
    if report.get("app"):
        console.print(app_table(report))
    console.print(targets_table(report))


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
