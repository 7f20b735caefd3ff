"""``cosock bench --migrate``: a live stream both ways while one guest migrates away and back.

In a lab the bench builds itself (root), ``h1g1`` and ``h1g2`` (co-resident on ``h1``)
open one connection through cosock (``_migpeer``, started with ``cosock run``'s
environment: its agent path follows the guest across migrations) and stream a checked
pattern both ways.  ``h1g2`` then migrates to ``h2`` and back, ``migrations`` times,
``seconds`` apart.  Every byte is verified by the receivers; the timeline, the switches
each receiver saw and the inter-host wire counters become the report.
"""

from __future__ import annotations

import datetime
import itertools
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any

from ._proc import JsonProc, WorkerError
from ._runner import BenchError, Progress
from ._stats import median
from ._world import NEAR, SERVER, World, lab_world

PEER = [sys.executable, "-m", "cosock.bench._migpeer"]
HOME, AWAY = "h1", "h2"
#: Pattern seed of what each guest sends.
SEEDS = {SERVER: 1, NEAR: 2}


@dataclass
class MigrateOptions:
    """What ``--migrate`` runs; :meth:`quick` is the under-a-minute look."""

    migrations: int = 10
    seconds: float = 3.0  # streaming time before the first and after each migration
    sample_ms: float = 10.0
    lab_name: str = "benchmig"
    mover: str = NEAR
    away: str = AWAY

    @classmethod
    def quick(cls, **overrides: Any) -> MigrateOptions:
        base: dict[str, Any] = {"migrations": 4, "seconds": 2.0}
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        if self.migrations < 1:
            raise ValueError("--migrations must be at least 1")
        if not 0.2 <= self.seconds <= 600:
            raise ValueError("--seconds must be between 0.2 and 600")
        if not 1 <= self.sample_ms <= 1000:
            raise ValueError("sample interval must be between 1 and 1000 ms")


def direction(sender: str, receiver: str) -> str:
    return f"{sender}->{receiver}"


class _Run:
    """The two peers of one run and what the controller saw of them."""

    def __init__(self, world: World, options: MigrateOptions, progress: Progress | None) -> None:
        self.world = world
        self.lab: Any = world.lab
        self.options = options
        self.progress = progress
        self.peers: dict[str, JsonProc] = {}
        self.events: list[dict[str, Any]] = []
        self.wire: list[tuple[float, int]] = []
        self.t0 = 0.0
        self.steps = options.migrations + 2
        self.step = 0
        self.failed = False

    def say(self, label: str) -> None:
        if self.progress is not None:
            self.progress(label, self.step, self.steps)

    def start(self) -> None:
        o, w = self.options, self.world
        other = {SERVER: NEAR, NEAR: SERVER}
        argv = [*PEER, "server", "0", "--seed", str(SEEDS[SERVER])]
        argv += ["--peer-seed", str(SEEDS[NEAR]), "--sample-ms", str(o.sample_ms)]
        server = w.start("migrate-server", SERVER, argv, w.env(SERVER, True))
        listening = server.read(timeout=30)
        if not listening.get("cosock"):
            raise BenchError("the server's socket is not a cosock socket: cosock not enabled")
        argv = [*PEER, "client", w.server_ip, str(listening["listening"])]
        argv += ["--seed", str(SEEDS[NEAR]), "--peer-seed", str(SEEDS[other[NEAR]])]
        argv += ["--sample-ms", str(o.sample_ms)]
        client = w.start("migrate-client", NEAR, argv, w.env(NEAR, True))
        self.peers = {SERVER: server, NEAR: client}
        for proc in self.peers.values():
            proc.read(timeout=30)  # {"connected": true, ...}

    def status(self) -> dict[str, dict[str, Any]]:
        return {g: p.request({"op": "status"}, timeout=30) for g, p in self.peers.items()}

    def wait_for_shm(self, timeout: float = 15.0) -> None:
        """The bench is about leaving shared memory: refuse to start on another path."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            paths = {g: s["path"] for g, s in st.items()}
            if all(p == "shm" for p in paths.values()):
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the connection did not take shared memory (paths {paths}); "
                    "refusing to measure a migration from shm"
                )
            time.sleep(0.05)

    def stream_for(self, seconds: float, label: str) -> dict[str, str]:
        """Let the stream run, showing paths and rates; returns the paths at the end."""
        end = time.monotonic() + seconds
        last = self.status()
        last_t = time.monotonic()
        while True:
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))
            st = self.status()
            now = time.monotonic()
            errors = [e for s in st.values() for e in s["errors"]]
            if errors:  # counted in the report; no point migrating a broken stream further
                self.failed = True
                self.say(f"the stream failed: {'; '.join(errors)}")
                return {g: s["path"] for g, s in st.items()}
            rate = sum(st[g]["received"] - last[g]["received"] for g in st) / (now - last_t)
            paths = "/".join(st[g]["path"] for g in (SERVER, NEAR))
            self.say(f"{label}: {paths}, {rate / 1e6:,.0f} MB/s")
            last, last_t = st, now
            if now >= end:
                return {g: s["path"] for g, s in st.items()}

    def migrate(self, n: int) -> None:
        o = self.options
        dest = o.away if n % 2 else HOME
        origin = HOME if n % 2 else o.away
        self.say(f"migration {n}/{o.migrations}: {o.mover} {origin} -> {dest}")
        self.wire.append((time.monotonic(), self.lab.wire_bytes()))
        t_start = time.monotonic()
        self.lab.migrate(o.mover, dest)
        t_end = time.monotonic()
        self.events.append(
            {
                "n": n,
                "guest": o.mover,
                "from": origin,
                "to": dest,
                "t_start": t_start,
                "t_end": t_end,
                "migrate_ms": 1000 * (t_end - t_start),
            }
        )
        self.step += 1
        paths = self.stream_for(o.seconds, f"after migration {n} ({o.mover} on {dest})")
        self.events[-1]["paths_after"] = paths

    def finish(self) -> dict[str, dict[str, Any]]:
        self.say("stopping and verifying")
        for p in self.peers.values():
            p.send({"op": "stop"})
        halted = {g: p.read(timeout=90) for g, p in self.peers.items()}
        self.wire.append((time.monotonic(), self.lab.wire_bytes()))
        other = {SERVER: NEAR, NEAR: SERVER}
        for g, p in self.peers.items():
            p.send({"op": "finish", "peer_sent": halted[other[g]]["sent"]})
        ends = {g: p.read(timeout=120) for g, p in self.peers.items()}
        for g in ends:
            ends[g]["halt_hung"] = halted[g]["hung"]
        return ends


def run_migrate(options: MigrateOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run the migration bench in a lab of its own; returns the report (see :func:`report`)."""
    options.validate()
    if os.geteuid() != 0:
        raise BenchError("--migrate needs root: it builds a lab of network namespaces")
    t_begin = time.monotonic()
    with lab_world(options.lab_name) as world:
        run = _Run(world, options, progress)
        try:
            run.say("starting the stream h1g1 <-> h1g2")
            run.start()
            run.wait_for_shm()
            run.t0 = time.monotonic()
            run.wire.append((run.t0, run.lab.wire_bytes()))
            run.step = 1
            paths0 = run.stream_for(options.seconds, "both guests on h1")
            for n in range(1, options.migrations + 1):
                if run.failed:
                    break
                run.migrate(n)
            ends = run.finish()
        except WorkerError as exc:
            raise BenchError(f"migration bench: {exc}") from None
        finally:
            run.lab.close()
    if progress is not None:
        progress("done", run.steps, run.steps)
    return report(options, run, ends, paths0, time.monotonic() - t_begin)


#### The report


def report(
    options: MigrateOptions,
    run: _Run,
    ends: dict[str, dict[str, Any]],
    paths0: dict[str, str],
    elapsed: float,
) -> dict[str, Any]:
    """Totals first (the keys of the brief), then per direction, switch, phase, timeline."""
    t0 = run.t0
    other = {SERVER: NEAR, NEAR: SERVER}
    events = [
        {
            **{k: v for k, v in e.items() if not k.startswith("t_")},
            "t_start": _r(e["t_start"] - t0),
            "t_end": _r(e["t_end"] - t0),
        }
        for e in run.events
    ]
    directions: dict[str, Any] = {}
    switches: list[dict[str, Any]] = []
    timeline: list[dict[str, Any]] = []
    for receiver, end in ends.items():
        d = direction(other[receiver], receiver)
        check = end["check"]
        directions[d] = {
            "sent": ends[other[receiver]]["sent"],
            **check,
            "resets": end["resets"],
            "errors": end["errors"],
            "hung": end["hung"] or ends[other[receiver]]["halt_hung"],
            "eof_early": end["eof_early"],
            "MBps_by_path": rate_by_path(end["samples"]),
            "receiver_counters": end["counters"],
        }
        for s in end["switches"]:
            t_new = s["t_first_new"] - t0
            switches.append(
                {
                    "direction": d,
                    "from": s["from"],
                    "to": s["to"],
                    "at_s": _r(t_new),
                    "pause_ms": round(1000 * (s["t_first_new"] - s["t_last_old"]), 3),
                    "at_byte": s["at_byte"],
                    "migration": _migration_before(run.events, s["t_first_new"]),
                }
            )
        timeline += [
            {"t": _r(t - t0), "direction": d, "bytes": n, "path": p} for t, n, p in end["samples"]
        ]
    switches.sort(key=lambda s: s["at_s"])
    timeline.sort(key=lambda x: (x["direction"], x["t"]))
    pauses = sorted(s["pause_ms"] for s in switches)
    totals = {k: sum(d[k] for d in directions.values()) for k in _FAULTS}
    resets = sum(d["resets"] for d in directions.values())
    upgrades = [s for s in switches if (s["from"], s["to"]) == ("tcp", "shm")]
    hung = any(d["hung"] for d in directions.values())
    errors = [e for d in directions.values() for e in d["errors"]]
    ok = not hung and not errors and resets == 0 and not any(totals.values())
    ok = ok and all(not d["eof_early"] for d in directions.values())
    return {
        "migrations": len(run.events),
        "bytes_verified": sum(d["verified"] for d in directions.values()),
        **totals,
        "resets": resets,
        "pause_ms_p50": round(median(pauses), 3) if pauses else None,
        "pause_ms_max": pauses[-1] if pauses else None,
        "ok": ok,
        "reupgrade": (
            "tcp->shm observed after migrating back"
            if upgrades
            else "none: after migrating back the connection stayed on tcp"
        ),
        "switch_counts": _switch_counts(switches),
        "switches": switches,
        "migration_events": events,
        "paths_before": paths0,
        "phases": phases(run, ends),
        "directions": directions,
        "MBps_by_path": _combined_rates(directions),
        "machine": machine(options, elapsed),
        "timeline": timeline,
    }


_FAULTS = ("lost", "duplicated", "reordered", "corrupted")


def _r(x: float) -> float:
    return round(x, 4)


def _migration_before(events: list[dict[str, Any]], t: float) -> int | None:
    """The migration whose start is the latest before ``t`` (None: before any)."""
    n = None
    for e in events:
        if e["t_start"] <= t:
            n = e["n"]
    return n


def _switch_counts(switches: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in switches:
        key = f"{s['from']}->{s['to']}"
        out[key] = out.get(key, 0) + 1
    return out


def rate_by_path(samples: list[list[Any]]) -> dict[str, float]:
    """MB/s received while on each path: bytes and time between consecutive samples that
    both saw that path."""
    moved: dict[str, float] = {}
    spent: dict[str, float] = {}
    for (t1, n1, p1), (t2, n2, p2) in itertools.pairwise(samples):
        if p1 == p2 and t2 > t1:
            moved[p1] = moved.get(p1, 0.0) + (n2 - n1)
            spent[p1] = spent.get(p1, 0.0) + (t2 - t1)
    return {p: round(moved[p] / spent[p] / 1e6, 1) for p in moved if spent[p] > 0}


def _combined_rates(directions: dict[str, Any]) -> dict[str, float]:
    """Per path, the mean over directions of each direction's rate on that path."""
    by: dict[str, list[float]] = {}
    for d in directions.values():
        for p, r in d["MBps_by_path"].items():
            by.setdefault(p, []).append(r)
    return {p: round(sum(v) / len(v), 1) for p, v in by.items()}


def _bytes_at(samples: list[list[Any]], t: float) -> int:
    """Bytes received at time ``t`` (the last sample not after it)."""
    n = 0
    for ts, count, _ in samples:
        if ts > t:
            break
        n = int(count)
    return n


def _paths_between(samples: list[list[Any]], a: float, b: float) -> list[str]:
    seen: list[str] = []
    for ts, _, p in samples:
        if a <= ts <= b and p not in seen:
            seen.append(p)
    return seen


def phases(run: _Run, ends: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Between migrations: where the mover was, each direction's paths and MB/s, and the
    bytes that crossed the inter-host wire (proof that away phases take the network)."""
    other = {SERVER: NEAR, NEAR: SERVER}
    bounds = [(run.t0, run.events[0]["t_start"] if run.events else run.wire[-1][0], HOME)]
    for i, e in enumerate(run.events):
        stop = run.events[i + 1]["t_start"] if i + 1 < len(run.events) else run.wire[-1][0]
        bounds.append((e["t_end"], stop, e["to"]))
    wire = dict(enumerate(w for _, w in run.wire))
    out = []
    for i, (a, b, host) in enumerate(bounds):
        row: dict[str, Any] = {
            "phase": i,
            "mover_on": host,
            "t_start": _r(a - run.t0),
            "t_end": _r(b - run.t0),
        }
        for receiver, end in ends.items():
            d = direction(other[receiver], receiver)
            moved = _bytes_at(end["samples"], b) - _bytes_at(end["samples"], a)
            row[d] = {
                "MBps": round(moved / (b - a) / 1e6, 1) if b > a else None,
                "paths": _paths_between(end["samples"], a, b),
            }
        if i + 1 in wire:  # the wire is read before each migration and at the end
            row["wire_MB"] = round((wire[i + 1] - wire[i]) / 1e6, 1)
        out.append(row)
    return out


def machine(options: MigrateOptions, elapsed: float) -> dict[str, Any]:
    from .. import __version__, _config

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), "")
    except OSError:
        pass
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "cosock": __version__,
        "mode": "lab",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["cosock", *sys.argv[1:]]) if sys.argv else "",
        "seconds_per_phase": options.seconds,
        "sample_ms": options.sample_ms,
        "mover": f"{options.mover}: {HOME} <-> {options.away}",
        "ring_size": _config.ring_size(),
        "elapsed_s": round(elapsed, 1),
    }


def pause_summary(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    by: dict[str, list[float]] = {}
    for s in report["switches"]:
        by.setdefault(f"{s['from']}->{s['to']}", []).append(s["pause_ms"])
    return {k: {"n": len(v), "p50": median(v), "max": max(v)} for k, v in by.items()}
