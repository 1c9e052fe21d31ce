"""fakesnow in server mode on a free loopback port, for the Snowflake tests.

`FakeSnowServer.start()` runs this module in a subprocess (`python -m tests.fakesnow_server
--port N ...`): fakesnow's own HTTP app (`fakesnow.server.app`, what `fakesnow -s` serves)
under uvicorn, waits until the port listens, and `stop()` ends it. The real
snowflake-connector-python talks to it over HTTP with `host`, `port` and `protocol="http"`.

fakesnow checks no credential, grant or warehouse, and its queries always finish at once. A thin
layer in front of it answers the few things the tests need the way Snowflake answers them, with
Snowflake's own response shapes and codes, so the real driver parses real-looking replies:

- a login with another password than `--password` gets `390100 Incorrect username or password
  was specified.`; a role not in `--roles` gets `390189 Role '...' specified in the connect string
  is not granted to this user.`
- `USE WAREHOUSE X` for a warehouse not in `--warehouses` gets `002043 SQL compilation error:
  Object does not exist, or operation cannot be performed.`
- `POST /ingestd-test/expire-sessions`: every open session then gets `390114 Authentication token
  has expired. The user must authenticate again.`, as after Snowflake's 4 hours of idleness.
- `POST /ingestd-test/fail?status=503&count=N`: the next N query requests get that HTTP status.
- an asynchronous query whose text holds `ingestd_test_slow` stays RUNNING until the client
  sends `/queries/<id>/abort-request` (fakesnow has no such route); aborted ids are listed at
  `GET /ingestd-test/aborted`.
- `GET /ingestd-test/logins` lists what each login asked for (user, authenticator, role,
  warehouse, database, schema, session parameters, token), to check what the driver sent.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs

ROOT = Path(__file__).resolve().parent.parent
SLOW_MARKER = "ingestd_test_slow"


class FakeSnowServer:
    """A fakesnow server process on 127.0.0.1; `connection_config()` gives the connector keys."""

    def __init__(self, *, password: str = "snow", roles: tuple[str, ...] = ("INGESTD_ROLE", "PUBLIC"),
                 warehouses: tuple[str, ...] = ("INGESTD_WH",), user: str = "ingestd"):
        self.password = password
        self.roles = roles
        self.warehouses = warehouses
        self.user = user
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> FakeSnowServer:
        if importlib.util.find_spec("fakesnow") is None or importlib.util.find_spec("uvicorn") is None:
            raise RuntimeError("fakesnow[server] is not installed in this environment: ./scripts/test installs it "
                               "(it is in the `test` extra: pip install -e '.[test]')")
        last = ""
        for _ in range(3):  # a free port can be taken between finding and binding it: try another
            self.port = free_port()
            cmd = [sys.executable, "-m", "tests.fakesnow_server", "--port", str(self.port),
                   "--password", self.password, "--roles", ",".join(self.roles),
                   "--warehouses", ",".join(self.warehouses)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + (
                [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                        return self
                except OSError:
                    time.sleep(0.05)
            if self.proc.poll() is None:
                self.stop()
                raise RuntimeError(f"fakesnow did not listen on 127.0.0.1:{self.port} within {timeout}s")
            last = self.proc.stderr.read() if self.proc.stderr else ""
        raise RuntimeError(f"fakesnow server exited at start:\n{last[-3000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connection_config(self, **overrides) -> dict:
        """The `[connections.NAME]` keys of a snowflake connection to this server."""
        return {"account": "fakesnow", "user": self.user, "password": self.password, "host": "127.0.0.1",
                "port": self.port, "protocol": "http", "role": self.roles[0], "warehouse": self.warehouses[0],
                "login_timeout_seconds": 10, "network_timeout_seconds": 10, **overrides}

    def driver_kwargs(self, **overrides) -> dict:
        """snowflake.connector.connect() keyword arguments, for tests that write tables directly."""
        return {"account": "fakesnow", "user": self.user, "password": self.password, "host": "127.0.0.1",
                "port": self.port, "protocol": "http", "paramstyle": "qmark", "login_timeout": 10,
                "network_timeout": 10, **overrides}

    def control(self, method: str, path: str):
        import urllib.request
        req = urllib.request.Request(f"{self.url}/ingestd-test/{path}", method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def logins(self) -> list[dict]:
        return self.control("GET", "logins")

    def aborted(self) -> list[str]:
        return self.control("GET", "aborted")

    def expire_sessions(self) -> None:
        self.control("POST", "expire-sessions")

    def fail_queries(self, status: int, count: int) -> None:
        self.control("POST", f"fail?status={status}&count={count}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the server process ------------------------------------------------------------------------

def snowflake_error(code: str, message: str, sqlstate: str | None = None, status: int = 200) -> tuple[int, dict]:
    data = {"errorCode": code, **({"sqlState": sqlstate} if sqlstate else {})}
    return status, {"data": data, "code": code, "message": message, "success": False, "headers": None}


def build_app(password: str | None, roles: set[str] | None, warehouses: set[str] | None):
    """fakesnow's app behind the layer described in the module docstring (a plain ASGI app)."""
    import fakesnow.server as fs
    from starlette.responses import JSONResponse

    inner = fs.app
    logins: list[dict] = []
    expired: set[str] = set()
    failures: dict[str, int] = {"status": 0, "count": 0}
    running: set[str] = set()
    aborted: list[str] = []

    async def read_body(receive) -> bytes:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        return body

    def token_of(scope) -> str:
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                return value.decode()[17:-1]  # Snowflake Token="..."
        return ""

    def ident(text: str) -> str:
        text = text.strip()
        return text[1:-1].replace('""', '"') if text.startswith('"') else text.upper()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return await inner(scope, receive, send)
        path = scope["path"]
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}

        async def answer(status: int, payload) -> None:
            await JSONResponse(payload, status_code=status)(scope, receive, send)

        if path.startswith("/ingestd-test/"):
            what = path.removeprefix("/ingestd-test/")
            if what == "logins":
                return await answer(200, logins)
            if what == "aborted":
                return await answer(200, aborted)
            if what == "expire-sessions":
                expired.update(fs.sessions)
                return await answer(200, {"expired": len(fs.sessions)})
            if what == "fail":
                failures.update(status=int(query["status"]), count=int(query["count"]))
                return await answer(200, failures)
            return await answer(404, {"error": f"unknown control {what}"})

        if path.endswith("/abort-request") and path.startswith("/queries/") and path != "/queries/v1/abort-request":
            qid = path.split("/")[2]
            running.discard(qid)
            aborted.append(qid)
            return await answer(200, {"data": None, "success": True})

        if path.startswith("/monitoring/queries/"):
            qid = path.rsplit("/", 1)[-1]
            if qid in running:
                return await answer(200, {"data": {"queries": [{"id": qid, "status": "RUNNING"}]}, "success": True})
            if qid in aborted:
                return await answer(200, {"data": {"queries": [{"id": qid, "status": "ABORTING"}]}, "success": True})

        raw = await read_body(receive)
        body = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        if token_of(scope) in expired:
            return await answer(*snowflake_error(
                "390114", "Authentication token has expired.  The user must authenticate again."))

        if path == "/session/v1/login-request":
            data = json.loads(body)["data"]
            params = dict(data.get("SESSION_PARAMETERS") or {})
            logins.append({"user": data.get("LOGIN_NAME"), "authenticator": data.get("AUTHENTICATOR", "SNOWFLAKE"),
                           "token": data.get("TOKEN"), "password_given": "PASSWORD" in data,
                           "application": data.get("CLIENT_APP_ID"), "role": query.get("roleName"),
                           "warehouse": query.get("warehouse"), "database": query.get("databaseName"),
                           "schema": query.get("schemaName"), "session_parameters": params})
            if password is not None and "PASSWORD" in data and data["PASSWORD"] != password:
                return await answer(*snowflake_error("390100", "Incorrect username or password was specified."))
            role = query.get("roleName")
            if roles is not None and role and ident(role) not in roles:
                return await answer(*snowflake_error(
                    "390189", f"Role '{ident(role)}' specified in the connect string is not granted to this user. "
                              "Contact your local system administrator, or attempt to login with another role, "
                              "e.g. PUBLIC."))
            return await inner(scope, replay, send)

        if path == "/queries/v1/query-request":
            if failures["count"] > 0:
                failures["count"] -= 1
                return await JSONResponse({"message": "injected failure"}, status_code=failures["status"])(
                    scope, receive, send)
            request = json.loads(body)
            sql = request.get("sqlText", "")
            words = sql.split(None, 2)
            if (warehouses is not None and len(words) == 3 and words[0].upper() == "USE"
                    and words[1].upper() == "WAREHOUSE" and ident(words[2]) not in warehouses):
                return await answer(*snowflake_error(
                    "002043", "SQL compilation error:\nObject does not exist, or operation cannot be performed.",
                    "02000"))
            if SLOW_MARKER in sql and request.get("asyncExec"):
                qid = str(uuid.uuid4())
                running.add(qid)
                return await answer(200, {"code": "333334", "message": "Asynchronous execution in progress.",
                                          "success": True,
                                          "data": {"queryId": qid, "getResultUrl": f"/queries/{qid}/result"}})
        return await inner(scope, replay, send)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fakesnow server for ingestd's tests")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--password")
    parser.add_argument("--roles")
    parser.add_argument("--warehouses")
    args = parser.parse_args(argv)
    import uvicorn
    upper = lambda text: {w.strip().upper() for w in text.split(",") if w.strip()} if text else None  # noqa: E731
    app = build_app(args.password, upper(args.roles), upper(args.warehouses))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
