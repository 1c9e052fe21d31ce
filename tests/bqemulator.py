"""A local BigQuery for the tests: the bqemulator package (REST + gRPC Storage API) on free
loopback ports, in its own virtual environment `.venvs/bqemulator` (its sqlglot pin conflicts
with fakesnow's, so it cannot share `.venv`); `./scripts/test` creates it
(scripts/setup.d/40-bqemulator.sh).

Use the module-scoped fixture in a test module:

    from tests.bqemulator import bqemulator  # noqa: F401  (the fixture)

    def test_x(bqemulator):
        client = bqemulator.client()

`RecordingProxy` sits between a client and the emulator's REST port: it records every request
(method, path, JSON body) and can answer what the emulator has no model for. The emulator's dry
runs always estimate 0 bytes and list no referenced tables (it has no cost model), so a test
sets `proxy.dry_run_bytes` / `proxy.dry_run_tables` to have dry runs answer like BigQuery does
on a real table; every other byte of the answer is the emulator's own. `delay_match` /
`delay_seconds` hold requests whose path contains the text, like a query that takes a while.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venvs" / "bqemulator"
PYTHON = VENV / "bin" / "python"
LAUNCHER = Path(__file__).resolve().parent / "bqemulator_launcher.py"
PROJECT = "test"
READY_SECONDS = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Emulator:
    rest_port: int
    grpc_port: int
    project: str = PROJECT
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def storage_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    def client(self, endpoint: str | None = None):
        """A google-cloud-bigquery client on the emulator (anonymous credentials)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery
        return bigquery.Client(project=self.project, credentials=AnonymousCredentials(),
                               client_options={"api_endpoint": endpoint or self.endpoint})

    def read_client(self):
        """A BigQueryReadClient on the emulator's gRPC port (plaintext)."""
        import grpc
        from google.cloud import bigquery_storage_v1
        from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport
        channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        return bigquery_storage_v1.BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=channel))

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _ready(emu: Emulator) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", emu.rest_port, timeout=2)
        conn.request("GET", f"/bigquery/v2/projects/{emu.project}/datasets")
        ok = conn.getresponse().status == 200
        conn.close()
        if not ok:
            return False
        with socket.create_connection(("127.0.0.1", emu.grpc_port), timeout=2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def running_emulator():
    """Start bqemulator on free loopback ports, wait until REST and gRPC answer, stop it after."""
    if not PYTHON.exists():
        pytest.fail(f"{VENV} is missing: the BigQuery tests run bqemulator from its own virtual environment, "
                    "which ./scripts/test creates (scripts/setup.d/40-bqemulator.sh); run that script once.",
                    pytrace=False)
    emu = Emulator(free_port(), free_port())
    with tempfile.TemporaryDirectory(prefix="bqemulator-") as tmp:
        emu.log_path = Path(tmp) / "bqemulator.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BQEMU_", "PYTHON"))}
        env.update(BQEMU_LOG_LEVEL="warning", BQEMU_ENABLE_FORMAT_EXTENSIONS="false")
        with open(emu.log_path, "wb") as log_file:
            emu.process = subprocess.Popen(
                [str(PYTHON), str(LAUNCHER), str(emu.rest_port), str(emu.grpc_port), emu.project],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=tmp)
        try:
            deadline = time.monotonic() + READY_SECONDS
            while not _ready(emu):
                if emu.process.poll() is not None:
                    pytest.fail(f"bqemulator exited with {emu.process.returncode} at start:\n{emu.log_tail()}",
                                pytrace=False)
                if time.monotonic() > deadline:
                    pytest.fail(f"bqemulator did not answer within {READY_SECONDS:.0f}s:\n{emu.log_tail()}",
                                pytrace=False)
                time.sleep(0.1)
            yield emu
        finally:
            emu.process.terminate()
            try:
                emu.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                emu.process.kill()
                emu.process.wait(timeout=15)


@pytest.fixture(scope="module")
def bqemulator():
    with running_emulator() as emu:
        yield emu


# -- a recording proxy -----------------------------------------------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "accept-encoding", "content-length"}


@dataclass
class Recorded:
    method: str
    path: str
    body: Any


@dataclass
class RecordingProxy:
    """HTTP proxy on a free loopback port in front of the emulator's REST API."""

    upstream_port: int
    port: int = 0
    requests: list[Recorded] = field(default_factory=list)
    dry_run_bytes: int | None = None
    dry_run_tables: list[dict[str, str]] = field(default_factory=list)
    delay_match: str | None = None
    delay_seconds: float = 0.0
    _server: http.server.ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def jobs(self) -> list[dict]:
        """The configuration of every query job sent (jobs.insert bodies)."""
        return [r.body["configuration"] for r in self.requests
                if r.method == "POST" and isinstance(r.body, dict) and "configuration" in r.body]

    def job_ids(self, dry_run: bool = False) -> list[str]:
        """Ids of the jobs inserted (dry runs or real ones)."""
        return [r.body["jobReference"]["jobId"] for r in self.requests
                if r.method == "POST" and isinstance(r.body, dict) and "configuration" in r.body
                and bool(r.body["configuration"].get("dryRun")) == dry_run and "jobReference" in r.body]

    def cancelled(self) -> list[str]:
        """Ids of the jobs a client asked to cancel."""
        return [r.path.split("/jobs/")[1].split("/cancel")[0] for r in self.requests
                if r.method == "POST" and "/cancel" in r.path]

    def start(self) -> RecordingProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                proxy.requests.append(Recorded(self.command, self.path, body))
                if proxy.delay_match and proxy.delay_match in self.path:
                    time.sleep(proxy.delay_seconds)  # a slow BigQuery: the job "runs" this long
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
                try:
                    upstream.request(self.command, self.path, body=raw or None, headers=headers)
                    resp = upstream.getresponse()
                    data = resp.read()
                    status, resp_headers = resp.status, resp.getheaders()
                finally:
                    upstream.close()
                if status == 200 and _is_dry_run(body):
                    data = proxy._answer_dry_run(data)
                self.send_response(status)
                for k, v in resp_headers:
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="bq-proxy", daemon=True).start()
        return self

    def _answer_dry_run(self, data: bytes) -> bytes:
        if self.dry_run_bytes is None and not self.dry_run_tables:
            return data
        doc = json.loads(data)
        stats = doc.setdefault("statistics", {})
        query = stats.setdefault("query", {})
        if self.dry_run_bytes is not None:
            value = str(self.dry_run_bytes)
            stats["totalBytesProcessed"] = query["totalBytesProcessed"] = value
            if "totalBytesProcessed" in doc:
                doc["totalBytesProcessed"] = value
        if self.dry_run_tables:
            query["referencedTables"] = list(self.dry_run_tables)
        return json.dumps(doc).encode()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _is_dry_run(body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    return bool(body.get("dryRun") or body.get("configuration", {}).get("dryRun"))


@contextlib.contextmanager
def recording_proxy(emu: Emulator):
    proxy = RecordingProxy(emu.rest_port).start()
    try:
        yield proxy
    finally:
        proxy.stop()
