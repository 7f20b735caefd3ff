"""``cosock bench --app``: unmodified programs (uvicorn + httpx, asyncio streams) between
two co-resident guests, with plain TCP and with cosock, interleaved round by round.

Unlike the socket-level bench this one does not stop when a connection misses shared
memory: which path third-party stacks take is one of its findings, so it is reported
(per row, and in a note) instead.  A run that fails or hangs is recorded as an error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._proc import WorkerError
from ._stats import median, spread
from ._world import NEAR, SERVER, World

if TYPE_CHECKING:
    from ._runner import BenchOptions

APPS_MODULE = [sys.executable, "-m", "cosock.bench._apps"]
#: (row name, server program, request/response size).
APPS = (
    ("http GET 64 B (uvicorn+httpx)", "http", 64),
    ("http GET 1 MiB (uvicorn+httpx)", "http", 1 << 20),
    ("asyncio echo 64 B", "echo", 64),
)
APP_TRANSPORTS = ("tcp", "cosock")


def app_steps(options: BenchOptions) -> int:
    return len(APPS) * len(APP_TRANSPORTS) * options.runs


def _client_argv(kind: str, host: str, port: int, size: int, duration: float) -> list[str]:
    if kind == "http":
        where = ["http-client", "--url", f"http://{host}:{port}"]
    else:
        where = ["echo-client", "--host", host, "--port", str(port)]
    return [*APPS_MODULE, *where, "--size", str(size), "--duration", str(duration)]


def _one_run(world: World, argv: list[str], cosock: bool, name: str, timeout: float) -> Any:
    proc = world.start(name, NEAR, argv, world.env(NEAR, cosock))
    try:
        return proc.read(timeout=timeout)
    finally:
        proc.stop()
        world.procs.remove(proc)


def run_app_bench(
    world: World, options: BenchOptions, tick: Callable[[str], None]
) -> dict[str, Any]:
    """Servers once per (program, transport); one client process per run."""
    ports: dict[tuple[str, str], int] = {}
    info: dict[str, str] = {}
    for kind in ("http", "echo"):
        for t in APP_TRANSPORTS:
            argv = [*APPS_MODULE, f"{kind}-server", "--host", world.server_ip]
            proc = world.start(
                f"app-{kind}-server-{t}", SERVER, argv, world.env(SERVER, t != "tcp")
            )
            listening = proc.read(timeout=60)
            ports[(kind, t)] = int(listening["listening"][1])
            info[kind] = str(listening.get("server", kind))
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    errors: dict[tuple[str, str], list[str]] = {}
    for round_no in range(options.runs):
        for name, kind, size in APPS:
            order = APP_TRANSPORTS if round_no % 2 == 0 else APP_TRANSPORTS[::-1]
            for t in order:
                tick(f"app round {round_no + 1}/{options.runs}: {name.split(' (')[0]} {t}")
                argv = _client_argv(
                    kind, world.server_ip, ports[(kind, t)], size, options.app_duration
                )
                try:
                    result = _one_run(
                        world, argv, t != "tcp", f"app-client-{kind}-{t}", options.app_duration + 90
                    )
                except WorkerError as exc:
                    errors.setdefault((name, t), []).append(str(exc))
                    continue
                runs.setdefault((name, t), []).append(result)
    rows = [
        _row(name, t, runs.get((name, t), []), errors.get((name, t), []))
        for name, _, _ in APPS
        for t in APP_TRANSPORTS
    ]
    return {"servers": info, "results": rows, "note": _note(rows)}


def _row(app: str, transport: str, runs: list[dict[str, Any]], errors: list[str]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        return median([r[key] for r in runs]) if runs else None

    def paths(key: str) -> str:
        seen = sorted({str(r[key]) for r in runs})
        return "+".join(seen) if seen else "-"

    return {
        "app": app,
        "transport": transport,
        "ops_per_s": med("ops_per_s"),
        "MBps": med("MBps"),
        "p50_us": med("p50_us"),
        "p99_us": med("p99_us"),
        "runs": len(runs),
        "spread": spread([r["ops_per_s"] for r in runs]),
        "client_path": paths("client_path"),
        "server_path": paths("server_path"),
        "reconnects": sum(int(r.get("connections", 1)) - 1 for r in runs),
        "client_fallback_reasons": sorted(
            {str(r["client_reason"]) for r in runs if r.get("client_reason")}
        ),
        "errors": errors,
    }


def _note(rows: list[dict[str, Any]]) -> str:
    """One line on anything a reader must know: connections that missed shm, failures."""
    notes = []
    for r in rows:
        if r["transport"] == "cosock" and (r["client_path"], r["server_path"]) != ("shm", "shm"):
            why = ", ".join(r["client_fallback_reasons"]) or "no reason recorded"
            notes.append(
                f"{r['app']}: path {r['client_path']}/{r['server_path']} in some run,"
                f" not shm (client fallback reason: {why})"
            )
        if r["reconnects"]:
            notes.append(
                f"{r['app']} over {r['transport']}: the client re-opened its keep-alive"
                f" connection {r['reconnects']} time(s)"
            )
        if r["errors"]:
            notes.append(f"{r['app']} over {r['transport']}: {len(r['errors'])} run(s) failed")
    return "; ".join(notes) or "every cosock connection took shm on both ends"
