"""No secret in any channel (issue 15): a canary in every secret-bearing key of every built-in
plugin, a query and connections whose errors carry canaries, then every CLI command, a daemon
run with the bus on (every MQTT message captured by a subscriber to `#`), a failing load and a
backfill; the canaries appear in no output, no MQTT message, no state-store table and no file
the daemon wrote besides the config and the secret files themselves.

This test grows with the channels: a new channel (HTTP answers, webhooks) is added here."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import signal
import sqlite3
import subprocess
from pathlib import Path

import aiomqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.broker import Mosquitto, find, free_port
from tests.http_support import call
from tests.support import Warehouse, cli_env, ingestd, spawn_ingestd, wait_for
from tests.test_bus import Collector, request
from tests.test_webhook import HookServer

D = dt.date(2026, 11, 20)


def canary(name: str) -> str:
    return f"Zq9{name}{secrets.token_hex(6)}"


CANARIES = {k: canary(k) for k in ("bus", "rs", "rskey", "sfpw", "sfpass", "sftoken", "bqid", "bqkey", "dbxtoken",
                                   "dbxsecret", "hook")}
CANARIES["http"] = canary("httptoken") + "x" * 8  # the listener wants a token of 16 characters or more


def rsa_pem(passphrase: str | None = None) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    crypt = (serialization.BestAvailableEncryption(passphrase.encode()) if passphrase
             else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, crypt).decode()


def config(tmp_path: Path, port: int, http_port: int, hook_url: str) -> Path:
    sf_key = tmp_path / "sf_key.p8"
    sf_key.write_text(rsa_pem(CANARIES["sfpass"]))
    bq_key_pem = rsa_pem()
    (tmp_path / "bq_key.json").write_text(json.dumps({
        "type": "service_account", "project_id": "canary-project", "private_key_id": CANARIES["bqid"],
        "private_key": bq_key_pem, "client_email": "ingestd@canary-project.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": "http://127.0.0.1:9/token"}))
    CANARIES["bqpem"] = bq_key_pem.splitlines()[5]  # a line of the key body: scrubbed as one of its fields
    closed = free_port()
    table = f"events_{CANARIES['bus']}_{CANARIES['rs']}"
    text = f'''
[daemon]
state_path = "state.db"
batch_rows = 1000
retry_attempts = 1
retry_base_seconds = 0.05

[bus]
enabled = true
port = {port}
base_topic = "ingestd/test"
username = "ingestd"
password_env = "CANARY_BUS"
keepalive = 5
reconnect_max_seconds = 1.0

[sinks.main]
type = "duckdb"
path = "analytics.duckdb"

[http]
port = {http_port}
token_env = "CANARY_HTTP"
refresh_seconds = 0

[observers.hook]
type = "webhook"
url = "{hook_url}"
events = ["*"]
secret_env = "CANARY_HOOK"

[connections.wh]
type = "duckdb"
path = "warehouse.duckdb"

[connections.rs]
type = "redshift"
host = "127.0.0.1"
port = {closed}
database = "dev"
user = "ingestd"
password_env = "CANARY_RS"
ssl = false
timeout = 2
iam = false

[connections.rsiam]
type = "redshift"
host = "127.0.0.1"
port = {closed}
database = "dev"
user = "ingestd"
iam = true
cluster_identifier = "canary"
region = "us-west-2"
access_key_id_env = "CANARY_RSKEY"
secret_access_key_env = "CANARY_RSKEY"
ssl = true

[connections.sf]
type = "snowflake"
account = "canary"
user = "INGESTD"
password_env = "CANARY_SFPW"
host = "127.0.0.1"
port = {closed}
protocol = "http"
login_timeout_seconds = 2
network_timeout_seconds = 2

[connections.sfkey]
type = "snowflake"
account = "canary"
user = "INGESTD"
private_key_file = "sf_key.p8"
private_key_passphrase_env = "CANARY_SFPASS"
host = "127.0.0.1"
port = {closed}
protocol = "http"
login_timeout_seconds = 2
network_timeout_seconds = 2

[connections.sftoken]
type = "snowflake"
account = "canary"
token_env = "CANARY_SFTOKEN"
host = "127.0.0.1"
port = {closed}
protocol = "http"
login_timeout_seconds = 2
network_timeout_seconds = 2

[connections.bq]
type = "bigquery"
project = "canary-project"
credentials_file = "bq_key.json"
api_endpoint = "http://127.0.0.1:{closed}"
retry_seconds = 1.0
use_storage_api = false

[connections.dbx]
type = "databricks"
server_hostname = "127.0.0.1"
port = {closed}
http_path = "/sql/1.0/warehouses/canary"
access_token_env = "CANARY_DBXTOKEN"
retry_seconds = 1.0

[connections.dbxm2m]
type = "databricks"
server_hostname = "127.0.0.1"
port = {closed}
http_path = "/sql/1.0/warehouses/canary"
client_id = "ingestd-sp"
client_secret_env = "CANARY_DBXSECRET"
retry_seconds = 1.0

[sources.orders]
connection = "wh"
kind = "events"
query = "SELECT ts, user_id, event FROM events_raw WHERE ts >= {{start}} AND ts < {{end}}"
schedule = ["0 0 * * *"]
[sources.orders.recheck]
schedule = []
lookback_days = 1
[sources.orders.mapping]
timestamp = "ts"
event_name = "event"
ids = {{ user_id = "user_id" }}

[sources.leaky]
connection = "wh"
kind = "events"
query = "SELECT ts, user_id, event FROM \\"{table}\\" WHERE ts >= {{start}} AND ts < {{end}}"
schedule = ["0 0 * * *"]
[sources.leaky.recheck]
schedule = []
lookback_days = 1
[sources.leaky.mapping]
timestamp = "ts"
event_name = "event"
ids = {{ user_id = "user_id" }}
'''
    for name in ("rs", "rsiam", "sf", "sfkey", "sftoken", "bq", "dbx", "dbxm2m"):
        text += f'''
[sources.via_{name}]
connection = "{name}"
kind = "events"
enabled = false
query = "SELECT ts, user_id, event FROM events_raw WHERE ts >= {{start}} AND ts < {{end}}"
schedule = ["0 0 * * *"]
[sources.via_{name}.mapping]
timestamp = "ts"
event_name = "event"
ids = {{ user_id = "user_id" }}
'''
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    return path


@pytest.fixture
def secure_broker(tmp_path):
    folder = tmp_path / "broker"
    folder.mkdir()
    users = {"ingestd": CANARIES["bus"], "operator": "operator-pw-c41d2"}
    for i, (user, pw) in enumerate(users.items()):
        subprocess.run([find("mosquitto_passwd"), *(["-c"] if i == 0 else []), "-b", str(folder / "passwd"), user, pw],
                       check=True)
    broker = Mosquitto(folder, extra_conf=f"allow_anonymous false\npassword_file {folder / 'passwd'}\n").start()
    yield broker
    broker.stop()


class Everything(Collector):
    """Every message on the broker (`#`), as the operator."""

    async def _run(self):
        try:
            async with aiomqtt.Client("127.0.0.1", self.port, username="operator", password="operator-pw-c41d2") as c:
                await c.subscribe("#", qos=1)
                self.ready.set()
                async for m in c.messages:
                    self.messages.append((str(m.topic), m.payload.decode(errors="replace"), m.retain))
        except aiomqtt.MqttError:
            return


def state_dump(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return "\n".join(con.iterdump())
    finally:
        con.close()


@pytest.fixture
def hook_server():
    server = HookServer()
    yield server
    server.close()


def test_no_canary_reaches_any_channel(tmp_path, secure_broker, hook_server):
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    warehouse.add_events(D, 30)
    http_port = free_port()
    base = f"http://127.0.0.1:{http_port}"
    cfg = config(tmp_path, secure_broker.port, http_port, hook_server.url)
    env = cli_env(CANARY_HTTP=CANARIES["http"], CANARY_HOOK=CANARIES["hook"],
                  CANARY_BUS=CANARIES["bus"], CANARY_RS=CANARIES["rs"], CANARY_RSKEY=CANARIES["rskey"],
                  CANARY_SFPW=CANARIES["sfpw"], CANARY_SFPASS=CANARIES["sfpass"], CANARY_SFTOKEN=CANARIES["sftoken"],
                  CANARY_DBXTOKEN=CANARIES["dbxtoken"], CANARY_DBXSECRET=CANARIES["dbxsecret"],
                  INGESTD_BUS_USERNAME="operator", INGESTD_BUS_PASSWORD="operator-pw-c41d2")
    outputs: list[str] = []

    def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        out = ingestd(*args, config=cfg, env=env, timeout=timeout)
        outputs.extend([out.stdout, out.stderr])
        return out

    check = cli("check", timeout=240)
    assert check.returncode == 1 and "FAILED leaky" in check.stdout, check.stdout + check.stderr
    assert "***" in check.stdout, "the failing query's error must carry the (masked) canary"
    failed = cli("load", "leaky", "--day", D.isoformat())
    assert failed.returncode == 1 and "***" in failed.stdout
    cli("load", "orders", "--day", D.isoformat())
    cli("backfill", "leaky", "--from", D.isoformat(), "--to", D.isoformat())
    for args in (["status"], ["status", "--json"], ["usage"], ["usage", "--json"], ["plugins"], ["plugins", "--json"],
                 ["config", "show"], ["run", "--once", "--now", "2026-11-21T00:05:00Z"]):
        cli(*args)

    watcher = Everything(secure_broker.port, [])
    proc = spawn_ingestd("run", config=cfg, env=env)
    try:
        wait_for(lambda: any('"online"' in p for _, p, _ in watcher.messages), what="online")
        for command, body in (("status", {}), ("status", {"source": "leaky"}),
                              ("backfill", {"source": "leaky", "from": "2026-11-19", "to": "2026-11-20"}),
                              ("reload", {"source": "leaky", "day": D.isoformat()}),
                              ("backfill", {"source": CANARIES["rs"], "from": "2026-11-19", "to": "2026-11-20"})):
            answer, _, _ = asyncio.run(request(secure_broker.port, command, body, username="operator",
                                               password="operator-pw-c41d2"))
            outputs.append(json.dumps(answer))
        wait_for(lambda: any("backfill.done" in p for _, p, _ in watcher.messages), what="the backfill")
        wait_for(lambda: sum("load.failed" in p for _, p, _ in watcher.messages) >= 3, what="the failed loads")
        cli("request", "status")
        cli("status", "--json")
        cli("status", "--calendar")
        answers = [call("GET", f"{base}{path}") for path in ("/", "/metrics", "/healthz", "/readyz",
                                                               "/api/v1/status", "/api/v1/status?source=leaky",
                                                               "/api/v1/calendar")]
        answers += [call("POST", f"{base}/api/v1/reload", json.dumps({"source": "leaky", "day": D.isoformat()})
                         .encode(), token=CANARIES["http"]),
                    call("POST", f"{base}/api/v1/backfill", json.dumps({"source": CANARIES["rs"], "from": "2026-11-19",
                                                                          "to": "2026-11-20"}).encode(),
                         token=CANARIES["http"]),
                    call("POST", f"{base}/api/v1/reload", b"{}", token="wrong-token-0123456789")]
        assert answers[0][0] == 200 and "leaky" in answers[0][1]
        outputs += [f"{status} {json.dumps(body) if not isinstance(body, str) else body} {json.dumps(headers)}"
                    for status, body, headers in answers]
        wait_for(lambda: len(hook_server.requests) >= 3, what="webhook deliveries")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    outputs += [proc.stdout.read(), proc.stderr.read()]
    messages = [f"{t} {p}" for t, p, _ in watcher.messages if "/request/" not in t]  # requests are the test's own
    assert any("load.failed" in m and "***" in m for m in messages), "a failed load's event carries the masked canary"
    stored = state_dump(tmp_path / "state.db")
    assert "***" in stored
    files = [p.read_bytes().decode(errors="replace") for p in tmp_path.rglob("*")
             if p.is_file() and p.name not in ("daemon.toml", "sf_key.p8", "bq_key.json", "passwd")
             and "broker" not in p.parts]
    hooks = [json.dumps(r["headers"]) + r["body"].decode(errors="replace") for r in hook_server.requests]
    assert any("load.failed" in h and "***" in h for h in hooks), "a webhook carries the masked canary"
    channels = {"cli, daemon and http output": outputs, "mqtt": messages, "state store": [stored], "files": files,
                "webhooks": hooks}
    for name, value in CANARIES.items():
        for channel, texts in channels.items():
            leaks = [t for t in texts if value in t]
            assert not leaks, f"canary {name} reached {channel}: {leaks[0][max(0, leaks[0].find(value) - 200):][:400]}"


def test_file_modes_are_owner_only(tmp_path):
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    warehouse.add_events(D, 5)
    from tests.support import write_config
    cfg = write_config(tmp_path, lookback=1)
    ingestd("load", "orders", "--day", D.isoformat(), config=cfg, check=True)
    for name in ("state.db", "analytics.duckdb", "state.db.lock"):
        mode = (tmp_path / name).stat().st_mode & 0o777
        assert mode == 0o600, f"{name} is {oct(mode)}"
    cfg.write_text(cfg.read_text().replace("[daemon]\n", '[daemon]\numask = "022"\n', 1))
    (tmp_path / "open").mkdir()
    cfg.write_text(cfg.read_text().replace('path = "analytics.duckdb"', 'path = "open/analytics.duckdb"'))
    ingestd("load", "orders", "--day", D.isoformat(), config=cfg, check=True)
    assert (tmp_path / "open" / "analytics.duckdb").stat().st_mode & 0o777 == 0o644


def test_short_inline_secrets_are_refused_and_say_how_to_give_them(tmp_path):
    from tests.support import write_config
    cfg = write_config(tmp_path, bus='enabled = false\npassword = "ab1"')
    out = ingestd("check", config=cfg)
    assert out.returncode == 2
    assert "bus.password: an inline secret must be at least 4 characters" in out.stderr
