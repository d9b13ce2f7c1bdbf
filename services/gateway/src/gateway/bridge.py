"""The MQTT side of the gateway: devices' uplinks to Kafka, and commands down to devices.

One MQTT v5 session per replica, with a stable client id and a session that outlives the
process, subscribed to the shared subscription `$share/<group>/devices/+/up/#` so replicas
split the devices' traffic. Every QoS 1 uplink is acknowledged to the broker (PUBACK) only
after Kafka acknowledged its event (acks=all): a replica killed at any moment leaves its
un-acked messages in its broker session, which redelivers them when it reconnects. The price
is at-least-once: a message whose PUBACK was lost arrives twice (with distinct event ids).
"""

import asyncio
import contextlib
import functools
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from aiokafka import AIOKafkaProducer
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common.contracts import device
from common.events import encode, new_event
from common.logging import RateLimitedLogger
from gateway import protocol
from gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)
SOURCE = "gateway"


@dataclass
class BridgeStats:
    """What the bridge did since start; for health, tests and the benchmark."""

    received: int = 0
    forwarded: int = 0
    dead_lettered: int = 0
    produce_failures: int = 0
    connects: int = 0
    commands_sent: int = 0


class Bridge:
    """Owns the gateway's MQTT session; `run()` keeps it connected until stopped."""

    def __init__(self, settings: GatewaySettings, producer: AIOKafkaProducer) -> None:
        self._settings = settings
        self._producer = producer
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.stats = BridgeStats()
        self._refusals = RateLimitedLogger(logger, interval_s=60.0)
        self._topics = {
            t.name: settings.topic_name(t.name)
            for t in (device.TELEMETRY, device.PRESENCE, device.REPORT, device.DEADLETTER)
        }

    @property
    def subscription(self) -> str:
        """The shared subscription all replicas use."""
        return f"$share/{self._settings.mqtt_share_group}/devices/+/up/#"

    def _new_client(self) -> aiomqtt.Client:
        s = self._settings
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = s.mqtt_session_expiry_s
        props.ReceiveMaximum = s.mqtt_receive_maximum
        client = aiomqtt.Client(
            s.mqtt_host,
            s.mqtt_port,
            username=s.mqtt_username,
            password=s.mqtt_password.get_secret_value(),
            identifier=s.mqtt_client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
            keepalive=s.mqtt_keepalive_s,
            max_inflight_messages=1000,
        )
        # aiomqtt 2.5 has no manual-ack option; its paho client does. Set before connecting so
        # no message of a resumed session is acked before Kafka has it.
        client._client.manual_ack_set(True)
        return client

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, consume and reconnect with jittered exponential backoff until `stop`."""
        delay = 0.5
        while not stop.is_set():
            try:
                async with self._new_client() as client:
                    # A resumed session first receives its backlog (up to Receive Maximum) and
                    # the SUBACK queues behind it: give it time instead of reconnecting in a loop.
                    await client.subscribe(
                        self.subscription, qos=1, timeout=self._settings.mqtt_subscribe_timeout_s
                    )
                    self._client = client
                    self.connected.set()
                    self.stats.connects += 1
                    delay = 0.5
                    logger.info("mqtt session up", extra={"subscription": self.subscription})
                    await self._consume(client, stop)
            except aiomqtt.MqttError as exc:
                logger.warning("mqtt session lost", extra={"error": str(exc)})
            finally:
                self.connected.clear()
                self._client = None
            if stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay * random.uniform(0.5, 1.0))  # noqa: S311
            delay = min(delay * 2, self._settings.mqtt_reconnect_max_s)

    async def _consume(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        session = client._client
        stopping = asyncio.create_task(stop.wait())
        messages = client.messages.__aiter__()
        try:
            while True:
                receive = asyncio.ensure_future(messages.__anext__())
                done, _ = await asyncio.wait(
                    {receive, stopping}, return_when=asyncio.FIRST_COMPLETED
                )
                if receive not in done:
                    receive.cancel()
                    return
                await self._forward(session, receive.result())
                # Drain what is already queued without the wait() bookkeeping (throughput).
                while client.messages.__len__() and not stop.is_set():
                    await self._forward(session, await messages.__anext__())
        finally:
            stopping.cancel()

    async def _forward(self, session: paho.Client, message: aiomqtt.Message) -> None:
        self.stats.received += 1
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else b""
        now = datetime.now(UTC)
        verdict = protocol.read_uplink(
            topic, payload, received_at=now, max_bytes=self._settings.max_payload_bytes
        )
        if isinstance(verdict, protocol.Accepted):
            event = new_event(
                type=verdict.topic.event_type,
                data=verdict.data,
                source=SOURCE,
                key=verdict.device_id,
                occurred_at=now,
            )
            target, dead = self._topics[verdict.topic.name], False
            key_bytes: bytes | None = verdict.device_id.encode()
        else:
            event = new_event(
                type=device.DEADLETTER.event_type,
                data=_dead_letter(topic, payload, verdict, now),
                source=SOURCE,
                key=verdict.device_id,
                occurred_at=now,
            )
            target, dead = self._topics[device.DEADLETTER.name], True
            key_bytes = verdict.device_id.encode() if verdict.device_id else None
            self._refusals.warning(
                f"{verdict.device_id}:{verdict.reason[:40]}",
                "uplink refused, dead-lettered",
                device_id=verdict.device_id,
                reason=verdict.reason[:300],
            )
        try:
            delivery = await self._producer.send(
                target,
                value=encode(event),
                key=key_bytes,
                headers=[
                    ("content-type", b"application/json"),
                    ("event-type", event.type.encode()),
                ],
            )
        except Exception as exc:  # noqa: BLE001 - any produce error: leave it un-acked, reconnect
            self._produce_failed(session, exc)
            return
        delivery.add_done_callback(
            functools.partial(self._delivered, session, message.mid, message.qos, dead)
        )

    def _delivered(
        self, session: paho.Client, mid: int, qos: int, dead: bool, delivery: "asyncio.Future[Any]"
    ) -> None:
        if delivery.cancelled() or delivery.exception() is not None:
            self._produce_failed(session, delivery.exception() or asyncio.CancelledError())
            return
        if dead:
            self.stats.dead_lettered += 1
        else:
            self.stats.forwarded += 1
        if qos > 0:
            session.ack(mid, qos)

    def _produce_failed(self, session: paho.Client, exc: BaseException) -> None:
        # Not acked: the broker keeps the message in our session. Dropping the connection makes
        # it redeliver everything un-acked once we are back (in order, marked DUP).
        self.stats.produce_failures += 1
        logger.error(
            "kafka produce failed; reconnecting to get a redelivery", extra={"error": repr(exc)}
        )
        session.disconnect()

    async def publish_command(
        self, device_id: str, payload: bytes, *, expires_at: datetime | None = None
    ) -> None:
        """Publish to the device's command topic at QoS 1; raises ConnectionError if it can't.

        With `expires_at`, the MQTT v5 Message Expiry Interval makes the broker drop a command
        that waits in an offline device's session past its TTL, instead of handing it over.
        """
        timeout = self._settings.mqtt_publish_timeout_s
        properties: Properties | None = None
        if expires_at is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            remaining = (expires_at - datetime.now(UTC)).total_seconds()
            properties.MessageExpiryInterval = max(1, int(remaining))
        try:
            async with asyncio.timeout(timeout):
                await self.connected.wait()
                client = self._client
                if client is None:
                    raise ConnectionError("no MQTT session")
                await client.publish(
                    protocol.command_topic(device_id), payload, qos=1, properties=properties
                )
        except TimeoutError as exc:
            raise ConnectionError(f"MQTT publish not acknowledged within {timeout}s") from exc
        except aiomqtt.MqttError as exc:
            raise ConnectionError(f"MQTT publish failed: {exc}") from exc
        self.stats.commands_sent += 1


def _dead_letter(
    topic: str, payload: bytes, refused: protocol.Refused, now: datetime
) -> device.DeviceDeadLetter:
    import base64  # noqa: PLC0415 - only bad input pays for it

    return device.DeviceDeadLetter(
        mqtt_topic=topic[:500],
        device_id=refused.device_id,
        reason=refused.reason,
        payload_b64=base64.b64encode(payload).decode(),
        received_at=now,
    )


def make_producer(settings: GatewaySettings) -> AIOKafkaProducer:
    """The uplink producer: idempotent, acks=all, batched by linger."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"{settings.client_id}-uplink",
        acks="all",
        enable_idempotence=True,
        linger_ms=settings.uplink_linger_ms,
        max_batch_size=256 * 1024,
    )
