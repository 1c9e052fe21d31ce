"""Helpers for tests of the HTTP listener: a real `ingestd run` with `[http]` on a free
loopback port, and plain HTTP calls to it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.broker import free_port
from tests.support import cli_env, wait_for, write_config

TOKEN = "test-token-0123456789abcdef"


def http_table(port: int, *, token_env: str | None = "INGESTD_TEST_TOKEN", extra: str = "") -> str:
    token = f'token_env = "{token_env}"\n' if token_env else ""
    return f"\n[http]\nport = {port}\nrefresh_seconds = 0\n{token}{extra}\n"


def call(method: str, url: str, body: bytes | None = None, *, token: str | None = None,
         content_type: str | None = "application/json", timeout: float = 30) -> tuple[int, dict | str, dict]:
    """(status, JSON body or text, headers) of one request."""
    request = urllib.request.Request(url, data=body, method=method)
    if content_type and body is not None:
        request.add_header("Content-Type", content_type)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        status, raw, headers = exc.code, exc.read(), dict(exc.headers)
    text = raw.decode()
    try:
        return status, json.loads(text), headers
    except ValueError:
        return status, text, headers


class RunningDaemon:
    """`ingestd run` on a config in `folder`, its listener on a free port."""

    def __init__(self, folder: Path, *, config: Path | None = None, env: dict | None = None, port: int | None = None,
                 token_env: str | None = "INGESTD_TEST_TOKEN", http_extra: str = "", **config_kw):
        self.folder = folder
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if config is None:
            extra = config_kw.pop("extra", "") + http_table(self.port, token_env=token_env, extra=http_extra)
            config = write_config(folder, extra=extra, **config_kw)
        self.config = config
        self.env = env or cli_env(INGESTD_TEST_TOKEN=TOKEN)
        self.out_path, self.err_path = folder / "daemon.out", folder / "daemon.err"
        self.proc = subprocess.Popen([sys.executable, "-m", "ingestd", "-c", str(config), "run"], env=self.env,
                                     stdout=self.out_path.open("w"), stderr=self.err_path.open("w"), text=True)

    def wait_listening(self, timeout: float = 60) -> None:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited {self.proc.returncode}: {self.log()}")
            try:
                return call("GET", self.url + "/healthz", timeout=2)[0] == 200
            except OSError:
                return False
        wait_for(up, timeout, what="the listener")

    def get(self, path: str):
        return call("GET", self.url + path)

    def post(self, path: str, body: dict | bytes, *, token: str | None = TOKEN, **kw):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return call("POST", self.url + path, raw, token=token, **kw)

    def stop(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.out_path.read_text(), self.err_path.read_text()

    def log(self) -> str:
        return self.out_path.read_text() + self.err_path.read_text()
