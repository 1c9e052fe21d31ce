"""Apache Spark's Thrift JDBC/ODBC server (HiveThriftServer2), the stand-in for a Databricks SQL
warehouse in tests/test_databricks.py.

It speaks the same TCLIService protocol over HTTP that databricks-sql-connector's Thrift backend
uses. It comes from the pyspark wheel in its own virtual environment `.venvs/pyspark` (which
ships `spark-hive-thriftserver_2.13-*.jar`, the Hive 2.3 jars and Derby) and runs on Java 17+;
`./scripts/test` installs both (scripts/setup.d/50-pyspark.sh). A missing piece fails the tests
loudly, never skips them.

`SparkThriftServer.start()` runs one JVM: `local[2]`, HTTP transport on a free loopback port,
path `cliservice`, `hive.server2.authentication=NOSASL`, an embedded Derby metastore and the
warehouse folder under a temporary folder, a 512 MB driver heap, two shuffle partitions (the
default 200 make every aggregate slow), no per-session cache of table file listings. `kill()`
ends it with SIGKILL (a crash, for the fault test) and `start()` brings it back on the same
port with the same metastore and tables.
`rss_mib()` is the JVM's resident memory. The session fixture `spark_server` starts it once per
test session and stops it at the end.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venvs" / "pyspark"
READY_SECONDS = 120.0
SETUP_HINT = "./scripts/test installs it (scripts/setup.d/50-pyspark.sh); run that script once"

# What Spark's own launcher (bin/spark-class) adds for Java 17: Spark reaches into these modules.
JAVA_OPENS = [f"--add-opens=java.base/{p}=ALL-UNNAMED" for p in (
    "java.lang", "java.lang.invoke", "java.lang.reflect", "java.io", "java.net", "java.nio", "java.util",
    "java.util.concurrent", "java.util.concurrent.atomic", "jdk.internal.ref", "sun.nio.ch", "sun.nio.cs",
    "sun.security.action", "sun.util.calendar")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pyspark_home() -> Path:
    """The pyspark package folder of .venvs/pyspark (its jars/ hold Spark)."""
    found = sorted(glob.glob(str(VENV / "lib" / "python3*" / "site-packages" / "pyspark")))
    if not found:
        raise RuntimeError(f"{VENV} has no pyspark: {SETUP_HINT}")
    home = Path(found[-1])
    if not glob.glob(str(home / "jars" / "spark-hive-thriftserver_*.jar")):
        raise RuntimeError(f"{home}/jars has no spark-hive-thriftserver jar: {SETUP_HINT}")
    return home


def java_binary() -> str:
    java = shutil.which("java", path=os.pathsep.join(
        [str(Path(os.environ["JAVA_HOME"]) / "bin")] if os.environ.get("JAVA_HOME") else []) or None)
    java = java or shutil.which("java")
    if not java:
        raise RuntimeError(f"no `java` on PATH: the Spark Thrift server needs Java 17 (openjdk-17-jre-headless); "
                           f"{SETUP_HINT}")
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    text = out.stderr + out.stdout
    try:
        major = int(text.split('"')[1].split(".")[0])
    except (IndexError, ValueError):
        raise RuntimeError(f"cannot read the Java version from `java -version`: {text.strip()}") from None
    if major < 17:
        raise RuntimeError(f"the Spark Thrift server needs Java 17 or later, `java` is {major}: {SETUP_HINT}")
    return java


class SparkThriftServer:
    def __init__(self, *, driver_memory: str = "512m"):
        self.driver_memory = driver_memory
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.folder = Path(tempfile.mkdtemp(prefix="ingestd-spark-"))
        self.log_path = self.folder / "thriftserver.log"
        self.started_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/cliservice"

    def command(self) -> list[str]:
        home = pyspark_home()
        return [
            java_binary(), "-cp", f"{home / 'conf'}{os.pathsep}{home / 'jars'}/*", f"-Xmx{self.driver_memory}",
            "-XX:+IgnoreUnrecognizedVMOptions", *JAVA_OPENS, "-Dio.netty.tryReflectionSetAccessible=true",
            f"-Dderby.system.home={self.folder / 'derby'}", f"-Djava.io.tmpdir={self.folder / 'tmp'}",
            "org.apache.spark.deploy.SparkSubmit", "--master", "local[2]",
            "--conf", "spark.ui.enabled=false",
            "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
            "--conf", f"spark.driver.memory={self.driver_memory}",
            "--conf", "spark.sql.shuffle.partitions=2", "--conf", "spark.default.parallelism=2",
            # each Thrift session caches a table's file listing; tests rewrite tables from another
            # session (parquet has no UPDATE), so every query lists the files afresh
            "--conf", "spark.sql.filesourceTableRelationCacheSize=0",
            "--conf", f"spark.sql.warehouse.dir={self.folder / 'warehouse'}",
            "--conf", f"spark.local.dir={self.folder / 'tmp'}",
            "--class", "org.apache.spark.sql.hive.thriftserver.HiveThriftServer2", "spark-internal",
            "--hiveconf", "hive.server2.transport.mode=http",
            "--hiveconf", f"hive.server2.thrift.http.port={self.port}",
            "--hiveconf", "hive.server2.thrift.bind.host=127.0.0.1",
            "--hiveconf", "hive.server2.thrift.http.path=cliservice",
            "--hiveconf", "hive.server2.authentication=NOSASL",
            "--hiveconf", f"javax.jdo.option.ConnectionURL=jdbc:derby:;databaseName={self.folder / 'metastore_db'};"
                          "create=true",
        ]

    def start(self) -> SparkThriftServer:
        """Start the JVM (on the same port when restarting) and wait until its HTTP port answers."""
        (self.folder / "tmp").mkdir(exist_ok=True)
        if not self.port:
            self.port = free_port()
        cmd = self.command()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARK_", "PYSPARK_"))}
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.folder, env=env, start_new_session=True)
        deadline = began + READY_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Spark Thrift server exited with {self.proc.returncode} at start:\n"
                                   f"{self.log_tail()}")
            if "HiveThriftServer2 started" in self.log_path.read_text(errors="replace") and self._listens():
                self.started_seconds = time.monotonic() - began
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the Spark Thrift server did not start within {READY_SECONDS:.0f}s:\n{self.log_tail()}")

    def _listens(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash: the next start() reuses the port, metastore and warehouse."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None
        # the killed Derby leaves its lock files; the next embedded Derby recovers the database
        self.log_path.write_text(self.log_path.read_text(errors="replace").replace(
            "HiveThriftServer2 started", "HiveThriftServer2 started (before a kill)"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def rss_mib(self) -> float:
        """Resident memory of the JVM, in MiB."""
        if self.proc is None:
            return 0.0
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def spark_server():
    """One Spark Thrift server for the whole test session; stopped (and its folder removed) at the end."""
    server = SparkThriftServer()
    try:
        server.start()
    except RuntimeError as exc:
        server.cleanup()
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.cleanup()
