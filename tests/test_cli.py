"""The ``cosock`` command line: errors are one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "argv",
    [
        ["--bogus"],
        ["demo", "--bytes", "abc"],
        ["lab", "up", "--hosts", "abc"],
        ["status", "--socket", "/nonexistent/x"],
    ],
)
def test_cli_bad_arguments_give_one_line_errors(argv):
    out = subprocess.run(
        [sys.executable, "-m", "cosock", *argv], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cosock"), out.stderr
