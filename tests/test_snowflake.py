"""The Snowflake connector with the real snowflake-connector-python, over HTTP, against fakesnow's
server on loopback (tests/fakesnow_server.py): the conformance kit, the daemon end to end, auth,
sessions, errors, types and cancellation.

What fakesnow cannot show, and how it is tested instead:

- fakesnow accepts any password, role and warehouse. The test server puts a thin layer in front
  of it that answers a wrong password, a role not granted and an unknown warehouse the way
  Snowflake does (codes 390100, 390189, 002043, in Snowflake's response shape), so the real
  driver raises its real error classes and the connector's messages are checked end to end. The
  codes no local server produces (000606 no warehouse, 000608 suspended warehouse, OAuth 390318,
  JWT 390144, HTTP 5xx classes, statement timeout, ...) are checked by handing `translate` the
  driver's own exception classes, built as the driver builds them.
- fakesnow has no HASH_AGG: the kit's fingerprint test is the one test that skips, with that
  reason (it runs as soon as the server has HASH_AGG); the other tests use `fingerprint = false`.
- fakesnow ignores session parameters: QUERY_TAG and TIMEZONE are checked in what the driver sent
  at login. TIMESTAMP_NTZ read in the source's zone is the connector's own doing, checked on data.
- fakesnow returns a result as one chunk: the re-chunker (`ingestd.Rechunker`) is tested directly
  on uneven tables in tests/test_streams.py.
- fakesnow runs every query at once: the test server keeps a query holding `ingestd_test_slow`
  RUNNING until the client aborts it, to check that cancelling aborts the query in Snowflake.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
import uuid
from decimal import Decimal

import pyarrow as pa
import pytest

import ingestd.plugins.snowflake as snowflake_plugin
from ingestd import PermanentError, Registry, SourceInfo, TransientError, build_model
from ingestd.core.models import ConfigErrors
from ingestd.core.query import DayWindow, render
from ingestd.core.schema import Mapping, RowMapper
from ingestd.plugins.snowflake.connector import SnowflakeConfig, SnowflakeConnector, identifier, normalize, translate
from ingestd.testing import ConnectorSuite
from tests.fakesnow_server import FakeSnowServer, free_port
from tests.support import ROOT, cli_env, ingestd, sink_rows, state_query

DAY = dt.date(2026, 3, 10)
WORKER = "ingestd-snowflake-"


def driver():
    try:
        import snowflake.connector
    except ImportError:
        pytest.fail("snowflake-connector-python is not installed: ./scripts/test installs it "
                    "(pip install -e '.[test,all]')", pytrace=False)
    return snowflake.connector


@pytest.fixture(scope="module")
def server():
    fake = FakeSnowServer()
    try:
        fake.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield fake
    fake.stop()


@pytest.fixture
def db():
    """A database of the test's own in the shared fakesnow server (created at login)."""
    return f"T_{uuid.uuid4().hex[:10].upper()}"


@pytest.fixture
def sf(server, db):
    """A plain driver connection to the test's database, to create and fill tables."""
    con = driver().connect(**server.driver_kwargs(database=db, schema="PUBLIC"))
    yield con
    con.close()


def config_of(server: FakeSnowServer, db: str, **overrides) -> SnowflakeConfig:
    table = server.connection_config(database=db, schema="PUBLIC", fingerprint=False)
    table.update(overrides)
    return build_model(SnowflakeConfig, {k: v for k, v in table.items() if v is not None}, "connections.sf")


def connector_on(server: FakeSnowServer, db: str, **overrides) -> SnowflakeConnector:
    return SnowflakeConnector(config_of(server, db, **overrides), name="sf")


def day_query(sql: str, day: dt.date = DAY, timezone: str = "UTC"):
    return render(sql, DayWindow.of(day, timezone), "qmark", quote="")


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(WORKER)]


def has_hash_agg(con) -> bool:
    try:
        con.cursor().execute("SELECT HASH_AGG(1)")
        return True
    except Exception:
        return False


class SnowKitTable:
    """The kit's table in the test's fakesnow database, written with the plain driver."""

    name = "kit_events"

    def __init__(self, con):
        self.con = con
        con.cursor().execute(f"CREATE TABLE {self.name} (ts TIMESTAMP_NTZ, user_id VARCHAR, event VARCHAR, "
                             "value DOUBLE)")

    def _insert(self, rows):
        for i in range(0, len(rows), 400):
            part = rows[i:i + 400]
            self.con.cursor().execute(f"INSERT INTO {self.name} VALUES " + ", ".join(["(?, ?, ?, ?)"] * len(part)),
                                      [v for row in part for v in row])

    async def insert(self, rows):
        await asyncio.to_thread(self._insert, rows)

    async def update_value(self, user_id, value):
        await asyncio.to_thread(lambda: self.con.cursor().execute(
            f"UPDATE {self.name} SET value = ? WHERE user_id = ?", [value, user_id]))


# -- the conformance kit ---------------------------------------------------------------------

class TestSnowflakeConnector(ConnectorSuite):
    @pytest.fixture
    def kit_table(self, sf):
        return SnowKitTable(sf)

    @pytest.fixture
    async def connector(self, server, db, request):
        fingerprint = request.node.name.startswith("test_fingerprint")
        c = connector_on(server, db, fingerprint=fingerprint)
        yield c
        await c.close()

    @pytest.fixture
    def broken_connector(self, server, db):
        return connector_on(server, db, port=free_port(), login_timeout_seconds=1)

    async def test_fingerprint_is_stable_and_sees_a_changed_value_at_equal_count(self, connector, kit_table, sf):
        if not has_hash_agg(sf):
            pytest.skip("fakesnow has no HASH_AGG, which the probe's fingerprint uses; this runs against a server "
                        "that has it")
        await super().test_fingerprint_is_stable_and_sees_a_changed_value_at_equal_count(connector, kit_table)


# -- plugin and configuration ----------------------------------------------------------------

def test_registers_the_snowflake_type_and_declares_its_api():
    registry = Registry()
    snowflake_plugin.ingestd_register(registry)
    assert registry.connectors["snowflake"] is SnowflakeConnector
    assert snowflake_plugin.INGESTD_API == (2, 2)
    caps = SnowflakeConnector.capabilities
    assert caps.fingerprint and caps.paramstyle == "qmark"


def test_the_plugin_imports_without_the_driver_and_says_how_to_install_it(tmp_path):
    code = textwrap.dedent("""
        import asyncio, sys
        sys.modules["snowflake"] = None
        sys.modules["snowflake.connector"] = None
        from ingestd import PermanentError, build_model
        from ingestd.plugins.snowflake.connector import SnowflakeConfig, SnowflakeConnector
        c = SnowflakeConnector(build_model(SnowflakeConfig, {"account": "a", "user": "u", "password": "pw-1"}, "c"),
                               name="sf")
        try:
            asyncio.run(c.check())
        except PermanentError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=cli_env(),
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'ingestd[snowflake]'" in out.stdout


def sample_config() -> str:
    """The plugin's documented sample configuration (plugins/snowflake/sample.toml)."""
    return (ROOT / "plugins" / "snowflake" / "sample.toml").read_text()


def test_the_sample_config_is_valid_and_every_commented_key_exists(monkeypatch):
    monkeypatch.setenv("SNOWFLAKE_PASSWORD", "pw")
    monkeypatch.setenv("SNOWFLAKE_KEY_PASSPHRASE", "pp")
    table = tomllib.loads(sample_config())["connections"]["NAME"]
    assert table.pop("type") == "snowflake"
    cfg = build_model(SnowflakeConfig, table, "connections.NAME")
    assert cfg.password.reveal() == "pw" and cfg.role == "INGESTD_READER"
    commented = {}
    for line in sample_config().splitlines():
        if line.startswith("# ") and " = " in line:
            commented.update(tomllib.loads(line[2:]))
    known = {f for f in SnowflakeConfig.__dataclass_fields__}
    assert all(k in known or k.removesuffix("_env").removesuffix("_file") in known for k in commented), commented
    keypair = {k: v for k, v in table.items() if k != "password_env"}
    keypair.update(private_key_file=commented["private_key_file"],
                   private_key_passphrase_env=commented["private_key_passphrase_env"])
    assert build_model(SnowflakeConfig, keypair, "c").private_key_passphrase.reveal() == "pp"
    everything = {**table, **{k: v for k, v in commented.items()
                              if not k.startswith(("private_key", "token"))}}
    assert build_model(SnowflakeConfig, everything, "c").statement_timeout_seconds == 3600


def test_config_defaults_secrets_and_account_forms(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    cfg = build_model(SnowflakeConfig, {"account": "https://MyOrg-MyAcct.snowflakecomputing.com/", "user": "u",
                                        "password_file": str(secret)}, "connections.sf")
    assert cfg.account == "MyOrg-MyAcct" and cfg.password.reveal() == "s3cret"
    assert "s3cret" not in repr(cfg)
    assert (cfg.fingerprint, cfg.timestamp_ntz_zone, cfg.lowercase_columns, cfg.port, cfg.protocol,
            cfg.login_timeout_seconds) == (True, "source", True, 443, "https", 60)
    locator = build_model(SnowflakeConfig, {"account": "xy12345.eu-west-1", "token": "tok-1"}, "c")
    assert locator.account == "xy12345.eu-west-1" and locator.user is None
    kwargs = SnowflakeConnector(locator, name="sf").connect_kwargs(("orders", "UTC"))
    assert kwargs["authenticator"] == "oauth" and kwargs["token"] == "tok-1" and kwargs["paramstyle"] == "qmark"
    assert "host" not in kwargs and "user" not in kwargs


@pytest.mark.parametrize("table, key, words", [
    ({"account": "a", "user": "u", "password": "pw-1", "token": "tok-1"}, "connections.sf", "exactly one way"),
    ({"account": "a", "user": "u"}, "connections.sf", "got none"),
    ({"account": "a", "user": "u", "password": "pw-1", "private_key_passphrase": "pass-1"},
     "connections.sf.private_key_passphrase", "only with private_key_file"),
    ({"account": "a", "password": "pw-1"}, "connections.sf.user", "required"),
    ({"account": "a", "user": "u", "password": "pw-1", "timestamp_ntz_zone": "Mars/Base"},
     "connections.sf.timestamp_ntz_zone", "IANA"),
    ({"account": "a", "user": "u", "password": "pw-1", "session_parameters": {"timezone": "UTC"}},
     "connections.sf.session_parameters.timezone", "set by ingestd"),
    ({"account": "a b", "user": "u", "password": "pw-1"}, "connections.sf.account", "account identifier"),
    ({"account": "a", "user": "u", "password": "pw-1", "warehous": "W"}, "connections.sf.warehous", "unknown key"),
])
def test_config_errors_name_the_key(table, key, words):
    with pytest.raises(ConfigErrors) as err:
        build_model(SnowflakeConfig, table, "connections.sf")
    assert f"{key}: " in str(err.value) and words in str(err.value)


def test_identifiers_are_bare_when_snowflake_folds_them_and_quoted_otherwise():
    assert identifier("compute_wh") == "compute_wh"
    assert identifier('"My WH"') == '"My WH"'
    assert identifier('my wh"; drop') == '"my wh""; drop"'


# -- sessions and auth -----------------------------------------------------------------------

async def test_sessions_carry_query_tag_time_zone_role_and_warehouse(server, db, sf):
    SnowKitTable(sf)
    c = connector_on(server, db, statement_timeout_seconds=600)
    before = len(server.logins())
    query = day_query("SELECT * FROM kit_events WHERE ts >= {start} AND ts < {end}", timezone="Europe/Paris")
    await c.probe(query, SourceInfo("orders", "Europe/Paris"))
    await c.probe(query, SourceInfo("orders", "Europe/Paris"))
    await c.check()
    await c.close()
    logins = server.logins()[before:]
    assert len(logins) == 2, "one session per source and zone, reused by the next call"
    tagged, plain = logins
    assert json.loads(tagged["session_parameters"]["QUERY_TAG"]) == {"app": "ingestd", "connection": "sf",
                                                                     "source": "orders"}
    assert tagged["session_parameters"]["TIMEZONE"] == "Europe/Paris"
    assert tagged["session_parameters"]["STATEMENT_TIMEOUT_IN_SECONDS"] == 600
    assert (tagged["role"], tagged["warehouse"], tagged["database"], tagged["schema"]) == (
        "INGESTD_ROLE", "INGESTD_WH", db, "PUBLIC")
    assert json.loads(plain["session_parameters"]["QUERY_TAG"]) == {"app": "ingestd", "connection": "sf"}
    assert plain["session_parameters"]["TIMEZONE"] == "UTC"


async def test_key_pair_login_sends_a_jwt_signed_with_the_encrypted_key(server, db, tmp_path, monkeypatch):
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "key.p8"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"open sesame")))
    monkeypatch.setenv("SF_KEY_PASS", "open sesame")
    before = len(server.logins())
    c = connector_on(server, db, password=None, private_key_file=str(path), private_key_passphrase_env="SF_KEY_PASS")
    await c.check()
    await c.close()
    login = server.logins()[before]
    assert login["authenticator"] == "SNOWFLAKE_JWT" and not login["password_given"]
    claims = jwt.decode(login["token"], key.public_key(), algorithms=["RS256"])
    assert claims["sub"].endswith(f".{server.user.upper()}")

    wrong = connector_on(server, db, password=None, private_key_file=str(path), private_key_passphrase="nope")
    with pytest.raises(PermanentError, match="wrong private_key_passphrase") as err:
        await wrong.check()
    assert "nope" not in str(err.value)
    missing = connector_on(server, db, password=None, private_key_file=str(path))
    with pytest.raises(PermanentError, match="give private_key_passphrase"):
        await missing.check()
    assert len(server.logins()) == before + 1, "a key that cannot be loaded never reaches Snowflake"


async def test_oauth_login_sends_the_token(server, db):
    before = len(server.logins())
    c = connector_on(server, db, password=None, token="tok-123")
    await c.check()
    await c.close()
    login = server.logins()[before]
    assert (login["authenticator"], login["token"]) == ("OAUTH", "tok-123")


async def test_bad_credentials_are_permanent_with_snowflakes_code_and_no_secret(server, db):
    c = connector_on(server, db, password="not-the-password")
    with pytest.raises(PermanentError) as err:
        await c.check()
    assert err.value.code == "390100 (28000)"
    assert str(err.value).startswith("[390100 (28000)] Snowflake refused the login of user ingestd: the user name "
                                     "or password is wrong. Snowflake says: Incorrect username or password")
    assert "not-the-password" not in str(err.value)


async def test_check_says_when_the_role_is_not_granted(server, db):
    with pytest.raises(PermanentError) as err:
        await connector_on(server, db, role="ANALYST").check()
    assert err.value.code.startswith("390189")
    assert "role ANALYST is not granted to user ingestd" in str(err.value)


async def test_check_says_when_the_warehouse_is_missing_or_not_granted(server, db):
    with pytest.raises(PermanentError) as err:
        await connector_on(server, db, warehouse="BIG_WH").check()
    assert err.value.code == "002043 (02000)"
    assert "warehouse BIG_WH does not exist, or role INGESTD_ROLE has no USAGE on it" in str(err.value)


async def test_check_says_when_a_table_is_missing_or_not_granted(server, db):
    c = connector_on(server, db)
    await c.check()
    with pytest.raises(PermanentError) as err:
        await c.check(day_query("SELECT * FROM orders_raw WHERE ts >= {start} AND ts < {end}"))
    assert err.value.code.startswith("002003")
    assert "does not exist, or that role INGESTD_ROLE may not read" in str(err.value)
    assert "ORDERS_RAW" in str(err.value).upper()


async def test_bad_sql_is_permanent_with_its_code(server, db, sf):
    SnowKitTable(sf)
    c = connector_on(server, db)
    with pytest.raises(PermanentError) as err:
        await c.probe(day_query("SELEC ts FROM kit_events WHERE ts >= {start} AND ts < {end}"))
    assert err.value.code == "001003 (42000)"
    assert str(err.value).startswith("[001003 (42000)] the query is not valid Snowflake SQL. Snowflake says:")


async def test_a_query_without_placeholders_is_filtered_on_the_bare_mapped_column(server, db, sf):
    kit = SnowKitTable(sf)
    await kit.insert([(dt.datetime(2026, 3, 10, 12), "in", "e", 1.0), (dt.datetime(2026, 3, 11), "out", "e", 2.0)])
    c = connector_on(server, db)
    assert c.capabilities.quote == "" and connector_on(server, db, lowercase_columns=False).capabilities.quote == '"'
    query = render("SELECT ts, user_id FROM kit_events", DayWindow.of(DAY), "qmark", filter_column="ts",
                   quote=c.capabilities.quote)
    assert "ingestd_q.ts >= ?" in query.sql
    batches = [b async for b in c.fetch(query, 10)]
    assert [r["user_id"] for b in batches for r in b.to_pylist()] == ["in"]
    await c.close()


async def test_probe_asks_for_hash_agg_when_fingerprints_are_on(server, db, sf):
    SnowKitTable(sf)
    c = connector_on(server, db, fingerprint=True)
    query = day_query("SELECT * FROM kit_events WHERE ts >= {start} AND ts < {end}")
    if has_hash_agg(sf):
        assert (await c.probe(query)).fingerprint is not None
    else:  # fakesnow: its refusal shows the probe's SQL, sorted as a permanent error
        with pytest.raises(PermanentError, match="(?i)hash_agg"):
            await c.probe(query)
    await c.close()


# -- transient failures ----------------------------------------------------------------------

async def test_an_expired_session_is_replaced_by_a_new_login(server, db, sf):
    SnowKitTable(sf)
    c = connector_on(server, db)
    query = day_query("SELECT * FROM kit_events WHERE ts >= {start} AND ts < {end}")
    assert (await c.probe(query)).rows == 0
    before = len(server.logins())
    server.expire_sessions()  # Snowflake's 390114 from now on for every open session
    assert (await c.probe(query)).rows == 0
    assert len(server.logins()) == before + 1
    await c.close()


async def test_http_5xx_is_transient_and_the_next_call_works(server, db, sf):
    SnowKitTable(sf)
    c = connector_on(server, db, network_timeout_seconds=1)
    query = day_query("SELECT * FROM kit_events WHERE ts >= {start} AND ts < {end}")
    await c.probe(query)
    server.fail_queries(503, 1000)
    try:
        with pytest.raises(TransientError) as err:
            await c.probe(query)
    finally:
        server.fail_queries(503, 0)
    assert err.value.code == "HTTP 503"
    assert (await c.probe(query)).rows == 0
    await c.close()


async def test_an_unreachable_server_is_transient(server, db):
    c = connector_on(server, db, port=free_port(), login_timeout_seconds=2)
    started = time.monotonic()
    with pytest.raises(TransientError) as err:
        await c.check()
    assert err.value.code == "250001" and "cannot reach Snowflake at 127.0.0.1" in str(err.value)
    assert time.monotonic() - started < 30


def snowflake_errors():
    e = driver().errors
    return [
        (e.ProgrammingError(msg="No active warehouse selected in the current session.  Select an active warehouse "
                                "with the 'use warehouse' command.", errno=606, sqlstate="57P03"),
         PermanentError, "000606 (57P03)", "no warehouse is in use"),
        (e.ProgrammingError(msg="Warehouse 'WH' is suspended.  Use 'alter warehouse WH resume;' command if you need "
                                "to use it again.", errno=608, sqlstate="57P03"),
         TransientError, "000608 (57P03)", "is suspended"),
        (e.DatabaseError(msg="Failed to connect to DB: x.snowflakecomputing.com:443. OAuth access token expired. "
                             "[1234]", errno=390318, sqlstate="08001"),
         PermanentError, "390318 (08001)", "OAuth token: it has expired"),
        (e.DatabaseError(msg="Failed to connect to DB: x:443. JWT token is invalid.", errno=390144, sqlstate="28000"),
         PermanentError, "390144 (28000)", "key-pair login"),
        (e.DatabaseError(msg="Failed to connect to DB: x:443. JWT token is invalid. [fingerprint mismatch]",
                         errno=394304, sqlstate="28000"),
         PermanentError, "394304 (28000)", "key-pair login"),
        (e.ServiceUnavailableError(), TransientError, "HTTP 503", "HTTP 503"),
        (e.InternalServerError(), TransientError, "HTTP 500", "HTTP 500"),
        (e.TooManyRequests(), TransientError, "HTTP 429", "HTTP 429"),
        (e.ForbiddenError(), PermanentError, "HTTP 403", "network policy"),
        (e.HttpError(msg="401 Unauthorized: post x/queries/v1/query-request", errno=290401, sqlstate="08001"),
         TransientError, "HTTP 401", "session expired"),
        (e.OperationalError(msg="Could not connect to Snowflake backend after 2 attempt(s).Aborting", errno=250001),
         TransientError, "250001", "cannot reach Snowflake"),
        (e.ProgrammingError(msg="Authentication token has expired.  The user must authenticate again.",
                            errno=390114), TransientError, "390114", "session expired"),
        (e.ProgrammingError(msg="SQL execution internal error: Processing aborted due to error 300002:1234;",
                            errno=603, sqlstate="XX000"), TransientError, "000603 (XX000)", "right now"),
        (e.ProgrammingError(msg="SQL compilation error: error line 1 at position 7\ninvalid identifier 'TSX'",
                            errno=904, sqlstate="42000"), PermanentError, "000904 (42000)", "column"),
        (e.ProgrammingError(msg="SQL compilation error:\nObject 'DB.S.T' does not exist or not authorized.",
                            errno=2003, sqlstate="42S02"), PermanentError, "002003 (42S02)", "may not read"),
        (e.ProgrammingError(msg="Statement reached its statement or warehouse timeout of 10 second(s) and was "
                                "canceled.", errno=630, sqlstate="57014"),
         PermanentError, "000630 (57014)", "statement timeout"),
        (e.ProgrammingError(msg="Numeric value 'abc' is not recognized", errno=100038, sqlstate="22018"),
         PermanentError, "100038 (22018)", "could not be converted"),
        (ConnectionResetError(104, "Connection reset by peer"), TransientError, None, "will be retried"),
    ]


def test_driver_errors_are_sorted_with_snowflakes_code_and_a_plain_sentence():
    cfg = build_model(SnowflakeConfig, {"account": "acme-prod", "user": "INGESTD", "password": "pw-1", "role": "R",
                                        "warehouse": "WH"}, "c")
    for exc, cls, code, words in snowflake_errors():
        out = translate(exc, cfg)
        assert type(out) is cls, (exc, out)
        assert out.code == code, (exc, out.code)
        assert words in str(out), (exc, str(out))
        assert "Failed to connect to DB" not in str(out)
    bug = ValueError("a bug")
    assert translate(bug, cfg) is bug


# -- cancellation and streaming --------------------------------------------------------------

async def test_a_cancelled_probe_aborts_its_query_in_snowflake(server, db, sf):
    SnowKitTable(sf)
    c = connector_on(server, db)
    slow = day_query("SELECT ts AS ingestd_test_slow FROM kit_events WHERE ts >= {start} AND ts < {end}")
    before = len(server.aborted())
    task = asyncio.create_task(c.probe(slow))
    await asyncio.sleep(0.5)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 15)
    assert len(server.aborted()) == before + 1
    assert (await c.probe(day_query("SELECT * FROM kit_events WHERE ts >= {start} AND ts < {end}"))).rows == 0
    await c.close()


async def test_a_fetch_cancelled_while_its_query_runs_aborts_it_and_stops_the_worker(server, db, sf):
    SnowKitTable(sf)
    c = connector_on(server, db)
    slow = day_query("SELECT ts AS ingestd_test_slow FROM kit_events WHERE ts >= {start} AND ts < {end}")
    before = len(server.aborted())

    async def consume():
        async for _ in c.fetch(slow, 10):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 15)
    assert len(server.aborted()) == before + 1
    assert workers() == []
    await c.close()


async def test_closing_a_stream_midway_stops_the_worker_and_keeps_the_session(server, db, sf):
    kit = SnowKitTable(sf)
    start = dt.datetime(2026, 3, 10)
    await kit.insert([(start + dt.timedelta(seconds=i), f"u{i}", "e", float(i)) for i in range(1000)])
    c = connector_on(server, db)
    query = day_query("SELECT * FROM kit_events WHERE ts >= {start} AND ts < {end}")
    before = len(server.logins())
    stream = c.fetch(query, 10)
    first = await anext(stream)
    assert first.num_rows == 10
    await asyncio.sleep(0.2)
    await stream.aclose()
    assert workers() == [], "the worker thread ends with the stream"
    assert (await c.probe(query)).rows == 1000
    assert len(server.logins()) == before + 1, "the stopped stream's session was reused"
    await c.close()


# -- types -----------------------------------------------------------------------------------

TYPED = """
CREATE TABLE typed (ts_ntz TIMESTAMP_NTZ, ts_ltz TIMESTAMP_LTZ, ts_tz TIMESTAMP_TZ, amount NUMBER(10,2),
                    n NUMBER(38,0), f FLOAT, ok BOOLEAN, name VARCHAR, d DATE, v VARIANT, o OBJECT, a ARRAY)
"""
TYPED_ROWS = """
INSERT INTO typed SELECT column1::TIMESTAMP_NTZ, '2026-03-10T09:00:00Z', '2026-03-10T10:00:00+02:00', 12.34, 7,
    1.5, TRUE, 'signup', '2026-03-10', PARSE_JSON('{"a": 1, "b": [1, 2]}'), OBJECT_CONSTRUCT('plan', 'pro',
    'seats', 3), ARRAY_CONSTRUCT(1, 2, 3)
FROM VALUES ('2026-03-09 23:59:59'), ('2026-03-10 01:02:03'), ('2026-03-10 23:30:00'), ('2026-03-11 00:00:00')
"""


async def test_snowflake_types_arrive_as_arrow_types_and_map_to_the_schema(server, db, sf):
    """The source is in Los Angeles: its day 2026-03-10 is [07:00Z, 07:00Z next day), and its
    TIMESTAMP_NTZ values are wall-clock times there (documented default `timestamp_ntz_zone =
    "source"`): the day query binds {start}/{end} as LA wall-clock times, so exactly the two NTZ
    rows of the LA day come back, read as 08:02:03Z and 06:30Z next day."""
    cur = sf.cursor()
    cur.execute(TYPED)
    cur.execute(TYPED_ROWS)
    c = connector_on(server, db)
    query = day_query("SELECT * FROM typed WHERE ts_ntz >= {start} AND ts_ntz < {end}", timezone="America/Los_Angeles")
    assert (await c.probe(query)).rows == 2
    batches = [b async for b in c.fetch(query, 1000, SourceInfo("typed", "America/Los_Angeles"))]
    assert len(batches) == 1
    batch = batches[0]
    utc = pa.timestamp("us", tz="UTC")
    assert dict(zip(batch.schema.names, batch.schema.types, strict=True)) == {
        "ts_ntz": utc, "ts_ltz": utc, "ts_tz": utc, "amount": pa.decimal128(10, 2), "n": pa.int64(),
        "f": pa.float64(), "ok": pa.bool_(), "name": pa.string(), "d": pa.date32(), "v": pa.string(),
        "o": pa.string(), "a": pa.string()}
    rows = batch.to_pylist()
    assert [r["ts_ntz"] for r in rows] == [dt.datetime(2026, 3, 10, 8, 2, 3, tzinfo=dt.UTC),
                                           dt.datetime(2026, 3, 11, 6, 30, tzinfo=dt.UTC)]
    first = rows[0]
    assert first["ts_ltz"] == dt.datetime(2026, 3, 10, 9, tzinfo=dt.UTC)
    assert first["ts_tz"] == dt.datetime(2026, 3, 10, 8, tzinfo=dt.UTC)
    assert (first["amount"], first["n"], first["f"], first["ok"], first["name"], first["d"]) == (
        Decimal("12.34"), 7, 1.5, True, "signup", DAY)
    assert json.loads(first["v"]) == {"a": 1, "b": [1, 2]}
    assert json.loads(first["o"]) == {"plan": "pro", "seats": 3}
    assert json.loads(first["a"]) == [1, 2, 3]

    window = DayWindow.of(DAY, "America/Los_Angeles")
    now = dt.datetime(2026, 3, 12, tzinfo=dt.UTC)
    events = RowMapper("events", Mapping(timestamp="ts_ntz", event_name="name", event_value="amount",
                                         ids={"user_id": "n"}, metadata=["ok", "d", "f", "ts_tz"],
                                         metadata_json="o"), window, source="typed", generation=1, ingested_at=now)
    metrics = RowMapper("metrics", Mapping(date="d", ids={"user_id": "name"}, metric_name="name",
                                           metric_value="amount"), window, source="typed", generation=1,
                        ingested_at=now)
    try:
        mapped = events.map(batch)
        assert mapped.rejects == {}
        out = mapped.rows.to_pylist()
        assert [r["timestamp"] for r in out] == [r["ts_ntz"] for r in rows]
        assert (out[0]["event_name"], out[0]["event_value"], out[0]["unit_id"]) == ("signup", "12.34", "7")
        meta = json.loads(out[0]["metadata"])
        assert meta["plan"] == "pro" and meta["seats"] == 3 and meta["ok"] is True and meta["f"] == 1.5
        assert meta["d"] == "2026-03-10"
        m = metrics.map(batch)
        assert m.rejects == {} and m.rows.column("metric_value").to_pylist() == [12.34, 12.34]
    finally:
        events.close()
        metrics.close()
    await c.close()


async def test_timestamp_ntz_zone_can_say_the_columns_hold_utc(server, db, sf):
    cur = sf.cursor()
    cur.execute(TYPED)
    cur.execute(TYPED_ROWS)
    c = connector_on(server, db, timestamp_ntz_zone="UTC")
    query = day_query("SELECT ts_ntz FROM typed WHERE ts_ntz >= {start} AND ts_ntz < {end}",
                      timezone="America/Los_Angeles")
    batches = [b async for b in c.fetch(query, 10)]
    assert [v for b in batches for v in b.column(0).to_pylist()] == [  # the LA day is [07:00Z, 07:00Z)
        dt.datetime(2026, 3, 10, 23, 30, tzinfo=dt.UTC), dt.datetime(2026, 3, 11, tzinfo=dt.UTC)]


def test_normalize_lowercases_snowflake_names_and_puts_timestamps_in_utc():
    table = pa.table({
        "TS": pa.array([dt.datetime(2026, 11, 1, 1, 30)], pa.timestamp("ns")),
        "LTZ": pa.array([dt.datetime(2026, 11, 1, 1, 30, tzinfo=dt.UTC)], pa.timestamp("ns", tz="America/Denver")),
        "Mixed": pa.array([1], pa.int8()),
        "ID": pa.array([2], pa.int16()),
        "id": pa.array([3], pa.int64()),
    })
    out = normalize(table, "America/Los_Angeles")
    assert out.schema.names == ["ts", "ltz", "Mixed", "ID", "id"]
    assert out.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert out.column("ts").to_pylist() == [dt.datetime(2026, 11, 1, 8, 30, tzinfo=dt.UTC)]  # PDT, first of two
    assert out.column("ltz").to_pylist() == [dt.datetime(2026, 11, 1, 1, 30, tzinfo=dt.UTC)]
    assert out.schema.field("Mixed").type == pa.int64()
    assert normalize(table, "UTC", lowercase=False).schema.names == table.schema.names


# -- the daemon end to end -------------------------------------------------------------------

D = dt.date(2026, 11, 20)

E2E_CONFIG = """
[daemon]
state_path = "state.db"
batch_rows = 128
retry_attempts = 2
retry_base_seconds = 0.05
retry_max_seconds = 0.2

[bus]
enabled = false

[sinks.main]
type = "duckdb"
path = "analytics.duckdb"

[connections.sf]
type = "snowflake"
account = "fakesnow"
user = "{user}"
password_env = "SF_TEST_PASSWORD"
role = "INGESTD_ROLE"
warehouse = "INGESTD_WH"
database = "{db}"
schema = "PUBLIC"
fingerprint = false              # fakesnow has no HASH_AGG
host = "127.0.0.1"
port = {port}
protocol = "http"
login_timeout_seconds = 10

[sources.orders]
connection = "sf"
kind = "events"
query = "SELECT ts, user_id, event, value, props FROM events_raw WHERE ts >= {{start}} AND ts < {{end}}"
schedule = ["0 6 * * *"]
lag_days = 1

[sources.orders.recheck]
schedule = ["0 18 * * *"]
lookback_days = 1
threshold_pct = 1.0
detect = "count"

[sources.orders.mapping]
timestamp = "ts"
event_name = "event"
event_value = "value"
ids = {{ user_id = "user_id" }}
metadata_json = "props"
"""


def add_events(con, day: dt.date, n: int, first: int = 0) -> None:
    """`n` events on `day`, 17 s apart from midnight (`first` offsets ids and times)."""
    i = f"(seq4() + {int(first)})"
    con.cursor().execute(
        f"INSERT INTO events_raw SELECT TIMESTAMPADD(second, {i} * 17, TO_TIMESTAMP_NTZ(?)), 'u' || {i}, 'click', "
        f"{i}::VARCHAR, OBJECT_CONSTRUCT('k', 1) FROM TABLE(GENERATOR(ROWCOUNT => {int(n)}))",
        [dt.datetime(day.year, day.month, day.day)])


def test_the_daemon_loads_a_snowflake_day_and_reloads_it_when_it_grew(tmp_path, server, db, sf):
    sf.cursor().execute("CREATE TABLE events_raw (ts TIMESTAMP_NTZ, user_id VARCHAR, event VARCHAR, value VARCHAR, "
                        "props VARIANT)")
    add_events(sf, D, 500)
    add_events(sf, D + dt.timedelta(days=1), 50, first=5000)  # the next day must not leak in
    cfg = tmp_path / "daemon.toml"
    cfg.write_text(E2E_CONFIG.format(user=server.user, db=db, port=server.port))
    env = cli_env(SF_TEST_PASSWORD=server.password)
    at = lambda hh: dt.datetime(2026, 11, 21, hh, 5, tzinfo=dt.UTC).isoformat()  # noqa: E731

    out = ingestd("run", "--once", "--now", at(6), config=cfg, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    part = "SELECT status, generation, rows FROM partitions WHERE source = 'orders' AND day = ?"
    assert state_query(tmp_path / "state.db", part, (D.isoformat(),)) == [("succeeded", 1, 500)]
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 500
    assert server.password not in out.stdout + out.stderr

    # issue 16: a preview's row limit runs in Snowflake (LIMIT on the wrapped day query)
    out = ingestd("preview", "orders", "--day", D.isoformat(), "--rows", "7", "--json", config=cfg, env=env)
    p = json.loads(out.stdout)
    assert (p["rows_read"], p["mapped"], p["limit"], p["ok"]) == (7, 7, "in the warehouse", True), out.stderr
    assert p["rows"][0]["metadata"] == {"k": 1}

    add_events(sf, D, 20, first=1000)  # +4%: past threshold_pct
    out = ingestd("run", "--once", "--now", at(18), config=cfg, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"schema.changed"' not in out.stdout, "the re-check's schema probe must see the loaded schema"
    assert state_query(tmp_path / "state.db", part, (D.isoformat(),)) == [("succeeded", 2, 520)]
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 520
    runs = state_query(tmp_path / "state.db", "SELECT trigger, status FROM runs WHERE day = ? ORDER BY started_at",
                       (D.isoformat(),))
    assert runs == [("scheduled", "succeeded"), ("recheck", "succeeded")]

    import duckdb
    with duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True) as con:
        row = con.execute("SELECT timestamp, event_name, unit_id, metadata, generation FROM events "
                          "WHERE source = 'orders' AND unit_id = 'u1'").fetchone()
    assert row[0] == dt.datetime(2026, 11, 20, 0, 0, 17, tzinfo=dt.UTC)
    assert (row[1], row[2], json.loads(row[3]), row[4]) == ("click", "u1", {"k": 1}, 2)


def test_the_daemon_reports_bad_credentials_as_a_failed_run_with_the_reason(tmp_path, server, db, sf):
    sf.cursor().execute("CREATE TABLE events_raw (ts TIMESTAMP_NTZ, user_id VARCHAR, event VARCHAR, value VARCHAR, "
                        "props VARIANT)")
    cfg = tmp_path / "daemon.toml"
    cfg.write_text(E2E_CONFIG.format(user=server.user, db=db, port=server.port))
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=cli_env(SF_TEST_PASSWORD="wrong-pw"))
    assert out.returncode == 1
    reason = state_query(tmp_path / "state.db", "SELECT reason FROM runs")[0][0]
    assert reason.startswith("[390100 (28000)] Snowflake refused the login of user ingestd")
    assert "wrong-pw" not in out.stdout + out.stderr + reason


def test_checksum_on_a_connection_without_fingerprints_is_a_config_error(tmp_path):
    """`fingerprint = false` on the connection and `detect = "checksum"` on a source cannot both
    hold: the config is refused with the source's key named, before anything connects."""
    text = E2E_CONFIG.format(user="nobody", db="nodb", port=9).replace('detect = "count"', 'detect = "checksum"')
    assert "\nfingerprint = false" in text
    cfg = tmp_path / "daemon.toml"
    cfg.write_text(text)
    out = ingestd("check", config=cfg, env=cli_env(SF_TEST_PASSWORD="x"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert (f'{cfg}: sources.orders.recheck.detect: connection \'sf\' is configured without content '
            'fingerprints; use detect = "count"') in out.stderr
    cfg.write_text(text.replace("fingerprint = false", "fingerprint = true"))
    out = ingestd("check", config=cfg, env=cli_env(SF_TEST_PASSWORD="x"))
    assert "recheck.detect" not in out.stderr


@pytest.mark.parametrize("slicing", ['slices = 2', 'slices = 2\nslice_column = "n"', 'slices = 3\nslice_column = "N"'])
def test_a_sliced_source_loads_exactly_the_days_rows(tmp_path, server, db, sf, slicing):
    """`slices` on a Snowflake source: each slice's query is built from the connection's own
    capabilities (with `lowercase_columns`, names are bare so Snowflake folds them: `n` finds the
    column N), and the K worker processes' rows together are the day's rows, once each."""
    sf.cursor().execute("CREATE TABLE events_raw (ts TIMESTAMP_NTZ, user_id VARCHAR, event VARCHAR, value VARCHAR, "
                        "props VARIANT)")
    add_events(sf, D, 500)
    add_events(sf, D + dt.timedelta(days=1), 50, first=5000)
    add_events(sf, D - dt.timedelta(days=1), 40, first=3000)
    sf.cursor().execute("ALTER TABLE events_raw ADD COLUMN n INTEGER")
    sf.cursor().execute("UPDATE events_raw SET n = TRY_TO_NUMBER(value) - 250")  # negatives too
    sf.cursor().execute("UPDATE events_raw SET n = NULL WHERE value = '7'")
    text = E2E_CONFIG.format(user=server.user, db=db, port=server.port).replace(
        "SELECT ts, user_id, event, value, props FROM", "SELECT ts, user_id, event, value, props, n FROM").replace(
        'lag_days = 1\n', f'lag_days = 1\n{slicing}\n', 1)
    assert slicing in text
    cfg = tmp_path / "daemon.toml"
    cfg.write_text(text)
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=cli_env(SF_TEST_PASSWORD=server.password))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "succeeded: generation 1, 500 rows" in out.stdout
    import duckdb
    with duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True) as con:
        units = [r[0] for r in con.execute("SELECT unit_id FROM events WHERE source = 'orders' ORDER BY unit_id")
                 .fetchall()]
    assert sorted(units) == sorted(f"u{i}" for i in range(500)), "every row of the day once, none of its neighbours"
