"""Send one request to a running daemon over MQTT and wait for its answer (`ingestd request`)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from typing import Any

from ..core.config import BusSection
from .mqtt import base_topic, make_client, publish_properties, send_without_delay


async def send_request(bus: BusSection, instance: str, command: str, body: dict[str, Any], *, timeout: float = 10.0,
                       username: str | None = None, password: str | None = None) -> dict[str, Any]:
    """Publish one request and wait for its answer (MQTT 5 response topic + correlation data,
    or `response/<command>` matched on `transaction` under MQTT 3.1.1)."""
    base = base_topic(bus, instance)
    token = f"cli-{socket.gethostname()}-{random.getrandbits(48):012x}"
    body = {**body, "transaction": body.get("transaction", token)}
    client_id = f"ingestd-cli-{random.getrandbits(32):08x}"
    async with make_client(bus, client_id, username=username, password=password) as client:
        send_without_delay(client)
        props = None
        if bus.protocol == "5":
            reply = f"{base}/response/{command}/{token}"
            props = publish_properties()
            props.ResponseTopic = reply
            props.CorrelationData = token.encode()
        else:
            reply = f"{base}/response/{command}"
        await client.subscribe(reply, qos=1)
        await client.publish(f"{base}/request/{command}", json.dumps(body).encode(), qos=1, properties=props)
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                try:
                    result = json.loads(message.payload)
                except ValueError:
                    continue
                if isinstance(result, dict) and result.get("transaction") == body["transaction"]:
                    return result
    raise TimeoutError


async def reach_broker(bus: BusSection, *, timeout: float = 10.0, username: str | None = None,
                       password: str | None = None) -> None:
    """Connect to the broker as the daemon would (protocol, TLS, credentials) and disconnect
    (`ingestd check`). Raises `aiomqtt.MqttError` or `TimeoutError`."""
    client_id = f"ingestd-check-{random.getrandbits(32):08x}"
    async with asyncio.timeout(timeout), make_client(bus, client_id, username=username, password=password):
        pass
