"""Read the processes' census files (see ``cosock._census``) and sum them up as metrics.

The files are written by the processes themselves, so each is checked before it is
believed: its name and ``pid`` agree, the process is alive and is the one that wrote it
(same start time, same owner as the file), and every field has the expected type.
Files of dead processes are removed (best effort); anything else odd is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .._census import DIR_NAME, FORMAT, proc_start

__all__ = ["DIR_NAME", "collect", "prometheus_text"]

_NAME = re.compile(r"([1-9][0-9]{0,9})\.json\Z")
#: A census file larger than this is not read (a process lists about 300 B a connection).
_MAX_FILE = 16 << 20
_INT_FIELDS = ("local_port", "peer_port", "switches", "upgrades", "upgrades_refused")
_STR_FIELDS = ("local_addr", "peer_addr", "path")
_OPT_STR_FIELDS = ("fallback_reason", "error")
_OPT_INT_FIELDS = ("bytes_sent", "bytes_received")
#: Paths every metric lists, even at zero (so a dashboard sees them from the start).
PATHS = ("shm", "handshake", "switching", "tcp", "upgrading", "broken")


def collect(directory: Path, guest_of: Callable[[int], str | None] | None = None) -> list[Any]:
    """Every live process's census, sorted by pid, each with ``guest`` (via ``guest_of``)
    and ``age`` (seconds since it last wrote)."""
    out = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        match = _NAME.match(name)
        if match is None:
            continue
        doc = _read(directory / name, int(match.group(1)))
        if doc is None:
            continue
        if guest_of is not None:
            doc["guest"] = guest_of(doc["pid"])
        out.append(doc)
    return sorted(out, key=lambda d: int(d["pid"]))


def _read(path: Path, pid: int) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_FILE:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(_MAX_FILE + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    start = proc_start(pid)
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        owner = None
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if start is None or owner is None or not isinstance(doc, dict) or doc.get("start") != start:
        if start is None or (isinstance(doc, dict) and doc.get("pid") == pid):
            with contextlib.suppress(OSError):
                os.unlink(path)  # its process is gone (or was replaced): stale
        return None
    if owner != st.st_uid or doc.get("pid") != pid or doc.get("format") != FORMAT:
        return None  # written by someone else than the process it names
    return _checked(doc, st.st_uid, st.st_mtime)


def _checked(doc: dict[str, Any], uid: int, mtime: float) -> dict[str, Any] | None:
    conns = doc.get("connections")
    listeners = doc.get("listeners")
    fallbacks = doc.get("fallbacks")
    if not (
        isinstance(conns, list) and isinstance(listeners, list) and isinstance(fallbacks, dict)
    ):
        return None
    if not all(_conn_ok(c) for c in conns) or not all(_listener_ok(x) for x in listeners):
        return None
    if not all(isinstance(k, str) and _is_int(v) for k, v in fallbacks.items()):
        return None
    return {
        "pid": doc["pid"],
        "uid": uid,
        "comm": str(doc.get("comm", "")),
        "age": round(max(0.0, time.time() - mtime), 3),
        "connections": conns,
        "listeners": listeners,
        "fallbacks": fallbacks,
    }


def _is_int(value: object) -> bool:
    return type(value) is int and value >= 0


def _conn_ok(c: object) -> bool:
    if not isinstance(c, dict):
        return False
    return (
        all(_is_int(c.get(k)) for k in _INT_FIELDS)
        and all(isinstance(c.get(k), str) for k in _STR_FIELDS)
        and all(c.get(k) is None or isinstance(c.get(k), str) for k in _OPT_STR_FIELDS)
        and all(c.get(k) is None or _is_int(c.get(k)) for k in _OPT_INT_FIELDS)
        and isinstance(c.get("accelerated"), bool)
    )


def _listener_ok(x: object) -> bool:
    return (
        isinstance(x, dict)
        and isinstance(x.get("addr"), str)
        and _is_int(x.get("port"))
        and (x.get("fallback_reason") is None or isinstance(x.get("fallback_reason"), str))
    )


#### Prometheus text exposition format (version 0.0.4)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(host: str, processes: Iterable[dict[str, Any]]) -> str:
    """The counters of ``processes`` (from :func:`collect`) in Prometheus text format."""
    procs = list(processes)
    conns = [c for p in procs for c in p["connections"]]
    by_path = Counter({path: 0 for path in PATHS})
    by_path.update(c["path"] for c in conns)
    plain = Counter(c["fallback_reason"] for c in conns if not c["accelerated"])
    fallbacks: Counter[str] = Counter()
    for p in procs:
        fallbacks.update(p["fallbacks"])
    h = f'host="{_label(host)}"'
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, int]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{{{h}{labels}}} {value}")

    metric(
        "cosock_processes",
        "gauge",
        "Processes with cosock connections or fallback listeners.",
        [("", len(procs))],
    )
    metric(
        "cosock_connections",
        "gauge",
        "Open connections by data path (plain-TCP fallbacks count as tcp).",
        [(f',path="{_label(k)}"', v) for k, v in sorted(by_path.items())],
    )
    metric(
        "cosock_plain_connections",
        "gauge",
        "Open connections that never got shared memory, by fallback reason.",
        [(f',reason="{_label(str(k))}"', v) for k, v in sorted(plain.items(), key=str)],
    )
    metric(
        "cosock_fallbacks_total",
        "counter",
        "Connections that fell back to plain TCP, by reason, summed over the live processes.",
        [(f',reason="{_label(k)}"', v) for k, v in sorted(fallbacks.items())],
    )
    accel = [c for c in conns if c["accelerated"]]
    metric(
        "cosock_bytes",
        "gauge",
        "Bytes carried so far by the open accelerated connections, each way.",
        [
            (',direction="sent"', sum(c["bytes_sent"] or 0 for c in accel)),
            (',direction="received"', sum(c["bytes_received"] or 0 for c in accel)),
        ],
    )
    metric(
        "cosock_path_switches",
        "gauge",
        "Path switches shm to TCP made by the open connections.",
        [("", sum(c["switches"] for c in accel))],
    )
    metric(
        "cosock_upgrades",
        "gauge",
        "Upgrades TCP to shm made (and refused) by the open connections.",
        [
            (',outcome="accepted"', sum(c["upgrades"] for c in accel)),
            (',outcome="refused"', sum(c["upgrades_refused"] for c in accel)),
        ],
    )
    return "\n".join(lines) + "\n"
