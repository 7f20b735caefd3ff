"""``--metrics-port``: the agent's ``metrics`` op over HTTP, for a Prometheus scraper.

Opt-in and loopback only (127.0.0.1): the counters say which processes of the host talk to
whom, which is nobody's business off the machine.  A daemon thread runs a small
``http.server``; each ``GET /metrics`` asks the agent for ``{"op": "metrics"}`` on its own
Unix socket, so the answer comes from the agent's single-threaded loop like any other
request, and the HTTP thread shares no state with it.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .._errors import CosockError

log = logging.getLogger("cosock.agent")

#: The only address the endpoint binds.
METRICS_HOST = "127.0.0.1"
#: Prometheus text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsPortError(CosockError):
    """The metrics port cannot be served (bad number, or the bind failed)."""


def check_port(port: int) -> int:
    """``port`` if it is a TCP port number (0 = any free port), else MetricsPortError."""
    if not 0 <= port <= 65535:
        raise MetricsPortError(f"--metrics-port must be 0..65535, not {port}")
    return port


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsServer
    server_version = "cosock-agent"

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def _answer(self, head: bool) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics here")
            return
        from .client import metrics

        try:
            body = metrics(self.server.agent_path).encode()
        except Exception as exc:  # the agent is stopping, or busy beyond the timeout
            self.send_error(503, f"agent did not answer: {exc}")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics http: " + format, *args)


class _MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, agent_path: Path) -> None:
        self.agent_path = agent_path
        super().__init__((METRICS_HOST, port), _Handler)


class MetricsEndpoint:
    """``http://127.0.0.1:<port>/metrics`` served from a daemon thread until :meth:`close`.

    Raises:
        MetricsPortError: bad port number, or it cannot be bound (in use, no permission).
    """

    def __init__(self, port: int, agent_path: Path) -> None:
        check_port(port)
        try:
            self._server = _MetricsServer(port, agent_path)
        except OSError as exc:
            raise MetricsPortError(
                f"cannot serve metrics on {METRICS_HOST}:{port}: {exc.strerror or exc}"
            ) from exc
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="cosock-metrics-http", daemon=True
        )
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", METRICS_HOST, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
