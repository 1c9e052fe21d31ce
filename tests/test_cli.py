"""The CLI as a user meets it: --version, global options before or after the subcommand,
positionals after options, an example in every subcommand's help, a progress bar (days, rows/s,
ETA) that log lines do not tear and NO_COLOR, in a pseudo-terminal; a pipe closed early; a
second Ctrl-C that says what it waits for; `status --calendar`; `init`; the usage errors kept."""

from __future__ import annotations

import datetime as dt
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ingestd.cli.main  # noqa: F401  (registers the subcommands)
from ingestd.cli.registry import REGISTERED
from tests.support import ROOT, cli_env, ingestd, slow_plugin, state_query, wait_for, write_config

D = dt.date(2026, 11, 20)
COLOUR = re.compile(r"\x1b\[\d+(;\d+)*m")


class Pty:
    """An `ingestd` process whose stdin, stdout and stderr are one pseudo-terminal."""

    def __init__(self, *args: str, env: dict | None = None, cwd: Path | None = None):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "ingestd", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=env or cli_env(), cwd=cwd, close_fds=True)
        os.close(slave)
        self.output = b""

    def pump(self, seconds: float = 0.1) -> bool:
        """Read what is there; False once the terminal is closed."""
        ready, _, _ = select.select([self.master], [], [], seconds)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:
            return False
        self.output += data
        return bool(data)

    def until(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.output:
            if time.monotonic() > deadline or not self.pump():
                raise AssertionError(f"no {text!r} in {self.text()!r}")

    def finish(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.pump() and time.monotonic() < deadline:
            pass
        code = self.proc.wait(max(1, deadline - time.monotonic()))
        os.close(self.master)
        return code

    def text(self) -> str:
        return self.output.decode(errors="replace")


def test_version():
    out = ingestd("--version")
    assert out.returncode == 0 and re.match(r"ingestd \d+\.\d+\.\d+ \(plugin API 2, Python 3\.", out.stdout), out.stdout


def test_global_options_before_or_after_the_subcommand(tmp_path, warehouse):
    cfg = write_config(tmp_path)
    warehouse.add_events(D, 10)
    for args in (["-c", str(cfg), "load", "orders", "--day", D.isoformat()],
                 ["load", "orders", "--day", D.isoformat(), "-c", str(cfg), "--log-level", "debug"],
                 ["--log-level", "error", "load", "--day", D.isoformat(), "orders", "--config", str(cfg)]):
        out = ingestd(*args)
        assert out.returncode == 0, (args, out.stderr)
    debug, quiet = (ingestd("load", "orders", "--day", D.isoformat(), "-c", str(cfg), "--log-level", level)
                    for level in ("debug", "error"))
    assert '"load.succeeded"' in debug.stderr and '"load.succeeded"' not in quiet.stderr
    out = ingestd("status", "-c", str(tmp_path / "nowhere.toml"))
    assert out.returncode == 2 and "nowhere.toml" in out.stderr and "config file not found" in out.stderr


def test_positionals_after_options(tmp_path, warehouse):
    cfg = write_config(tmp_path)
    out = ingestd("-c", str(cfg), "request", "backfill", "--from", "2026-11-01", "--to", "2026-11-02", "orders")
    assert out.returncode == 2 and "[bus] enabled = false" in out.stderr, out.stderr  # parsed; refused for the bus
    warehouse.add_events(D, 5)
    out = ingestd("backfill", "--from", D.isoformat(), "--to", D.isoformat(), "orders", "-c", str(cfg))
    assert out.returncode == 0 and out.stdout.strip().endswith(": done"), out.stdout + out.stderr


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_every_subcommand_help_has_an_example(name):
    out = ingestd(name, "--help")
    assert out.returncode == 0 and "example:\n  ingestd" in out.stdout, out.stdout


def _backfill_in_pty(tmp_path, warehouse, **env) -> Pty:
    for i in range(3):
        warehouse.add_events(D - dt.timedelta(days=i), 3000)
    cfg = write_config(tmp_path, connection_type="slowduck")
    return Pty("backfill", "orders", "--from", (D - dt.timedelta(days=2)).isoformat(), "--to", D.isoformat(),
               "-c", str(cfg), "--log-level", "info",
               env=cli_env([slow_plugin(tmp_path)], INGESTD_TEST_SLOW_S="0.05", TERM="xterm", **env))


def test_progress_bar_shows_days_rows_per_second_and_eta_and_logs_go_above_it(tmp_path, warehouse):
    term = _backfill_in_pty(tmp_path, warehouse)
    assert term.finish() == 0, term.text()
    text = term.text()
    assert re.search(r"\] 1/3 days  ([\d,]+|-) rows/s  ETA \d+s", COLOUR.sub("", text)), text
    assert re.search(r"\] \d/3 days  [1-9][\d,]* rows/s", COLOUR.sub("", text)), text
    assert "3/3 days" in text and "took" in text
    assert COLOUR.search(text), "no colour on a terminal"
    logs = 0
    for line in text.replace("\r\n", "\n").split("\n"):
        visible = COLOUR.sub("", line.split("\r\x1b[2K")[-1])  # what the terminal shows of the line
        if "load.succeeded" in visible or "load.started" in visible:
            logs += 1
            assert "days" not in visible and not visible.startswith("["), f"a log line torn by the bar: {visible!r}"
    assert logs == 6, text


def test_no_color(tmp_path, warehouse):
    term = _backfill_in_pty(tmp_path, warehouse, NO_COLOR="1")
    assert term.finish() == 0, term.text()
    assert "3/3 days" in term.text() and not COLOUR.search(term.text()), term.text()
    cfg = tmp_path / "daemon.toml"
    extra = [slow_plugin(tmp_path)]
    term = Pty("status", "--calendar", "-c", str(cfg), env=cli_env(extra, NO_COLOR="1", TERM="xterm"))
    assert term.finish() == 0, term.text()
    assert not COLOUR.search(term.text()) and "orders  " in term.text()
    term = Pty("status", "--calendar", "-c", str(cfg), env=cli_env(extra, TERM="xterm"))
    assert term.finish() == 0 and COLOUR.search(term.text())


def test_status_calendar_one_row_per_source(tmp_path, warehouse):
    today = dt.datetime.now(dt.UTC).date()
    warehouse.add_events(today - dt.timedelta(days=3), 10)
    warehouse.add_events(today - dt.timedelta(days=2), 10, event="z" * 200)  # fails
    cfg = write_config(tmp_path)
    for n in (3, 2):
        ingestd("load", "orders", "--day", (today - dt.timedelta(days=n)).isoformat(), config=cfg)
    out = ingestd("status", "--calendar", config=cfg)
    assert out.returncode == 0, out.stderr
    header, row, legend = out.stdout.splitlines()
    assert f"{today - dt.timedelta(days=34)} .. {today} (35 days, today last)" in header
    cells = row.split()[1]
    assert len(cells) == 35 and cells.endswith("LF..") and set(cells[:31]) == {"."}
    assert "1 failed" in row and "L loaded" in legend and "F failed" in legend
    out = ingestd("status", "--calendar", "--days", "6", "orders", config=cfg)
    assert len(out.stdout.splitlines()[1].split()[1]) == 7


def test_a_pipe_closed_early_exits_quietly(tmp_path, warehouse):
    cfg = write_config(tmp_path)
    warehouse.add_events(D, 5)
    ingestd("load", "orders", "--day", D.isoformat(), config=cfg, check=True)
    read, write = os.pipe()
    os.close(read)  # the reader went away, as `| head -3` does once it has its lines
    proc = subprocess.run([sys.executable, "-m", "ingestd", "-c", str(cfg), "status", "--days", "400"],
                          stdout=write, stderr=subprocess.PIPE, env=cli_env(), timeout=60)
    os.close(write)
    assert proc.stderr == b"" and proc.returncode == 0, proc.stderr.decode()
    shell = subprocess.run(f"'{sys.executable}' -m ingestd -c '{cfg}' status --days 400 | head -3", shell=True,
                           capture_output=True, text=True, env=cli_env(), timeout=60)
    assert len(shell.stdout.splitlines()) == 3 and "Traceback" not in shell.stderr and "Broken" not in shell.stderr


def test_a_second_ctrl_c_says_what_it_waits_for(tmp_path, warehouse):
    for i in range(2):
        warehouse.add_events(D - dt.timedelta(days=i), 6000)
    cfg = write_config(tmp_path, connection_type="slowduck", extra_daemon="max_concurrent_loads = 1")
    term = Pty("backfill", "orders", "--from", (D - dt.timedelta(days=1)).isoformat(), "--to", D.isoformat(),
               "-c", str(cfg), env=cli_env([slow_plugin(tmp_path)], INGESTD_TEST_SLOW_S="0.4", TERM="xterm"))
    wait_for(lambda: term.pump(0.05) and state_query(tmp_path / "state.db", "SELECT 1 FROM runs WHERE status = "
                                                     "'running'"), what="a running load")
    term.proc.send_signal(signal.SIGINT)
    term.until("stopping: no new day of the backfill starts")
    term.proc.send_signal(signal.SIGINT)
    term.until("still waiting for: loading orders")
    assert term.finish() == 1
    assert "stopped before its end" in term.text()
    statuses = state_query(tmp_path / "state.db", "SELECT status FROM runs")
    assert statuses == [("succeeded",)], statuses  # the running day finished; the other did not start


def test_the_daemon_says_what_a_second_ctrl_c_waits_for(tmp_path, warehouse):
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    warehouse.add_events(yesterday, 8000)
    cfg = write_config(tmp_path, connection_type="slowduck", schedule='["0 0 * * *"]', recheck="[]", lookback=1)
    term = Pty("run", "-c", str(cfg), env=cli_env([slow_plugin(tmp_path)], INGESTD_TEST_SLOW_S="0.3", TERM="xterm"))
    wait_for(lambda: term.pump(0.05) and state_query(tmp_path / "state.db", "SELECT 1 FROM runs WHERE status = "
                                                     "'running'"), what="a running load")
    term.proc.send_signal(signal.SIGINT)
    term.until("daemon.stop_requested")
    term.proc.send_signal(signal.SIGINT)
    term.until("daemon.still_stopping")
    term.until(f"loading orders {yesterday}")
    term.proc.send_signal(signal.SIGINT)  # a third: stop now, the load rolled back
    assert term.finish() == 0
    assert "daemon.stop_now" in term.text()
    assert state_query(tmp_path / "state.db", "SELECT status FROM runs") == [("failed",)]


def test_init_writes_the_shipped_config(tmp_path):
    out = ingestd("init", str(tmp_path / "etc") + "/")
    assert out.returncode == 0, out.stderr
    written = tmp_path / "etc" / "daemon.toml"
    assert written.read_text() == (ROOT / "daemon.toml").read_text()
    assert f"ingestd -c {written} run" in out.stdout
    out = ingestd("init", str(written))
    assert out.returncode == 1 and "exists already" in out.stderr
    assert ingestd("init", str(written), "--force").returncode == 0
    shown = ingestd("config", "show", "-c", str(written))
    assert shown.returncode == 0 and '"port": 8470' in shown.stdout
    proc = subprocess.run([sys.executable, "-m", "ingestd", "init"], cwd=tmp_path, capture_output=True, text=True,
                          env=cli_env(), timeout=60)
    assert proc.returncode == 0 and (tmp_path / "daemon.toml").exists() and "next: ingestd run" in proc.stdout


def test_config_show_redacts_secrets(tmp_path):
    cfg = write_config(tmp_path, bus='enabled = false\npassword = "bus-pass-123456"')
    out = ingestd("config", "show", config=cfg)
    assert out.returncode == 0 and '"password": "***"' in out.stdout and "bus-pass-123456" not in out.stdout


def test_usage_from_after_to_and_run_now_without_once_are_errors(tmp_path):
    cfg = write_config(tmp_path)
    out = ingestd("usage", "--from", "2026-11-20", "--to", "2026-11-01", config=cfg)
    assert out.returncode == 2 and "--from/--to: 2026-11-20 is after 2026-11-01" in out.stderr
    out = ingestd("usage", "--ran-from", "2026-11-20", "--ran-to", "2026-11-01", config=cfg)
    assert out.returncode == 2 and "--ran-from/--ran-to" in out.stderr
    out = ingestd("run", "--now", "2026-11-21T06:00:00Z", config=cfg)
    assert out.returncode == 2 and "--now needs --once" in out.stderr
    out = ingestd("run", "--once", "--now", "yesterday", config=cfg)
    assert out.returncode == 2 and "not an ISO-8601 time" in out.stderr
