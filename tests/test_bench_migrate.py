"""``cosock bench --migrate``: the byte checker on streams broken on purpose, and a short
real run in a lab (root) whose zeros must come from counting.

The checker tests feed it a pattern stream with bytes lost, duplicated, reordered or
corrupted at chosen places, cut into random chunk sizes, and expect each fault counted
under its own name and nothing else.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import requires_root
from cosock.bench._pattern import SEG, Pattern, StreamChecker

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
