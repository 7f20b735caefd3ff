"""What ``cosock bench`` measures and in which order.

Every transport gets its own long-lived server and client worker, started once.  Rounds
then go over the whole matrix (test x size x transport), rotating the transport order
each round, so that a burst of machine noise hits all transports alike; each figure is
the median of the rounds, with the spread reported.  A connection that did not take the
path its transport promises (``cosock`` -> shm, ``cosock-remote`` -> tcp) stops the bench:
a silent fallback would publish plain TCP numbers under cosock's name.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .. import _config
from ._proc import JsonProc, WorkerError
from ._stats import median, spread
from ._world import FAR, NEAR, SERVER, WORKER, World, open_world

KiB, MiB = 1 << 10, 1 << 20
STREAM_SIZES = (64, KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB)
RR_SIZES = (64, KiB, 16 * KiB)
CRR_SIZE = 64
TRANSPORTS = ("tcp", "uds", "cosock", "cosock-remote")
TESTS = ("stream", "rr", "crr", "idle")

#: Called before each measurement with (what, done so far, total).
Progress = Callable[[str, int, int], None]


class BenchError(RuntimeError):
    """The bench could not produce honest numbers (a worker failed, hung or lied)."""


class PathMismatch(BenchError):
    """A connection took another path than its transport promises (e.g. cosock fell back)."""


@dataclass(frozen=True)
class Transport:
    name: str
    server: str  # which server it talks to: "tcp", "uds" or "cosock"
    guest: str  # where its client runs
    cosock: bool  # client started with cosock enabled
    expect: str  # the path every one of its connections must take


SPECS = {
    "tcp": Transport("tcp", "tcp", NEAR, False, "tcp"),
    "uds": Transport("uds", "uds", NEAR, False, "uds"),
    "cosock": Transport("cosock", "cosock", NEAR, True, "shm"),
    "cosock-remote": Transport("cosock-remote", "cosock", FAR, True, "tcp"),
}


@dataclass
class BenchOptions:
    """What to run.  Defaults are the full bench; :meth:`quick` is the one-minute look."""

    stream_sizes: tuple[int, ...] = STREAM_SIZES
    rr_sizes: tuple[int, ...] = RR_SIZES
    tests: tuple[str, ...] = TESTS
    transports: tuple[str, ...] = TRANSPORTS
    duration: float = 1.0
    runs: int = 5
    warmup: float = 0.2
    idle_seconds: float = 3.0
    app: bool = False
    app_duration: float = 2.0
    mode: str = "auto"
    lab_name: str = "bench"
    pin: bool = False
    #: Extra environment per transport's client (tests use it to force a fallback).
    client_env: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def quick(cls, **overrides: Any) -> BenchOptions:
        base: dict[str, Any] = {
            "stream_sizes": (64, 4 * KiB, 64 * KiB, MiB),
            "rr_sizes": (64,),
            "duration": 0.25,
            "runs": 3,
            "warmup": 0.05,
            "idle_seconds": 1.0,
            "app_duration": 0.5,
        }
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        unknown = [t for t in self.transports if t not in SPECS]
        if unknown or not self.transports:
            raise ValueError(f"unknown transports {unknown}; choose from {', '.join(SPECS)}")
        bad_tests = [t for t in self.tests if t not in TESTS]
        if bad_tests:
            raise ValueError(f"unknown tests {bad_tests}; choose from {', '.join(TESTS)}")
        if any(s <= 0 or s > 64 * MiB for s in (*self.stream_sizes, *self.rr_sizes)):
            raise ValueError("message sizes must be between 1 B and 64 MiB")
        if self.duration <= 0 or self.runs < 1 or self.idle_seconds <= 0:
            raise ValueError("duration and idle seconds must be > 0, runs >= 1")

    def points(self) -> list[tuple[str, int]]:
        """The (test, size) matrix of one round, idle excluded (it runs once, at the end)."""
        out: list[tuple[str, int]] = []
        if "stream" in self.tests:
            out += [("stream", s) for s in self.stream_sizes]
        if "rr" in self.tests:
            out += [("rr", s) for s in self.rr_sizes]
        if "crr" in self.tests:
            out.append(("crr", CRR_SIZE))
        return out


#### Workers


@dataclass
class Pairs:
    """One client worker per transport, talking to its server."""

    clients: dict[str, JsonProc]
    servers: dict[str, dict[str, Any]]


def _server_argv(world: World, kind: str) -> list[str]:
    if kind == "uds":
        return [*WORKER, "server", "--unix", str(world.tmp / "bench-uds.sock")]
    return [*WORKER, "server", "--tcp", f"{world.server_ip}:0"]


def _client_argv(world: World, kind: str, server: dict[str, Any]) -> list[str]:
    if kind == "uds":
        return [*WORKER, "client", "--unix", str(server["listening"])]
    return [*WORKER, "client", "--tcp", f"{world.server_ip}:{server['listening'][1]}"]


def start_pairs(
    world: World, transports: tuple[str, ...], client_env: dict[str, dict[str, str]] | None = None
) -> Pairs:
    """Start a server per transport (so idle connections of two transports never queue
    behind each other), then a client per transport; all start in parallel."""
    specs = [SPECS[t] for t in transports]
    started = {
        s.name: world.start(
            f"server-{s.name}",
            SERVER,
            _server_argv(world, s.server),
            world.env(SERVER, s.server == "cosock"),
        )
        for s in specs
    }
    servers = {name: proc.read(timeout=30) for name, proc in started.items()}
    for spec in specs:
        if servers[spec.name].get("cosock") != (spec.server == "cosock"):
            raise BenchError(f"server of {spec.name}: cosock enabled is not as intended")
    clients: dict[str, JsonProc] = {}
    for spec in specs:
        extra = dict(world.far_extra) if spec.guest == FAR else {}
        extra.update((client_env or {}).get(spec.name, {}))
        env = world.env(spec.guest, spec.cosock, extra)
        argv = _client_argv(world, spec.server, servers[spec.name])
        clients[spec.name] = world.start(f"client-{spec.name}", spec.guest, argv, env)
    for proc in clients.values():
        proc.read(timeout=30)  # {"ready": pid}
    return Pairs(clients, servers)


def check_path(transport: str, result: dict[str, Any]) -> None:
    """Raise PathMismatch unless every connection of ``result`` took the promised path."""
    spec = SPECS[transport]
    if result["test"] == "crr":
        seen = dict(result["paths"])
        reasons = result.get("reasons", {})
    else:
        seen = {}
        reasons = {}
        for end in ("client", "server"):
            path = result[end]["path"]
            seen[f"{end}:{path}"] = 1
            reasons[str(result[end].get("reason"))] = 1
            if not spec.cosock and spec.server != "cosock" and "counters" in result[end]:
                raise PathMismatch(f"{transport}: the {end} used cosock but must not")
        seen = {k.split(":", 1)[1]: v for k, v in seen.items()}
    wrong = {p: n for p, n in seen.items() if p != spec.expect}
    if wrong:
        why = ", ".join(r for r in reasons if r != "None") or "none recorded"
        raise PathMismatch(
            f"{transport}: connections took path {sorted(wrong)} instead of {spec.expect!r}"
            f" (fallback reason: {why}); refusing to report these numbers as {transport}"
        )


def measure(pairs: Pairs, transport: str, test: str, size: int, duration: float) -> dict[str, Any]:
    """One run of one test on one transport, path-checked."""
    client = pairs.clients[transport]
    cmd = {"test": test, "size": size, "duration": duration}
    try:
        result = client.request(cmd, timeout=3 * duration + 60)
    except WorkerError as exc:
        raise BenchError(f"{transport} {test} {size} B: {exc}") from None
    check_path(transport, result)
    return result


def measure_idle(pairs: Pairs, transports: tuple[str, ...], seconds: float) -> dict[str, Any]:
    """Every transport's idle connection at once (idle costs ~nothing, so they do not
    disturb each other); CPU of both ends over ``seconds``."""
    for t in transports:
        pairs.clients[t].send({"test": "idle", "size": 0, "duration": seconds})
    out: dict[str, Any] = {}
    for t in transports:
        try:
            result = pairs.clients[t].read(timeout=seconds + 60)
        except WorkerError as exc:
            raise BenchError(f"{t} idle: {exc}") from None
        check_path(t, result)
        out[t] = result
    return out


#### Aggregation


def summarise(transport: str, test: str, size: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON row of one (transport, test, size): medians over runs, and their spread."""

    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return median(values) if values else None

    mbps = med("MBps") if test == "stream" else None
    headline = [r["MBps"] for r in runs] if test == "stream" else [r["p50_us"] for r in runs]
    return {
        "transport": transport,
        "test": test,
        "size": size,
        "MBps": mbps,
        "ops_per_s": med("ops_per_s"),
        "p50_us": None if test == "stream" else med("p50_us"),
        "p99_us": None if test == "stream" else med("p99_us"),
        "p999_us": None if test == "stream" else med("p999_us"),
        "runs": len(runs),
        "spread": spread(headline),
    }


def cpu_rows(raw: dict[tuple[str, str, int], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """CPU cost (client + server): seconds per GB moved for stream, µs per operation for rr
    and crr (a CRR operation is a whole connection, the server's accept included)."""
    rows = []
    for (transport, test, size), runs in raw.items():
        client = [r["cpu_client_s"] for r in runs]
        both = [r["cpu_client_s"] + r["cpu_server_s"] for r in runs]
        if test == "stream":
            per = [1e9 / r["bytes"] for r in runs]  # (1 / GB moved)
            unit = "cpu_s_per_GB"
        else:
            per = [1e6 / r["ops"] for r in runs]  # µs per operation
            unit = "cpu_us_per_op"
        total = median([b * p for b, p in zip(both, per, strict=True)])
        mine = median([c * p for c, p in zip(client, per, strict=True)])
        rows.append(
            {
                "transport": transport,
                "test": test,
                "size": size,
                "unit": unit,
                "cpu": total,
                "client": mine,
                "server": total - mine,
            }
        )
    return rows


def idle_rows(idle: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for transport, r in idle.items():
        cpu = r["cpu_client_s"] + r["cpu_server_s"]
        rows.append(
            {
                "transport": transport,
                "seconds": r["seconds"],
                "client_cpu_ms": 1000 * r["cpu_client_s"],
                "server_cpu_ms": 1000 * r["cpu_server_s"],
                "cpu_percent": 100 * cpu / r["seconds"],
            }
        )
    return rows


def _row(rows: list[dict[str, Any]], transport: str, test: str, size: int) -> dict[str, Any] | None:
    for r in rows:
        if (r["transport"], r["test"], r["size"]) == (transport, test, size):
            return r
    return None


def ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """cosock's advantage over tcp: throughput cosock/tcp, latency tcp/cosock, and crr as
    cosock/tcp time (the one ratio where lower is better: the cost of setting up a channel)."""

    def ratio(test: str, size: int, key: str, cosock_over_tcp: bool) -> float | None:
        c, t = _row(rows, "cosock", test, size), _row(rows, "tcp", test, size)
        if c is None or t is None or not c[key] or not t[key]:
            return None
        return float(c[key] / t[key] if cosock_over_tcp else t[key] / c[key])

    return {
        "stream_64KiB": ratio("stream", 64 * KiB, "MBps", True),
        "stream_1MiB": ratio("stream", MiB, "MBps", True),
        "rr_64B_p50": ratio("rr", 64, "p50_us", False),
        "rr_64B_p99": ratio("rr", 64, "p99_us", False),
        "crr_p50": ratio("crr", CRR_SIZE, "p50_us", True),
    }


def machine(world: World, options: BenchOptions) -> dict[str, Any]:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), "")
    except OSError:
        pass
    from .. import __version__

    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu_model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "cosock": __version__,
        "mode": world.mode,
        "pinned": options.pin,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["cosock", *sys.argv[1:]]) if sys.argv else "",
        "duration_s": options.duration,
        "runs": options.runs,
        "ring_size": _config.ring_size(),
        "spin_us": _config.spin_ns() // 1000,
        "spin_max_us": _config.spin_max_ns() // 1000,
    }


#### The run


@contextmanager
def _world(options: BenchOptions) -> Iterator[World]:
    with open_world(options.mode, options.lab_name) as world:
        world.pin = options.pin
        yield world


def _order(transports: tuple[str, ...], round_no: int) -> tuple[str, ...]:
    k = round_no % len(transports)
    return transports[k:] + transports[:k]


def run_bench(options: BenchOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run the bench; returns the report (``machine``, ``results``, ``ratios``, ``cpu``,
    ``idle``, ``rr_latency_cdf_us`` and, with ``app``, ``app``)."""
    options.validate()
    points = options.points()
    transports = options.transports
    n_app = 0
    if options.app:
        from ._appbench import app_steps

        n_app = app_steps(options)
    total = len(points) * len(transports) * options.runs + ("idle" in options.tests) + n_app
    done = 0

    def tick(label: str) -> None:
        nonlocal done
        if progress is not None:
            progress(label, done, total)
        done += 1

    raw: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    idle: dict[str, Any] = {}
    app: dict[str, Any] | None = None
    t_start = time.monotonic()
    from ._calibrate import parallel_capacity

    capacity, n_cpus = parallel_capacity()
    with _world(options) as world:
        info = machine(world, options)
        info["parallel_cpu_capacity"] = round(capacity, 2)  # of info["cpus"] = n_cpus
        info["usable_cpus"] = n_cpus
        if points or "idle" in options.tests:
            pairs = start_pairs(world, transports, options.client_env)
            if options.warmup and points:
                for t in transports:  # first-run effects (page faults, caches) go here
                    for test in ("stream", "rr"):
                        measure(
                            pairs, t, test, 64 * KiB if test == "stream" else 64, options.warmup
                        )
            for round_no in range(options.runs):
                for test, size in points:
                    for t in _order(transports, round_no):
                        tick(f"round {round_no + 1}/{options.runs}: {test} {_size(size)} {t}")
                        result = measure(pairs, t, test, size, options.duration)
                        raw.setdefault((t, test, size), []).append(result)
            if "idle" in options.tests:
                tick(f"idle connection, {options.idle_seconds:g} s")
                idle = measure_idle(pairs, transports, options.idle_seconds)
            world.stop_all()
        if options.app:
            from ._appbench import run_app_bench

            app = run_app_bench(world, options, tick)
    if progress is not None:
        progress("done", total, total)
    rows = [summarise(t, test, size, runs) for (t, test, size), runs in raw.items()]
    rows.sort(key=lambda r: (r["test"] != "stream", r["test"], r["size"], _rank(r["transport"])))
    report: dict[str, Any] = {
        "machine": {**info, "elapsed_s": round(time.monotonic() - t_start, 1)},
        "results": rows,
        "ratios": ratios(rows),
        "cpu": cpu_rows(raw),
        "idle": idle_rows(idle),
        "stream_MBps_range": {
            f"{t}/{size}": [min(r["MBps"] for r in runs), max(r["MBps"] for r in runs)]
            for (t, test, size), runs in raw.items()
            if test == "stream"
        },
        "rr_latency_cdf_us": {
            f"{t}/{size}": _median_run(runs)["cdf_us"]
            for (t, test, size), runs in raw.items()
            if test == "rr"
        },
    }
    if app is not None:
        report["app"] = app
    return report


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median p50: its whole latency distribution is shown in the plot."""
    return sorted(runs, key=lambda r: float(r["p50_us"]))[len(runs) // 2]


def _rank(transport: str) -> int:
    return TRANSPORTS.index(transport) if transport in TRANSPORTS else len(TRANSPORTS)


def _size(size: int) -> str:
    if size >= MiB and size % MiB == 0:
        return f"{size // MiB} MiB"
    if size >= KiB and size % KiB == 0:
        return f"{size // KiB} KiB"
    return f"{size} B"
