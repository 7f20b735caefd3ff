"""``--metrics-port``: the agent serves its Prometheus counters over HTTP on loopback, when
asked.  A real agent process, real accelerated connections, real HTTP clients (urllib and
httpx); bad ports are one-line errors."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cosock.agent.client import AgentClient
from sockutil import accelerated_pair, listener

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _agent_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("COSOCK_")}


@pytest.fixture
def metrics_agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, int]]:
    """(agent socket, metrics port) of an agent started with ``--metrics-port``."""
    tmp = Path(tempfile.mkdtemp(prefix="csm-", dir="/tmp"))
    path, port = tmp / "agent.sock", _free_port()
    argv = [sys.executable, "-m", "cosock.agent", "--socket", str(path), "--auto"]
    log = open(tmp / "agent.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [*argv, "--metrics-port", str(port)], env=_agent_env(), stderr=log, stdout=log
    )
    try:
        deadline = time.monotonic() + 15
        while "metrics on http" not in (tmp / "agent.log").read_text():
            assert proc.poll() is None, (tmp / "agent.log").read_text()
            assert time.monotonic() < deadline, "agent did not start"
            time.sleep(0.05)
        monkeypatch.setenv("COSOCK_AGENT", str(path))
        AgentClient.reset_shared()
        yield path, port
    finally:
        AgentClient.reset_shared()
        proc.terminate()
        proc.wait(10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _sample(text: str, series: str) -> float | None:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def test_metrics_over_http_count_the_shm_connections(metrics_agent: tuple[Path, int]) -> None:
    _path, port = metrics_agent
    url = f"http://127.0.0.1:{port}/metrics"
    srv = listener()
    try:
        with accelerated_pair(srv) as (cli, conn):
            cli.sendall(b"m" * 100_000)
            got = 0
            while got < 100_000:
                got += len(conn.recv(65536))
            deadline = time.monotonic() + 15
            while True:  # the census publishes about once a second
                with urllib.request.urlopen(url, timeout=10) as r:
                    assert r.status == 200
                    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                    text = r.read().decode()
                shm = _sample(text, 'cosock_connections{host="local",path="shm"}')
                sent = _sample(text, 'cosock_bytes{host="local",direction="sent"}')
                if shm == 2 and sent is not None and sent >= 100_002:
                    break
                assert time.monotonic() < deadline, text
                time.sleep(0.2)
            assert "# TYPE cosock_fallbacks_total counter" in text
            httpx = pytest.importorskip("httpx")
            with httpx.Client(timeout=10) as client:  # a second, unrelated HTTP client
                r2 = client.get(url)
                assert r2.status_code == 200 and "cosock_processes" in r2.text
                assert client.head(url).status_code == 200
                assert client.get(f"http://127.0.0.1:{port}/other").status_code == 404
                assert client.post(url).status_code == 501
    finally:
        srv.close()


def test_metrics_port_listens_on_loopback_only(metrics_agent: tuple[Path, int]) -> None:
    _path, port = metrics_agent
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    listening.append(local.rsplit(":", 1)[0])
    assert listening == ["0100007F"]  # 127.0.0.1, and nothing else


def _agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    tmp = tempfile.mkdtemp(prefix="csm-", dir="/tmp")
    try:
        return subprocess.run(
            [*args, "--socket", f"{tmp}/agent.sock"],
            capture_output=True,
            text=True,
            timeout=30,
            env=_agent_env(),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "cosock.agent", "--metrics-port", "70000"],
        [sys.executable, "-m", "cosock.agent", "--metrics-port", "http"],
        [sys.executable, "-m", "cosock", "agent", "--metrics-port", "-1"],
    ],
    ids=["agent-out-of-range", "agent-not-a-number", "cli-negative"],
)
def test_bad_metrics_port_is_a_one_line_usage_error(argv: list[str]) -> None:
    out = _agent_cli(*argv)
    assert out.returncode == 2, out
    assert len(out.stderr.strip().splitlines()) == 1 and "metrics-port" in out.stderr


@pytest.mark.parametrize("prog", [["-m", "cosock.agent"], ["-m", "cosock", "agent"]])
def test_metrics_port_in_use_is_a_clear_error(prog: list[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _agent_cli(sys.executable, *prog, "--metrics-port", str(port))
    assert out.returncode == 1, out
    assert f"cannot serve metrics on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr
