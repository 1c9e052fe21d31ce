"""A loopback proxy that lets redshift-connector talk to a plain PostgreSQL server.

redshift-connector speaks the PostgreSQL wire protocol, but expects Redshift's answers. Against
PostgreSQL 15 four things go wrong; the driver's `ssl=False` avoids the first, and this proxy
smooths the other three during the start-up exchange, then copies bytes both ways:

(a) SSL: the driver asks for SSL first; a test server has none. Connect with `ssl=False` (the
    proxy also answers "no" to an SSLRequest itself, so the driver says "Server refuses SSL").
(b) SCRAM: PostgreSQL ends its list of SASL mechanisms with an empty string; the driver keeps
    that empty name and scramp rejects it. The proxy drops the list terminator from the
    AuthenticationSASL message so the driver reads exactly the mechanisms offered. Only for
    redshift-connector (a start-up message with its `driver_version` parameter): a standard
    client such as connectorx's rust-postgres reads the list up to the terminator, as the
    protocol says, and is left alone.
(c) Start-up parameters: the driver always sends Redshift-only ones (`client_protocol_version`,
    `driver_version`, `os_version`, `driver_discovery_version`, and `plugin_name`, `idp_type`…
    with identity providers) that PostgreSQL rejects as unrecognized configuration parameters.
    The proxy forwards only parameters PostgreSQL knows (`user`, `database`, `application_name`,
    `options`, `client_encoding`…) and records the ones it dropped in `stats.dropped_params`.
(d) `server_version`: PostgreSQL reports e.g. `15.20 (Debian 15.20-0+deb12u1)`, which the
    driver cannot parse. The proxy reports `8.0.2` instead, as Redshift does (so the driver also
    takes its Redshift code paths, e.g. not trusting row counts of FETCH).

One more smoothing, after start-up, so tests can see Redshift's SUPER type: with
`jsonb_as_super=True` (the default) a result column of PostgreSQL type `jsonb` is announced to the
driver with Redshift's SUPER type OID 4000 in RowDescription messages; the driver then reads it as
text, as it reads SUPER from Redshift (JSON text). Every other message passes unchanged.

A CancelRequest is forwarded as is, so a connector can cancel a running query through the proxy.
The proxy runs in threads of the test process: `RedshiftProxy(host, port).start()`, `.port`,
`.reset_connections()` (abort every open connection, like a network reset), `.stop()`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
PROTOCOL_3 = 196608

#: Start-up parameters a PostgreSQL server accepts (anything else is a configuration parameter it
#: would reject when unknown). `_pq_.*` protocol options pass too.
POSTGRES_STARTUP_KEYS = {"user", "database", "options", "replication", "application_name", "client_encoding",
                         "datestyle", "timezone", "extra_float_digits", "search_path", "statement_timeout",
                         "geqo", "intervalstyle"}

JSONB_OID = 3802
SUPER_OID = 4000


@dataclass
class ProxyStats:
    connections: int = 0
    cancels: int = 0
    dropped_params: set[str] = field(default_factory=set)
    server_versions: list[str] = field(default_factory=list)
    sasl_fixed: int = 0
    super_columns: int = 0


def _close(sock: socket.socket) -> None:
    """Shut down, then close. Only shutdown() wakes another thread blocked in recv() or accept()
    on the socket and makes the kernel send the FIN: a bare close() from another thread leaves
    the connection open under that thread, and the peer would wait for ever."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed during start-up")
        buf += chunk
    return bytes(buf)


def _read_startup_packet(sock: socket.socket) -> bytes:
    (length,) = struct.unpack("!I", _recv_exact(sock, 4))
    if not 8 <= length <= 10_000:
        raise ConnectionError(f"bad start-up packet length {length}")
    return _recv_exact(sock, length - 4)


def _rewrite_startup(payload: bytes, stats: ProxyStats) -> bytes:
    """Keep only start-up parameters PostgreSQL knows."""
    parts = payload[4:].split(b"\0")
    pairs = list(zip(parts[0::2], parts[1::2], strict=False))
    kept = bytearray(payload[:4])
    for key, value in pairs:
        if not key:
            break
        name = key.decode("utf-8", "replace")
        if name.lower() in POSTGRES_STARTUP_KEYS or name.startswith("_pq_."):
            kept += key + b"\0" + value + b"\0"
        else:
            stats.dropped_params.add(name)
    kept += b"\0"
    return struct.pack("!I", len(kept) + 4) + bytes(kept)


class ServerStream:
    """Walks the server's message stream (type byte + int32 length + body) and rewrites the few
    messages that need it; everything else is copied through without being held."""

    def __init__(self, proxy: RedshiftProxy, redshift_driver: bool = True):
        self.proxy = proxy
        self.redshift_driver = redshift_driver
        self.pending = b""
        self.skip = 0  # bytes of the current pass-through message still to copy

    def feed(self, data: bytes) -> bytes:
        buf = self.pending + data if self.pending else data
        self.pending = b""
        out = bytearray()
        pos, end = 0, len(buf)
        while pos < end:
            if self.skip:
                n = min(self.skip, end - pos)
                out += buf[pos:pos + n]
                pos += n
                self.skip -= n
                continue
            if end - pos < 5:
                self.pending = bytes(buf[pos:])
                break
            typ = buf[pos]
            length = int.from_bytes(buf[pos + 1:pos + 5], "big")
            if typ in b"RST":
                if end - pos < 1 + length:
                    self.pending = bytes(buf[pos:])
                    break
                out += self.rewrite(typ, bytes(buf[pos + 5:pos + 1 + length]))
                pos += 1 + length
            else:
                out += buf[pos:pos + 5]
                pos += 5
                self.skip = length - 4
        return bytes(out)

    def rewrite(self, typ: int, body: bytes) -> bytes:
        stats = self.proxy.stats
        if typ == ord("R") and self.redshift_driver and body[:4] == struct.pack("!I", 10) and body.endswith(b"\0\0"):
            body = body[:-1]  # (b) AuthenticationSASL: drop the empty-name list terminator
            stats.sasl_fixed += 1
        elif typ == ord("S"):
            key, _, rest = body.partition(b"\0")
            if key == b"server_version":
                stats.server_versions.append(rest.rstrip(b"\0").decode("utf-8", "replace"))
                body = key + b"\0" + self.proxy.server_version.encode() + b"\0"  # (d)
        elif typ == ord("T") and self.proxy.jsonb_as_super:
            body = self._super_columns(body)
        return bytes([typ]) + struct.pack("!I", len(body) + 4) + body

    def _super_columns(self, body: bytes) -> bytes:
        (count,) = struct.unpack_from("!H", body, 0)
        out = bytearray(body)
        pos = 2
        for _ in range(count):
            pos = body.index(b"\0", pos) + 1  # column name
            oid_at = pos + 6  # table oid (4) + attribute number (2)
            if struct.unpack_from("!I", body, oid_at)[0] == JSONB_OID:
                struct.pack_into("!I", out, oid_at, SUPER_OID)
                self.proxy.stats.super_columns += 1
            pos += 18  # table oid, attnum, type oid, type size, type modifier, format code
        return bytes(out)


class RedshiftProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, listen_host: str = "127.0.0.1",
                 server_version: str = "8.0.2", jsonb_as_super: bool = True):
        self.upstream = (upstream_host, upstream_port)
        self.server_version = server_version
        self.jsonb_as_super = jsonb_as_super
        self.stats = ProxyStats()
        self._listener = socket.create_server((listen_host, 0))
        self.host, self.port = self._listener.getsockname()[:2]
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> RedshiftProxy:
        t = threading.Thread(target=self._accept_loop, name=f"pg-proxy-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stopped.set()
        _close(self._listener)  # shutdown wakes the thread blocked in accept()
        self.reset_connections()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> RedshiftProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset_connections(self) -> int:
        """Abort every open connection with a TCP reset (both sides see the connection drop)."""
        with self._lock:
            socks = list(self._sockets)
        for s in socks:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            _close(s)
        return len(socks)

    # -- plumbing ----------------------------------------------------------------------------------

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._sockets.update(socks)

    def _untrack(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._sockets.discard(s)
        for s in socks:
            _close(s)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._track(client)
            t = threading.Thread(target=self._serve, args=(client,), name="pg-proxy-conn", daemon=True)
            t.start()

    def _serve(self, client: socket.socket) -> None:
        server: socket.socket | None = None
        try:
            while True:
                payload = _read_startup_packet(client)
                (code,) = struct.unpack_from("!I", payload)
                if code in (SSL_REQUEST, GSSENC_REQUEST):
                    client.sendall(b"N")  # (a) no SSL here
                    continue
                break
            server = socket.create_connection(self.upstream, timeout=10)
            server.settimeout(None)
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._track(server)
            if code == CANCEL_REQUEST:
                self.stats.cancels += 1
                server.sendall(struct.pack("!I", len(payload) + 4) + payload)
                with contextlib.suppress(OSError):
                    server.recv(1)  # the server closes when done
                return
            if code != PROTOCOL_3:
                return
            self.stats.connections += 1
            server.sendall(_rewrite_startup(payload, self.stats))  # (c)
            up = threading.Thread(target=self._pump_up, args=(client, server), name="pg-proxy-up", daemon=True)
            up.start()
            stream = ServerStream(self, redshift_driver=b"driver_version\0" in payload)
            while True:
                data = server.recv(262_144)
                if not data:
                    break
                out = stream.feed(data)
                if out:
                    client.sendall(out)
        except (OSError, ConnectionError, ValueError, struct.error):
            pass
        finally:
            self._untrack(client, *([server] if server else []))

    def _pump_up(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while True:
                data = client.recv(262_144)
                if not data:
                    break
                server.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_WR)
