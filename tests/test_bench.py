"""``cosock bench``: the worker pairs, the path checks, the JSON schema and a tiny lab run.

Real processes and real connections, each measured for a fraction of a second; the
tests check what the bench reports and that it refuses to lie, never how fast it is.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import leaks_checked
from cosock.bench import _stats
from cosock.bench._runner import (
    BenchError,
    BenchOptions,
    Pairs,
    PathMismatch,
    check_path,
    measure,
    measure_idle,
    run_bench,
    start_pairs,
)
from cosock.bench._world import World, loopback_world
from cosock.bench.cli import parse_sizes

ROW_KEYS = {
    "transport",
    "test",
    "size",
    "MBps",
    "ops_per_s",
    "p50_us",
    "p99_us",
    "p999_us",
    "runs",
    "spread",
}
RATIO_KEYS = {"stream_64KiB", "stream_1MiB", "rr_64B_p50", "rr_64B_p99", "crr_p50"}
ALL = ("tcp", "uds", "cosock", "cosock-remote")


@pytest.fixture(scope="module")
def loopback() -> Iterator[tuple[World, Pairs]]:
    """Worker pairs of every transport on loopback, with a private agent (no root).  Owned
    across the module's tests, so its own leak check runs when it is torn down."""
    with leaks_checked(), loopback_world() as world:
        yield world, start_pairs(world, ALL)


#### Pure parts


def test_percentiles_and_spread():
    values = sorted(float(x) for x in range(1, 1001))
    assert _stats.percentile(values, 50) == 500
    assert _stats.percentile(values, 99) == 990
    assert _stats.percentile(values, 99.9) == 999
    assert _stats.percentile([7.0], 99.9) == 7.0
    assert _stats.spread([90.0, 100.0, 110.0]) == pytest.approx(0.2)
    cdf = _stats.cdf(values, 5)
    assert cdf[0] == 1 and cdf[-1] == 1000 and cdf == sorted(cdf)
    with pytest.raises(ValueError):
        _stats.percentile([], 50)


def test_parse_sizes():
    assert parse_sizes("64, 1K,4KiB,1M") == (64, 1024, 4096, 1 << 20)
    with pytest.raises(Exception, match="bad size"):
        parse_sizes("3X")


def test_options_are_validated():
    with pytest.raises(ValueError, match="unknown transports"):
        BenchOptions(transports=("carrier-pigeon",)).validate()
    with pytest.raises(ValueError, match="unknown tests"):
        BenchOptions(tests=("nap",)).validate()


#### Worker pairs on loopback


@pytest.mark.parametrize(
    "transport,path",
    [("tcp", "tcp"), ("uds", "uds"), ("cosock", "shm"), ("cosock-remote", "tcp")],
)
def test_stream_and_rr_take_the_promised_path(loopback, transport, path):
    _, pairs = loopback
    stream = measure(pairs, transport, "stream", 65536, 0.1)
    assert stream["client"]["path"] == stream["server"]["path"] == path
    assert stream["bytes"] == 65536 * stream["messages"] > 0
    assert stream["MBps"] > 0 and stream["cpu_client_s"] >= 0 and stream["cpu_server_s"] >= 0
    rr = measure(pairs, transport, "rr", 64, 0.1)
    assert rr["client"]["path"] == rr["server"]["path"] == path
    assert rr["ops"] > 0 and 0 < rr["p50_us"] <= rr["p99_us"] <= rr["p999_us"]
    uses_cosock = "counters" in rr["client"]
    assert uses_cosock == transport.startswith("cosock")
    if transport == "cosock-remote":  # no other host on loopback: acceleration is off
        assert rr["client"]["reason"] == "loopback-disabled"


def test_crr_counts_every_connection_on_its_path(loopback):
    _, pairs = loopback
    for transport, path in (("cosock", "shm"), ("tcp", "tcp")):
        crr = measure(pairs, transport, "crr", 64, 0.1)
        assert crr["paths"] == {path: crr["ops"]} and crr["ops"] > 0
        assert crr["cpu_client_s"] > 0 and crr["cpu_server_s"] > 0


def test_idle_connection_reports_both_ends(loopback):
    _, pairs = loopback
    idle = measure_idle(pairs, ("tcp", "cosock"), 0.2)
    assert idle["cosock"]["server"]["path"] == "shm"
    for t in ("tcp", "cosock"):
        assert idle[t]["seconds"] >= 0.2
        assert idle[t]["cpu_client_s"] >= 0 and idle[t]["cpu_server_s"] >= 0


def test_check_path_refuses_a_fallback():
    result: dict[str, Any] = {
        "test": "rr",
        "client": {"path": "tcp", "reason": "agent-unreachable", "counters": {}},
        "server": {"path": "tcp", "reason": "no-offer", "counters": {}},
    }
    with pytest.raises(PathMismatch, match=r"instead of 'shm'.*agent-unreachable"):
        check_path("cosock", result)
    check_path("cosock-remote", result)  # the same connection is right for another host
    with pytest.raises(PathMismatch, match="instead of 'tcp'"):
        check_path("cosock-remote", {"test": "crr", "paths": {"shm": 3}, "reasons": {}})


def test_bench_fails_loudly_when_cosock_falls_back():
    options = BenchOptions.quick(
        mode="loopback",
        transports=("tcp", "cosock"),
        tests=("rr",),
        runs=1,
        duration=0.05,
        warmup=0.0,
        client_env={"cosock": {"COSOCK_LOOPBACK": "0"}},
    )
    with pytest.raises(PathMismatch, match=r"cosock: connections took path.*loopback-disabled"):
        run_bench(options)


def test_worker_failure_is_a_bench_error(loopback):
    _, pairs = loopback
    with pytest.raises(BenchError, match="unknown test"):
        measure(pairs, "tcp", "nap", 64, 0.01)


#### The command


def test_cli_json_and_plot_schema(tmp_path: Path):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    argv = [sys.executable, "-m", "cosock", "bench", "--mode", "loopback", "--quick"]
    argv += ["--sizes", "4K,64K,1M", "--rr-sizes", "64", "--duration", "0.05", "--runs", "1"]
    argv += ["--idle", "0.2", "--json", str(out)]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(png)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "vs tcp" in done.stdout and "DESIGN targets" in done.stdout
    report = json.loads(out.read_text())
    assert {"machine", "results", "ratios"} <= set(report)
    assert report["machine"]["mode"] == "loopback" and report["machine"]["cpus"] >= 1
    assert all(set(row) == ROW_KEYS for row in report["results"])
    seen = {(r["transport"], r["test"], r["size"]) for r in report["results"]}
    assert seen == {
        (t, test, size)
        for t in ALL
        for test, size in [
            *[("stream", s) for s in (4096, 65536, 1 << 20)],
            ("rr", 64),
            ("crr", 64),
        ]
    }
    assert set(report["ratios"]) == RATIO_KEYS
    assert all(isinstance(v, float) and v > 0 for v in report["ratios"].values())
    assert {r["transport"] for r in report["idle"]} == set(ALL)
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(
    importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("httpx") is None,
    reason="the app bench needs the bench extra (uvicorn, httpx)",
)
def test_app_bench_reports_paths_of_unmodified_programs():
    options = BenchOptions.quick(mode="loopback", tests=(), app=True, runs=1, app_duration=0.1)
    report = run_bench(options)
    rows = report["app"]["results"]
    assert {r["transport"] for r in rows} == {"tcp", "cosock"}
    for r in rows:
        assert not r["errors"], r
        want = "shm" if r["transport"] == "cosock" else "tcp"
        assert (r["client_path"], r["server_path"]) == (want, want), r
        assert r["ops_per_s"] > 0


#### The lab (root)


def test_quick_lab_run(lab_name):
    from cosock.lab import Lab

    options = BenchOptions.quick(
        mode="lab",
        lab_name=lab_name,
        stream_sizes=(65536,),
        rr_sizes=(64,),
        runs=1,
        duration=0.05,
        warmup=0.0,
        idle_seconds=0.2,
    )
    report = run_bench(options)  # raises if any connection missed its promised path
    assert report["machine"]["mode"] == "lab"
    assert len(report["results"]) == 4 * 3
    assert report["ratios"]["stream_64KiB"] is not None
    assert lab_name not in Lab.list()  # torn down, namespaces and all
