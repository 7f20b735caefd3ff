"""``cosock bench --migrate``: the byte checker on streams broken on purpose, and a short
real run in a lab (root) whose zeros must come from counting.

The checker tests feed it a pattern stream with bytes lost, duplicated, reordered or
corrupted at chosen places, cut into random chunk sizes, and expect each fault counted
under its own name and nothing else.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import requires_root
from cosock.bench._pattern import SEG, Pattern, StreamChecker
from cosock.bench._proc import JsonProc

P = Pattern(7)
N = 10 * SEG + 1234


def _check(stream: bytes, sent: int = N, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    checker = StreamChecker(P)
    pos = 0
    while pos < len(stream):
        n = rng.choice((1, 7, 100, 4096, SEG, 3 * SEG + 5))
        checker.feed(stream[pos : pos + n])
        pos += n
    return checker.finish(sent)


def _faults(result: dict[str, Any]) -> dict[str, int]:
    return {k: result[k] for k in ("lost", "duplicated", "reordered", "corrupted")}


CLEAN = {"lost": 0, "duplicated": 0, "reordered": 0, "corrupted": 0}


@pytest.mark.parametrize("seed", range(4))
def test_clean_stream_verifies_every_byte(seed: int) -> None:
    data = P.expected(0, N)
    assert data[:SEG] == P.segment(0) and data[SEG : 2 * SEG] == P.segment(1)
    result = _check(data, seed=seed)
    assert _faults(result) == CLEAN
    assert result["verified"] == result["received"] == N


@pytest.mark.parametrize("where", [5, SEG + 3, 3 * SEG + 700, N - 1])
def test_a_corrupted_byte_is_caught(where: int) -> None:
    data = bytearray(P.expected(0, N))
    data[where] ^= 0x5A
    result = _check(bytes(data))
    assert result["corrupted"] == 1
    assert result["lost"] == 1  # that offset never arrived intact
    assert result["duplicated"] == result["reordered"] == 0
    assert result["verified"] == N - 1


@pytest.mark.parametrize(("a", "b"), [(1000, 1100), (SEG - 10, SEG + 10), (2 * SEG, 4 * SEG + 3)])
def test_lost_bytes_are_counted(a: int, b: int) -> None:
    data = P.expected(0, N)
    result = _check(data[:a] + data[b:])
    assert _faults(result) == {**CLEAN, "lost": b - a}
    assert result["verified"] == N - (b - a)


def test_lost_tail_is_counted() -> None:
    data = P.expected(0, N)
    assert _faults(_check(data[: N - 5000])) == {**CLEAN, "lost": 5000}


@pytest.mark.parametrize(("a", "b"), [(500, 900), (SEG - 10, SEG + 10), (SEG, 3 * SEG)])
def test_duplicated_bytes_are_counted(a: int, b: int) -> None:
    data = P.expected(0, N)
    result = _check(data[:b] + data[a:b] + data[b:])
    assert _faults(result) == {**CLEAN, "duplicated": b - a}
    jump = result["jumps"][0]  # the stream went back by b - a (seen a few bytes late if
    assert jump["received_at"] - jump["found"] == b - a  # the first ones match by chance)
    assert result["verified"] == N and result["received"] == N + (b - a)


@pytest.mark.parametrize(
    ("a", "b", "c"), [(1000, 2000, 3000), (SEG - 10, SEG + 10, SEG + 50), (SEG, 2 * SEG, 4 * SEG)]
)
def test_reordered_bytes_are_counted(a: int, b: int, c: int) -> None:
    """[a, b) arrives after [b, c): the late bytes are reordered, nothing is lost."""
    data = P.expected(0, N)
    result = _check(data[:a] + data[b:c] + data[a:b] + data[c:])
    assert _faults(result) == {**CLEAN, "reordered": b - a}
    assert result["verified"] == N


def test_faults_together_are_counted_apart() -> None:
    data = P.expected(0, N)
    stream = bytearray(
        data[:1000] + data[2000:5000] + data[4000:5000] + data[5000:9000] + data[1000:2000]
    )
    stream += data[9000 : 6 * SEG] + data[6 * SEG + 100 :]
    stream[8 * SEG] ^= 1
    result = _check(bytes(stream))
    assert _faults(result) == {"lost": 101, "duplicated": 1000, "reordered": 1000, "corrupted": 1}


def test_the_other_direction_is_another_pattern() -> None:
    """A stream of the wrong seed is not accepted as this one (beyond the bytes both
    share by construction: header magic and segment numbers)."""
    result = _check(Pattern(8).expected(0, 4 * SEG), sent=4 * SEG)
    assert result["verified"] <= 4 * 12
    assert result["corrupted"] == 4 * SEG - result["verified"]
    assert result["lost"] == 4 * SEG - result["verified"]


#### The guest program, on loopback (no root, no cosock): stop, count, check


def _peer(tmp: Path, name: str, *args: str) -> JsonProc:
    argv = [sys.executable, "-m", "cosock.bench._migpeer", *args, "--sample-ms", "5"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSOCK_")}
    log = tmp / f"{name}.stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
        )
    return JsonProc(name, proc, log)


@pytest.mark.parametrize("stagger", [0.0, 0.5])
def test_peers_count_both_directions_to_the_byte(tmp_path: Path, stagger: float) -> None:
    """``stagger``: the second end is told to stop that long after the first one stopped
    (what a loaded machine does to the driver's two writes): still no early EOF, as the
    ends half-close only at ``finish``."""
    server = _peer(tmp_path, "server", "server", "0", "--seed", "1", "--peer-seed", "2")
    client = None
    try:
        port = server.read(timeout=30)["listening"]
        client = _peer(
            tmp_path, "client", "client", "127.0.0.1", str(port), "--seed", "2", "--peer-seed", "1"
        )
        for proc in (server, client):
            assert proc.read(timeout=30)["path"] == "tcp"
        time.sleep(0.5)
        assert client.request({"op": "status"}, timeout=30)["received"] > 0
        halted = {}
        if stagger:
            halted["server"] = server.request({"op": "stop"}, timeout=60)
            time.sleep(stagger)
            halted["client"] = client.request({"op": "stop"}, timeout=60)
        else:
            for proc in (server, client):
                proc.send({"op": "stop"})
            for name, proc in (("server", server), ("client", client)):
                halted[name] = proc.read(timeout=60)
        server.send({"op": "finish", "peer_sent": halted["client"]["sent"]})
        client.send({"op": "finish", "peer_sent": halted["server"]["sent"]})
        ends = {"server": server.read(timeout=60), "client": client.read(timeout=60)}
    finally:
        for proc in (server, client):
            if proc is not None:
                proc.stop()
    for me, peer in (("server", "client"), ("client", "server")):
        end = ends[me]
        assert not end["errors"] and not end["hung"] and not end["eof_early"]
        assert end["check"]["verified"] == end["received"] == halted[peer]["sent"] > 0
        assert _faults(end["check"]) == CLEAN
        counts = [n for _, n, _ in end["samples"]]
        assert counts == sorted(counts) and counts[-1] == end["received"]
        assert end["switches"] == []  # plain TCP throughout


#### A real run (root): two migrations in a lab the bench builds itself


@requires_root
@pytest.mark.timeout(300)
def test_bench_migrate_counts_every_byte(lab_name: str, tmp_path: Path) -> None:
    out, png = tmp_path / "migrate.json", tmp_path / "migrate.png"
    argv = [sys.executable, "-m", "cosock", "bench", "--migrate", "--migrations", "2"]
    argv += ["--seconds", "1.5", "--lab-name", lab_name, "--json", str(out), "--plot", str(png)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    report = json.loads(out.read_text()) if out.exists() else {}
    assert "bytes verified" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert png.stat().st_size > 10_000

    assert report["migrations"] == 2 == len(report["migration_events"])
    evidence = json.dumps({k: v for k, v in report.items() if k != "timeline"})[:6000]
    for key in ("lost", "duplicated", "reordered", "corrupted", "resets"):
        assert report[key] == 0, f"{key}: {evidence}"
    dirs = report["directions"]
    assert set(dirs) == {"h1g1->h1g2", "h1g2->h1g1"}
    for d in dirs.values():
        # Counted by the receiver's checker, against the sender's own count.
        assert d["sent"] > 1 << 20
        assert d["verified"] == d["received"] == d["sent"]
        assert not d["errors"] and not d["hung"]
    assert done.returncode == 0 and "OK" in done.stdout
    assert report["bytes_verified"] == sum(d["sent"] for d in dirs.values())

    # Both guests started on one host: shared memory; the first migration left it.
    assert report["paths_before"] == {"h1g1": "shm", "h1g2": "shm"}
    phases = report["phases"]
    assert all(phases[0][d]["paths"] == ["shm"] for d in dirs)
    assert phases[0]["wire_MB"] == 0 and phases[1]["wire_MB"] > 0
    first = [s for s in report["switches"] if s["migration"] == 1]
    assert {s["direction"] for s in first} == set(dirs)
    assert all((s["from"], s["to"]) == ("shm", "tcp") for s in first)
    pauses = sorted(s["pause_ms"] for s in report["switches"])
    assert report["pause_ms_max"] == pauses[-1]
    assert pauses[0] <= report["pause_ms_p50"] <= pauses[-1]
    assert all(p >= 0 for p in pauses)

    # The timeline is each receiver's own count, ending at what it verified.
    for name, d in dirs.items():
        samples = [s for s in report["timeline"] if s["direction"] == name]
        counts = [s["bytes"] for s in samples]
        assert len(samples) > 50 and counts == sorted(counts)
        assert counts[-1] == d["received"]
        assert {"shm", "tcp"} <= {s["path"] for s in samples}
