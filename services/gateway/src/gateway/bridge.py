"""The MQTT side of the gateway: devices' uplinks to Kafka, and commands down to devices.

One MQTT v5 session per replica, with a stable client id and a session that outlives the
process, subscribed to the shared subscription `$share/<group>/devices/+/up/#` so replicas
split the devices' traffic. Every QoS 1 uplink is acknowledged to the broker (PUBACK) only
after Kafka acknowledged its event (acks=all): a replica killed at any moment leaves its
un-acked messages in its broker session, which redelivers them when it reconnects. The price
is at-least-once: a message whose PUBACK was lost arrives twice (with distinct event ids).

The uplink path is built for throughput: each PUBLISH is validated in the receive callback
(no task or future per message), appended to a pending list, and a single sender task turns
that list into one Kafka record batch per topic-partition (`send_batch`). When a batch is
acknowledged, the PUBACKs of all its messages go out in one write. Telemetry waits up to
`uplink_linger_ms` to fill batches; presence and reports (command acks, OTA progress) wake
the sender at once, so the command round trip never waits on a linger.

Tracing (see `gateway.tracing`): a command's publish is a span under the dispatch consumer's;
a report for that command is produced with the publish's trace context in its headers. Nothing
else on the uplink path creates or looks up a span.
"""

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from common.contracts import device
from common.kafka import needs_new_producer, replace_producer
from common.logging import RateLimitedLogger
from gateway import metrics, protocol
from gateway.limits import DeviceRateLimiter
from gateway.mqtt import ConnectOptions, MqttConnection, MqttError
from gateway.settings import GatewaySettings
from gateway.tracing import CommandTraces, Headers

logger = logging.getLogger(__name__)
SOURCE = "gateway"
_FORWARDED = "forwarded"
# A dead letter keeps at most this much of the payload (base64 of it fits Kafka's default
# 1 MB record limit); the broker's Maximum Packet Size toward the gateway is 256 KiB anyway.
_DEAD_LETTER_KEEP = 256 * 1024


@dataclass
class BridgeStats:
    """What the bridge did since start; for health, tests and the benchmark."""

    received: int = 0
    forwarded: int = 0
    dead_lettered: int = 0
    dropped: int = 0
    produce_failures: int = 0
    connects: int = 0
    commands_sent: int = 0
    producer_renewals: int = 0


class _Uplink(NamedTuple):
    """One message on its way to Kafka, and what to acknowledge when it got there."""

    topic: str  # Kafka topic (prefixed)
    key: bytes | None
    value: bytes
    conn: MqttConnection
    packet_id: int
    qos: int
    outcome: str  # "forwarded" or the dead-letter reason class
    headers: Headers | None = None  # the topic's own unless a report continues a trace


class Bridge:
    """Owns the gateway's MQTT session; `run()` keeps it connected until stopped."""

    def __init__(
        self, settings: GatewaySettings, make_producer: Callable[[], AIOKafkaProducer]
    ) -> None:
        self._settings = settings
        self._make_producer = make_producer
        self._producer = make_producer()
        self._renew_producer = False  # set by a fatal idempotence error (see `_send_loop`)
        self._conn: MqttConnection | None = None
        self.connected = asyncio.Event()
        self.stats = BridgeStats()
        self._refusals = RateLimitedLogger(logger, interval_s=60.0)
        self._topics = {
            t.name: settings.topic_name(t.name)
            for t in (device.TELEMETRY, device.PRESENCE, device.REPORT, device.DEADLETTER)
        }
        self._headers = {
            self._topics[t.name]: [
                ("content-type", b"application/json"),
                ("event-type", t.event_type.encode()),
            ]
            for t in (device.TELEMETRY, device.PRESENCE, device.REPORT, device.DEADLETTER)
        }
        self._limiter = DeviceRateLimiter(
            rate_per_s=settings.device_rate_per_s, burst=settings.device_burst
        )
        self._pending: list[_Uplink] = []
        self._unacked = 0  # accepted, not yet acknowledged by Kafka
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()  # presence or a report is pending: no linger
        self._hashes: dict[bytes, int] = {}  # key -> murmur2, as the default partitioner does
        self.online: set[str] = set()  # devices whose latest status seen here is `online`
        self.traces = CommandTraces()

    @property
    def subscription(self) -> str:
        """The shared subscription all replicas use."""
        return f"$share/{self._settings.mqtt_share_group}/devices/+/up/#"

    def _options(self) -> ConnectOptions:
        s = self._settings
        return ConnectOptions(
            host=s.mqtt_host,
            port=s.mqtt_port,
            client_id=s.mqtt_client_id,
            username=s.mqtt_username,
            password=s.mqtt_password.get_secret_value(),
            keepalive_s=s.mqtt_keepalive_s,
            session_expiry_s=s.mqtt_session_expiry_s,
            receive_maximum=s.mqtt_receive_maximum,
            max_packet_bytes=s.mqtt_max_packet_bytes,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, consume and reconnect with jittered exponential backoff until `stop`."""
        delay = 0.5
        async with self._sending():
            while not stop.is_set():
                conn: MqttConnection | None = None
                try:
                    conn = await MqttConnection.open(self._options(), self._on_publish)
                    # A resumed session first receives its backlog (up to Receive Maximum) and
                    # the SUBACK queues behind it: give it time instead of reconnecting.
                    # Retained statuses only for a new subscription: resent at every reconnect
                    # they were the whole fleet's presence again each time (a reconnect loop
                    # once made that 6,000 events a second).
                    async with asyncio.timeout(self._settings.mqtt_subscribe_timeout_s):
                        await conn.subscribe(self.subscription, qos=1, retain_handling=1)
                    self._conn = conn
                    self.connected.set()
                    self.stats.connects += 1
                    delay = 0.5
                    logger.info("mqtt session up", extra={"subscription": self.subscription})
                    stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
                    try:
                        await asyncio.wait(
                            {conn.closed, stopping}, return_when=asyncio.FIRST_COMPLETED
                        )
                    finally:
                        stopping.cancel()
                    if stop.is_set():
                        await self._finish(conn)
                    else:
                        logger.warning("mqtt session lost")
                except (OSError, TimeoutError) as exc:  # MqttError is a ConnectionError
                    logger.warning("mqtt session failed", extra={"error": repr(exc)})
                finally:
                    self.connected.clear()
                    self._conn = None
                    if conn is not None:
                        conn.abort()
                if stop.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    jitter = random.uniform(0.5, 1.0)  # noqa: S311
                    await asyncio.wait_for(stop.wait(), timeout=delay * jitter)
                delay = min(delay * 2, self._settings.mqtt_reconnect_max_s)

    async def release(self, *, idle_s: float = 3.0, timeout_s: float = 600.0) -> int:
        """End the broker session of this bridge's client id, losing nothing it holds; returns
        how many messages it forwarded.

        For a replica that is gone for good (a scaled-down pod): the broker keeps handing its
        session a share of the uplinks until the session expires, then drops them. This takes
        the session over and UNSUBSCRIBEs at once (so no new share comes: a live fleet would
        never let it go quiet otherwise), forwards to Kafka what the session still holds (the
        broker delivers its queue after the UNSUBSCRIBE too; PUBACK after Kafka's ack, as the
        bridge always does) until nothing came for `idle_s`, and leaves with session expiry 0.
        Only for an id no running replica uses: the broker hands a session to whichever
        connection came last.
        """
        conn: MqttConnection | None = None
        async with self._sending():
            try:
                async with asyncio.timeout(timeout_s):
                    conn = await MqttConnection.open(self._options(), self._on_publish)
                    self._conn = conn
                    if conn.session_present:
                        await conn.unsubscribe(self.subscription)
                        await self._quiet(conn, idle_s)
                    await conn.disconnect(end_session=True)
            finally:
                if conn is not None:
                    conn.abort()
                self._conn = None
        logger.info(
            "mqtt session released",
            extra={"client_id": self._settings.mqtt_client_id, "forwarded": self.stats.forwarded},
        )
        return self.stats.forwarded

    @contextlib.asynccontextmanager
    async def _sending(self) -> AsyncIterator[None]:
        """The one task handing received uplinks to Kafka, for as long as the block runs."""
        sender = asyncio.create_task(self._send_loop(), name="uplink-producer")
        try:
            yield
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    async def _quiet(self, conn: MqttConnection, idle_s: float) -> None:
        """Until nothing arrived for `idle_s` and everything received is acknowledged."""
        loop = asyncio.get_running_loop()
        seen, since = self.stats.received, loop.time()
        while True:
            if not conn.alive:
                raise MqttError("the session's connection was lost while releasing it")
            await asyncio.sleep(0.05)
            if self.stats.received != seen:
                seen, since = self.stats.received, loop.time()
            elif loop.time() - since >= idle_s and not self._pending and not self._unacked:
                return

    async def _finish(self, conn: MqttConnection) -> None:
        """Shutdown: take no more, let Kafka acknowledge what is in flight, PUBACK it, leave."""
        conn.pause_reading()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while self._pending or self._unacked:
                    self._wake.set()
                    await asyncio.sleep(0.01)
        await conn.disconnect()

    # uplink: MQTT -> Kafka
    def _on_publish(  # noqa: PLR0917 - the MQTT client's callback shape
        self,
        conn: MqttConnection,
        topic: str,
        payload: bytes,
        packet_id: int,
        qos: int,
        retained: bool,
    ) -> None:
        self.stats.received += 1
        try:
            self._accept(conn, topic, payload, packet_id, qos, retained)
        except Exception:  # a bug here must not take the session down with it
            logger.exception("uplink handling failed", extra={"mqtt_topic": topic[:200]})
            self._drop(conn, packet_id, qos, "error")

    def _accept(  # noqa: PLR0917
        self,
        conn: MqttConnection,
        topic: str,
        payload: bytes,
        packet_id: int,
        qos: int,
        retained: bool,
    ) -> None:
        parts = topic.split("/", 3)
        device_id = parts[1] if len(parts) > 2 and parts[0] == "devices" else ""
        if not self._limiter.allow(device_id):
            self._refusals.warning(
                f"{device_id[:64]}:rate",
                "device over its uplink rate, dropping",
                device_id=device_id[:64],
                rate_per_s=self._limiter.rate_per_s,
            )
            self._drop(conn, packet_id, qos, "rate_limited")
            return
        if qos == 0 and self._unacked >= 4 * self._settings.mqtt_receive_maximum:
            self._drop(conn, packet_id, qos, "overload")  # QoS 0 has no broker-side bound
            return
        now = datetime.now(UTC)
        verdict = protocol.read_uplink(
            topic,
            payload,
            received_at=now,
            max_bytes=self._settings.max_payload_bytes,
            retained=retained,
        )
        if isinstance(verdict, protocol.Accepted):
            contract = verdict.topic
            if contract is device.PRESENCE:
                self._presence(verdict.device_id, verdict.data.state)
            if contract is not device.TELEMETRY:
                self._urgent.set()
            value = protocol.encode_event(
                contract.event_type, SOURCE, verdict.device_id, verdict.data, now
            )
            headers = None
            if contract is device.REPORT:
                headers = self._report_headers(verdict.device_id, verdict.data)
            uplink = _Uplink(
                self._topics[contract.name], verdict.device_id.encode(), value, conn,
                packet_id, qos, _FORWARDED, headers,
            )  # fmt: skip
        else:
            self._refusals.warning(
                f"{verdict.device_id}:{verdict.code}",
                "uplink refused, dead-lettered",
                device_id=verdict.device_id,
                reason=verdict.reason[:300],
            )
            value = protocol.encode_event(
                device.DEADLETTER.event_type,
                SOURCE,
                verdict.device_id,
                _dead_letter(topic, payload, verdict, now),
                now,
            )
            key = verdict.device_id.encode() if verdict.device_id else None
            uplink = _Uplink(
                self._topics[device.DEADLETTER.name], key, value, conn, packet_id, qos,
                verdict.code,
            )  # fmt: skip
        self._pending.append(uplink)
        self._unacked += 1
        if not self._wake.is_set():
            self._wake.set()

    def _report_headers(self, device_id: str, report: Any) -> Headers | None:
        """The topic's headers plus the command's trace context, if its publish was ours."""
        trace_headers = self.traces.headers_for(device_id, report.command_id)
        if trace_headers is None:
            return None
        return self._headers[self._topics[device.REPORT.name]] + trace_headers

    def _presence(self, device_id: str, state: str) -> None:
        if state == "online":
            self.online.add(device_id)
        else:
            self.online.discard(device_id)
        metrics.CONNECTED_DEVICES.set(len(self.online))

    def _drop(self, conn: MqttConnection, packet_id: int, qos: int, reason: str) -> None:
        self.stats.dropped += 1
        metrics.DROPPED.labels(reason).inc()
        metrics.UPLINKS.labels("dropped").inc()
        if qos:
            conn.puback((packet_id,))  # taken care of: the broker must not redeliver it

    async def start_producer(self) -> None:
        """Connect the uplink producer."""
        await self._producer.start()

    async def stop_producer(self) -> None:
        """Flush what is in flight and close (un-acked MQTT messages stay with the broker)."""
        await self._producer.stop()

    async def _send_loop(self) -> None:
        linger_s = self._settings.uplink_linger_ms / 1000
        while True:
            await self._wake.wait()
            if self._renew_producer:
                await self._replace_producer()
            if linger_s and not self._urgent.is_set():
                # Only telemetry is pending: fill the batch, unless a report comes meanwhile.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), linger_s)
            self._wake.clear()
            self._urgent.clear()
            pending, self._pending = self._pending, []
            if pending:
                await self._produce(pending)

    async def _replace_producer(self) -> None:
        try:
            self._producer = await replace_producer(self._producer, self._make_producer)
        except Exception as exc:  # noqa: BLE001 - Kafka still away: the next round tries again
            logger.warning("kafka producer not replaced yet", extra={"error": repr(exc)})
            return
        self._renew_producer = False
        self.stats.producer_renewals += 1

    async def _produce(self, pending: list[_Uplink]) -> None:
        groups: dict[tuple[str, int], list[_Uplink]] = {}
        partitions: dict[str, list[int]] = {}
        try:
            for uplink in pending:
                topic = uplink.topic
                if topic not in partitions:
                    partitions[topic] = sorted(await self._producer.partitions_for(topic))
                where = (topic, self._partition(uplink.key, partitions[topic]))
                groups.setdefault(where, []).append(uplink)
        except Exception as exc:  # noqa: BLE001 - no metadata (Kafka away): all stay un-acked
            self._failed(pending, exc)
            return
        for (topic, partition), uplinks in groups.items():
            headers = self._headers[topic]
            members: list[_Uplink] = []
            batch = self._producer.create_batch()
            for uplink in uplinks:
                own = uplink.headers or headers
                if batch.append(timestamp=None, key=uplink.key, value=uplink.value,
                                headers=own) is None:  # fmt: skip
                    await self._submit(batch, topic, partition, members)
                    batch, members = self._producer.create_batch(), []
                    batch.append(timestamp=None, key=uplink.key, value=uplink.value, headers=own)
                members.append(uplink)
            await self._submit(batch, topic, partition, members)

    def _partition(self, key: bytes | None, partitions: list[int]) -> int:
        if key is None:
            return random.choice(partitions)  # noqa: S311 - spreading, not secrecy
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) > 100_000:
                self._hashes.clear()
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return partitions[hashed % len(partitions)]

    async def _submit(self, batch: Any, topic: str, partition: int, members: list[_Uplink]) -> None:
        batch.close()  # closed: ready to go at once, the producer's own linger does not apply
        try:
            delivery = await self._producer.send_batch(batch, topic, partition=partition)
        except Exception as exc:  # noqa: BLE001 - any produce error: leave them un-acked
            self._failed(members, exc)
            return
        delivery.add_done_callback(functools.partial(self._delivered, members))

    def _delivered(self, members: list[_Uplink], delivery: "asyncio.Future[Any]") -> None:
        self._unacked -= len(members)
        if delivery.cancelled() or delivery.exception() is not None:
            self._failed(members, delivery.exception() or asyncio.CancelledError(), counted=True)
            return
        acks: dict[MqttConnection, list[int]] = {}
        forwarded = 0
        for uplink in members:
            if uplink.qos:
                acks.setdefault(uplink.conn, []).append(uplink.packet_id)
            if uplink.outcome == _FORWARDED:
                forwarded += 1
            else:
                metrics.DEAD_LETTERED.labels(uplink.outcome).inc()
        for conn, packet_ids in acks.items():
            conn.puback(packet_ids)
        dead = len(members) - forwarded
        self.stats.forwarded += forwarded
        self.stats.dead_lettered += dead
        if forwarded:
            metrics.UPLINKS.labels(_FORWARDED).inc(forwarded)
        if dead:
            metrics.UPLINKS.labels("dead_lettered").inc(dead)

    def _failed(
        self, members: Iterable[_Uplink], exc: BaseException, *, counted: bool = False
    ) -> None:
        # Not acked: the broker keeps the messages in our session. Dropping the connection makes
        # it redeliver everything un-acked once we are back (marked DUP).
        members = list(members)
        if needs_new_producer(exc):
            self._renew_producer = True
        if not counted:
            self._unacked -= len(members)
        self.stats.produce_failures += len(members)
        metrics.PRODUCE_FAILURES.inc(len(members))
        logger.error(
            "kafka produce failed; reconnecting to get a redelivery", extra={"error": repr(exc)}
        )
        for conn in {u.conn for u in members}:
            conn.abort()

    # downlink: commands to devices
    async def publish_command(
        self,
        device_id: str,
        payload: bytes,
        *,
        expires_at: datetime | None = None,
        command_id: str | None = None,
    ) -> None:
        """Publish to the device's command topic at QoS 1; raises ConnectionError if it can't.

        With `expires_at`, the MQTT v5 Message Expiry Interval makes the broker drop a command
        that waits in an offline device's session past its TTL, instead of handing it over.
        With `command_id`, the publish is a span whose context the device's reports continue.
        """
        if command_id is None:
            await self._publish_command(device_id, payload, expires_at)
            return
        topic = protocol.command_topic(device_id)
        with self.traces.publishing(device_id, command_id, topic):
            await self._publish_command(device_id, payload, expires_at)

    async def _publish_command(
        self, device_id: str, payload: bytes, expires_at: datetime | None
    ) -> None:
        timeout = self._settings.mqtt_publish_timeout_s
        expiry = None
        if expires_at is not None:
            expiry = max(1, int((expires_at - datetime.now(UTC)).total_seconds()))
        try:
            async with asyncio.timeout(timeout):
                await self.connected.wait()
                conn = self._conn
                if conn is None:
                    raise ConnectionError("no MQTT session")
                await conn.publish(
                    protocol.command_topic(device_id), payload, message_expiry_s=expiry
                )
        except TimeoutError as exc:
            raise ConnectionError(f"MQTT publish not acknowledged within {timeout}s") from exc
        except MqttError as exc:
            raise ConnectionError(f"MQTT publish failed: {exc}") from exc
        self.stats.commands_sent += 1
        metrics.COMMANDS_SENT.inc()


def _dead_letter(
    topic: str, payload: bytes, refused: protocol.Refused, now: datetime
) -> device.DeviceDeadLetter:
    import base64  # noqa: PLC0415 - only bad input pays for it

    reason = refused.reason
    if len(payload) > _DEAD_LETTER_KEEP:
        # Kept whole it could exceed what Kafka takes in one record (and fail forever).
        payload = payload[:_DEAD_LETTER_KEEP]
        reason += f" (payload_b64 holds its first {_DEAD_LETTER_KEEP} bytes)"
    return device.DeviceDeadLetter(
        mqtt_topic=topic[:500],
        device_id=refused.device_id,
        reason=reason,
        payload_b64=base64.b64encode(payload).decode(),
        received_at=now,
    )


def make_producer(settings: GatewaySettings) -> AIOKafkaProducer:
    """The uplink producer: idempotent, acks=all; the bridge builds the batches itself."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"{settings.client_id}-uplink",
        acks="all",
        enable_idempotence=True,
        linger_ms=0,
        max_batch_size=512 * 1024,
        request_timeout_ms=30_000,
    )
