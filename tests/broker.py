"""A real mosquitto process on a free loopback port, which a test can stop and start again."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if not path:
        pytest.fail(f"{binary} is not installed: run ./scripts/test, which installs it", pytrace=False)
    return path


class Mosquitto:
    def __init__(self, folder: Path, *, extra_conf: str = "allow_anonymous true\n", port: int | None = None):
        self.folder = folder
        self.port = port or free_port()
        self.conf = folder / "mosquitto.conf"
        # `user root` matters only when the tests run as root: mosquitto would otherwise drop to the
        # mosquitto user, which cannot read the test's password file or write its persistence file.
        self.conf.write_text(f"user root\nlistener {self.port} 127.0.0.1\npersistence false\nset_tcp_nodelay true\n"
                             f"{extra_conf}")
        self.log = folder / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Mosquitto:
        binary = find("mosquitto")
        self.proc = subprocess.Popen([binary, "-c", str(self.conf), "-v"], stdout=self.log.open("ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def kill(self) -> None:
        """kill -9: no goodbye to clients, nothing saved beyond the last autosave."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
