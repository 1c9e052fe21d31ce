"""MQTT plumbing shared by the bus server and the request client: the base topic and a
configured aiomqtt client (protocol version, TLS, credentials)."""

from __future__ import annotations

import contextlib
import socket

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..core.config import BusSection


def base_topic(bus: BusSection, instance: str) -> str:
    return bus.base_topic or f"ingestd/{instance}"


def publish_properties() -> Properties:
    """Empty MQTT 5 properties for a PUBLISH packet."""
    return Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho 2 leaves __init__ unannotated


def make_client(bus: BusSection, client_id: str, *, will: aiomqtt.Will | None = None,
                username: str | None = None, password: str | None = None) -> aiomqtt.Client:
    tls = None
    if bus.tls or bus.ca_file:
        tls = aiomqtt.TLSParameters(ca_certs=bus.ca_file, certfile=bus.cert_file, keyfile=bus.key_file)
    protocol = aiomqtt.ProtocolVersion.V5 if bus.protocol == "5" else aiomqtt.ProtocolVersion.V311
    return aiomqtt.Client(
        bus.host, bus.port, identifier=client_id, protocol=protocol, will=will, keepalive=bus.keepalive,
        username=username if username is not None else bus.username,
        password=password if password is not None else (bus.password.reveal() if bus.password else None),
        tls_params=tls, timeout=10.0)


def send_without_delay(client: aiomqtt.Client) -> None:
    """Turn off Nagle's algorithm on the client's socket. paho leaves it on, and an answer that
    follows the PUBACK of its request then waits for the broker's delayed ACK (~40 ms on Linux),
    capping a daemon at about 20 requests a second. aiomqtt exposes no socket: this reaches
    paho's through aiomqtt's `_client`; should that change, requests are merely slower."""
    with contextlib.suppress(AttributeError, OSError):
        sock = client._client.socket()  # noqa: SLF001
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
