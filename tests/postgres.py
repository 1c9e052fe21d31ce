"""A throw-away PostgreSQL cluster for tests: initdb in a temporary folder, one postgres process
on a free loopback port, password (SCRAM) auth over TCP, and no durability (fsync off) for speed.

It never touches the machine's own PostgreSQL (port 5432 or its sockets). As root, initdb and
postgres run as the `postgres` OS user (PostgreSQL refuses to run as root) in a folder owned by
it; as any other user they run as that user.

    from tests.postgres import postgres_cluster   # a module-scoped fixture: import it into a test module

    def test_something(postgres_cluster):
        with postgres_cluster.connect() as con:    # psycopg, as the superuser
            con.execute("CREATE TABLE t (i int)")

`start_postgres()` gives the same cluster outside pytest (the benchmark scripts use it).
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "pg-test-superuser"

FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "64MB",
    "max_connections": "40",
    "max_wal_size": "1GB",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "autovacuum": "off",
    "log_min_messages": "warning",
    "log_connections": "off",
    "timezone": "UTC",
    "password_encryption": "scram-sha-256",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_bindir() -> Path:
    """The newest /usr/lib/postgresql/*/bin with initdb and postgres (or the ones on PATH)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    for initdb in reversed(candidates):
        bindir = Path(initdb).parent
        if (bindir / "postgres").exists():
            return bindir
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(on_path).parent
    pytest.fail("PostgreSQL server binaries (initdb, postgres) are not installed: run ./scripts/test, "
                "which installs the `postgresql` package (or apt-get install postgresql)", pytrace=False)
    raise AssertionError("unreachable")


def _stop_with_parent():
    """A function for the server's process to run before exec: a fast shutdown (SIGINT) when the
    test process dies, however it dies (Linux only; elsewhere atexit and the fixture's teardown
    stop it). libc is loaded here, in the test process: after the switch to the postgres user the
    child may not be able to read this Python's files."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGINT), 0, 0, 0)  # PR_SET_PDEATHSIG


@dataclass
class PostgresCluster:
    folder: Path
    port: int
    bindir: Path
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    settings: dict[str, str] = field(default_factory=dict)
    _owns_folder: bool = True

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "postgres.log"

    def dsn(self, user: str = SUPERUSER, password: str = SUPERUSER_PASSWORD, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={user} password={password} dbname={dbname} connect_timeout=10"

    def connect(self, user: str = SUPERUSER, password: str = SUPERUSER_PASSWORD, dbname: str = "postgres",
                autocommit: bool = True):
        """A psycopg connection (autocommit by default)."""
        import psycopg
        return psycopg.connect(self.dsn(user, password, dbname), autocommit=autocommit)

    def execute(self, sql: str, params=None, *, dbname: str = "postgres") -> list[tuple]:
        """Run one statement as the superuser; return its rows (if any)."""
        with self.connect(dbname=dbname) as con:
            cur = con.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def create_user(self, name: str, password: str) -> None:
        from psycopg import sql
        with self.connect() as con:
            con.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))

    def create_database(self, name: str, owner: str | None = None) -> None:
        from psycopg import sql
        with self.connect() as con:
            stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if owner:
                stmt += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
            con.execute(stmt)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- life cycle ------------------------------------------------------------------------------

    def _as_owner(self) -> dict:
        if os.geteuid() != 0:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": []}


    def init(self) -> PostgresCluster:
        pwfile = self.folder / "pwfile"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        if os.geteuid() == 0:
            import pwd
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root, but there is no `postgres` OS user to run PostgreSQL as: "
                            "run ./scripts/test, which installs the postgresql package", pytrace=False)
            for path in (self.folder, pwfile):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        out = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}",
             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
            capture_output=True, text=True, timeout=120, **self._as_owner())
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        # Only loopback TCP with passwords; nothing on the machine's default socket directory.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n")
        return self

    def start(self, timeout: float = 30) -> PostgresCluster:
        settings = {**FAST_SETTINGS, **self.settings, "listen_addresses": self.host, "port": str(self.port),
                    "unix_socket_directories": str(self.folder)}
        args = [str(self.bindir / "postgres"), "-D", str(self.data)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        log = open(self.log, "ab")
        try:
            # Same process group as the tests: a Ctrl-C in the terminal also stops it (fast shutdown).
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_stop_with_parent(),
                                         **self._as_owner())
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with self.connect() as con:
                    con.execute("SELECT 1")
                return self
            except Exception:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"postgres did not accept connections within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown: ends open sessions, no waiting for clients
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def cleanup(self) -> None:
        self.stop()
        if self._owns_folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres(settings: dict[str, str] | None = None) -> PostgresCluster:
    """initdb + start a cluster in a new temporary folder; call `.cleanup()` when done."""
    bindir = find_bindir()
    # Not under pytest's tmp_path: the postgres user must be able to enter the folder.
    folder = Path(tempfile.mkdtemp(prefix="ingestd-pg-"))
    cluster = PostgresCluster(folder=folder, port=free_port(), bindir=bindir, settings=dict(settings or {}))
    try:
        cluster.init().start()
    except BaseException:
        cluster.cleanup()
        raise
    atexit.register(cluster.cleanup)  # a test process that dies early leaves no server behind
    return cluster


@pytest.fixture(scope="module")
def postgres_cluster():
    """A fresh PostgreSQL cluster for one test module, stopped and removed at its end."""
    cluster = start_postgres()
    try:
        yield cluster
    finally:
        cluster.cleanup()
        atexit.unregister(cluster.cleanup)
