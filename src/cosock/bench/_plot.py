"""The bench's picture: throughput against message size (log axes, every transport) and
the RR latency distribution.  matplotlib is imported only here, and only when asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {"tcp": "#1f77b4", "uds": "#7f7f7f", "cosock": "#d62728", "cosock-remote": "#2ca02c"}


def plot(report: dict[str, Any], path: Path) -> None:
    """Write a PNG.  Raises ImportError (with the install hint) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'cosock[bench]'") from exc

    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.8))
    stream = [r for r in report["results"] if r["test"] == "stream"]
    ranges = report.get("stream_MBps_range", {})
    for t in _transports(stream):
        rows = sorted((r for r in stream if r["transport"] == t), key=lambda r: r["size"])
        sizes = [r["size"] for r in rows]
        mbps = [r["MBps"] for r in rows]
        spans = [ranges.get(f"{t}/{s}") for s in sizes]
        err = None
        if spans and all(spans):  # bars from the slowest to the fastest run
            err = [
                [m - lo for m, (lo, _) in zip(mbps, spans, strict=True)],
                [hi - m for m, (_, hi) in zip(mbps, spans, strict=True)],
            ]
        ax_tp.errorbar(sizes, mbps, yerr=err, marker="o", capsize=3, label=t, color=COLOURS.get(t))
    ax_tp.set_xscale("log", base=2)
    ax_tp.set_yscale("log")
    ax_tp.set_xlabel("message size (bytes)")
    ax_tp.set_ylabel("MB/s (median)")
    ax_tp.set_title("stream throughput")
    ax_tp.grid(True, which="both", alpha=0.3)
    if stream:
        ax_tp.legend()

    cdfs = report.get("rr_latency_cdf_us", {})
    size = _smallest_rr(cdfs)
    for key, values in cdfs.items():
        t, _, s = key.partition("/")
        if int(s) != size or not values:
            continue
        n = len(values)
        ax_lat.plot(values, [i / (n - 1) for i in range(n)], label=t, color=COLOURS.get(t))
    ax_lat.set_xscale("log")
    ax_lat.set_xlabel("round-trip latency (µs)")
    ax_lat.set_ylabel("fraction of requests")
    ax_lat.set_title(f"RR {size} B latency distribution (median run)")
    ax_lat.grid(True, which="both", alpha=0.3)
    if cdfs:
        ax_lat.legend()

    m = report["machine"]
    fig.suptitle(f"cosock bench, {m['mode']}, {m['cpus']} CPUs, {m['cpu']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _transports(rows: list[dict[str, Any]]) -> list[str]:
    seen = [r["transport"] for r in rows]
    return sorted(set(seen), key=lambda t: list(COLOURS).index(t) if t in COLOURS else 99)


def _smallest_rr(cdfs: dict[str, list[float]]) -> int:
    sizes = [int(k.partition("/")[2]) for k in cdfs]
    return min(sizes) if sizes else 64
