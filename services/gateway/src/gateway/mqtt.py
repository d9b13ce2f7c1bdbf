"""A small MQTT v5 client for the gateway's own broker session (asyncio protocol, no threads).

Why not aiomqtt/paho here: paho builds several Python objects per received message (a message
info with a threading.Condition, a Properties object...), which caps a subscriber at a few
thousand messages a second on a small machine. The gateway needs only a narrow part of MQTT:
CONNECT (persistent session, Receive Maximum, Maximum Packet Size), one SUBSCRIBE, receiving
QoS 0/1 PUBLISH, sending PUBACK when *it* decides (after Kafka acknowledged), publishing QoS 1
commands with a Message Expiry Interval, PINGREQ; and, to release the session of a replica that
is gone for good, UNSUBSCRIBE and a DISCONNECT that ends the session. Packets are parsed
straight from the receive buffer and handed to a synchronous callback; PUBACKs are written in
batches.

Devices keep using any MQTT client (the simulator uses aiomqtt); this is not a general client.
"""

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

logger = logging.getLogger(__name__)

_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 0x10, 0x20, 0x30, 0x40
_SUBSCRIBE, _SUBACK, _PINGREQ, _PINGRESP, _DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0
_UNSUBSCRIBE, _UNSUBACK = 0xA2, 0xB0

# MQTT v5 property identifiers and the width of their values (-1 varint, -2 string/binary,
# -3 string pair).
_PROPERTY_WIDTH = {
    0x01: 1, 0x02: 4, 0x03: -2, 0x08: -2, 0x09: -2, 0x0B: -1, 0x11: 4, 0x12: -2, 0x13: 2,
    0x15: -2, 0x16: -2, 0x17: 1, 0x18: 4, 0x19: 1, 0x1A: -2, 0x1C: -2, 0x1F: -2, 0x21: 2,
    0x22: 2, 0x23: 2, 0x24: 1, 0x25: 1, 0x26: -3, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1,
}  # fmt: skip
_SERVER_KEEP_ALIVE, _RECEIVE_MAXIMUM = 0x13, 0x21

# (connection, topic, payload, packet id, QoS, RETAIN); called synchronously for every PUBLISH.
# RETAIN is set only on a retained message the broker hands a new subscription (subscriptions
# here keep Retain As Published off).
OnPublish = Callable[["MqttConnection", str, bytes, int, int, bool], None]


class MqttError(ConnectionError):
    """The broker refused something, or the connection broke."""


@dataclass(frozen=True)
class ConnectOptions:
    """What the gateway's CONNECT says."""

    host: str
    port: int
    client_id: str
    username: str
    password: str
    keepalive_s: int = 30
    session_expiry_s: int = 3600
    receive_maximum: int = 2000
    max_packet_bytes: int = 256 * 1024
    clean_start: bool = False


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _str(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def _read_varint(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise MqttError("malformed variable byte integer")


def _properties(buf: bytes | bytearray, pos: int, end: int) -> dict[int, object]:
    """Parse a property block whose length field starts at `pos` (values as int or bytes)."""
    length, pos = _read_varint(buf, pos)
    stop = min(pos + length, end)
    found: dict[int, object] = {}
    while pos < stop:
        ident = buf[pos]
        pos += 1
        width = _PROPERTY_WIDTH.get(ident)
        if width is None:
            raise MqttError(f"unknown property {ident:#x}")
        if width > 0:
            found[ident] = int.from_bytes(buf[pos : pos + width], "big")
            pos += width
        elif width == -1:
            found[ident], pos = _read_varint(buf, pos)
        else:
            for _ in range(1 if width == -2 else 2):
                size = int.from_bytes(buf[pos : pos + 2], "big")
                found[ident] = bytes(buf[pos + 2 : pos + 2 + size])
                pos += 2 + size
    return found


class MqttConnection(asyncio.Protocol):
    """One connection of the gateway's session; `open()` connects and waits for CONNACK."""

    def __init__(self, options: ConnectOptions, on_publish: OnPublish) -> None:
        self.options = options
        self._on_publish = on_publish
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        loop = asyncio.get_running_loop()
        self._connack: asyncio.Future[bool] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._waiting: dict[int, asyncio.Future[int]] = {}  # our packet id -> PUBACK/SUBACK code
        self._next_id = 0
        self._acks = bytearray()  # PUBACKs to write at the end of this loop iteration
        self._last_received = time.monotonic()
        self._keepalive_s = options.keepalive_s
        self._outgoing: asyncio.Semaphore | None = None
        self._pinger: asyncio.Task[None] | None = None
        self.session_present = False

    @classmethod
    async def open(
        cls, options: ConnectOptions, on_publish: OnPublish, *, timeout_s: float = 10.0
    ) -> "MqttConnection":
        """Connect, send CONNECT, and return once the broker accepted it."""
        loop = asyncio.get_running_loop()
        conn = cls(options, on_publish)
        async with asyncio.timeout(timeout_s):
            await loop.create_connection(lambda: conn, options.host, options.port)
            try:
                conn.session_present = await asyncio.shield(conn._connack)
            except BaseException:
                conn.abort()
                raise
        conn._pinger = loop.create_task(conn._keepalive(), name="mqtt-keepalive")
        return conn

    @property
    def alive(self) -> bool:
        """Whether this connection can still carry packets."""
        return not self.closed.done()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send CONNECT as soon as TCP is up."""
        # uvloop's TCP transports are not asyncio.Transport subclasses, but behave as one.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        o = self.options
        props = (
            b"\x11" + struct.pack("!I", o.session_expiry_s)
            + b"\x21" + struct.pack("!H", o.receive_maximum)
            + b"\x27" + struct.pack("!I", o.max_packet_bytes)
        )  # fmt: skip
        flags = 0xC0 | (0x02 if o.clean_start else 0)
        body = (
            _str("MQTT") + bytes((5, flags)) + struct.pack("!H", o.keepalive_s)
            + _varint(len(props)) + props
            + _str(o.client_id) + _str(o.username) + _str(o.password)
        )  # fmt: skip
        transport.write(_packet(_CONNECT, body))

    def data_received(self, data: bytes) -> None:
        """Parse every complete packet in the buffer."""
        self._last_received = time.monotonic()
        buf = self._buffer
        buf += data
        pos, size = 0, len(buf)
        try:
            while size - pos >= 2:
                first = buf[pos]
                length, shift, start, complete = 0, 0, pos + 1, False
                while start < size:
                    byte = buf[start]
                    start += 1
                    length |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        complete = True
                        break
                    shift += 7
                    if shift > 21:
                        raise MqttError("malformed remaining length")
                if not complete:
                    break  # the length itself is incomplete
                end = start + length
                if end > size:
                    if length > self.options.max_packet_bytes + 16:
                        raise MqttError(f"packet of {length} bytes over our maximum")
                    break
                self._handle(first, buf, start, end)
                pos = end
        except (MqttError, IndexError, UnicodeDecodeError) as exc:
            logger.error("mqtt protocol error, dropping the connection", extra={"error": str(exc)})
            self.abort()
            return
        finally:
            if pos:
                del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail whatever waits on this connection."""
        error = MqttError(f"connection lost: {exc!r}" if exc else "connection closed")
        if not self._connack.done():
            self._connack.set_exception(error)
            self._connack.exception()  # consumed: open() may already have given up
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()
        self._waiting.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        if self._pinger is not None:
            self._pinger.cancel()

    # packets in
    def _handle(self, first: int, buf: bytearray, start: int, end: int) -> None:
        kind = first & 0xF0
        if kind == _PUBLISH:
            qos = (first >> 1) & 0x03
            topic_len = (buf[start] << 8) | buf[start + 1]
            pos = start + 2 + topic_len
            topic = buf[start + 2 : pos].decode()
            packet_id = 0
            if qos:
                packet_id = (buf[pos] << 8) | buf[pos + 1]
                pos += 2
            # Properties (user properties, expiry...) are not part of the device protocol.
            props_len, pos = _read_varint(buf, pos)
            if qos > 1:
                raise MqttError("QoS 2 delivery on a QoS 1 subscription")
            payload = bytes(buf[pos + props_len : end])
            self._on_publish(self, topic, payload, packet_id, qos, bool(first & 0x01))
        elif kind == _PUBACK or first in (_SUBACK, _UNSUBACK):
            packet_id = (buf[start] << 8) | buf[start + 1]
            code = buf[start + 2] if end - start > 2 else 0
            if first in (_SUBACK, _UNSUBACK):
                props_len, pos = _read_varint(buf, start + 2)
                code = buf[pos + props_len]
            waiter = self._waiting.pop(packet_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(code)
        elif kind == _CONNACK:
            session_present, code = bool(buf[start] & 1), buf[start + 1]
            if code >= 0x80:
                self._connack.set_exception(MqttError(f"CONNECT refused, reason code {code:#x}"))
                self.abort()
                return
            props = _properties(buf, start + 2, end)
            keepalive = props.get(_SERVER_KEEP_ALIVE)
            if isinstance(keepalive, int) and keepalive > 0:
                self._keepalive_s = keepalive
            receive_max = props.get(_RECEIVE_MAXIMUM)
            self._outgoing = asyncio.Semaphore(receive_max if isinstance(receive_max, int) else 20)
            if not self._connack.done():
                self._connack.set_result(session_present)
        elif kind == _DISCONNECT:
            code = buf[start] if end > start else 0
            logger.warning("broker sent DISCONNECT", extra={"reason_code": code})
            self.abort()
        elif first != _PINGRESP:
            raise MqttError(f"unexpected packet type {first:#x}")

    # packets out
    def puback(self, packet_ids: Iterable[int]) -> None:
        """Acknowledge QoS 1 deliveries (one write for the lot)."""
        if self._transport is None or self.closed.done():
            return  # the broker redelivers them on the next connection
        out = bytearray()
        for packet_id in packet_ids:
            out += b"\x40\x02" + packet_id.to_bytes(2, "big")
        if out:
            self._transport.write(out)

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._waiting:
                return self._next_id
        raise MqttError("no free packet id")

    async def _request(self, packet: Callable[[int], bytes]) -> int:
        if self._transport is None or self.closed.done():
            raise MqttError("not connected")
        packet_id = self._packet_id()
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[packet_id] = waiter
        try:
            self._transport.write(packet(packet_id))
            return await waiter
        finally:
            self._waiting.pop(packet_id, None)

    async def subscribe(self, topic_filter: str, qos: int = 1, *, retain_handling: int = 0) -> None:
        """SUBSCRIBE and wait for the SUBACK; raises MqttError if refused.

        `retain_handling` (MQTT v5): 0 sends the retained messages at every SUBSCRIBE, 1 only
        when the subscription did not exist yet (a resumed session already has it), 2 never.
        """
        options = bytes((qos | retain_handling << 4,))
        code = await self._request(
            lambda pid: _packet(
                _SUBSCRIBE, struct.pack("!H", pid) + b"\x00" + _str(topic_filter) + options
            )
        )
        if code >= 0x80:
            raise MqttError(f"SUBSCRIBE {topic_filter} refused, reason code {code:#x}")

    async def unsubscribe(self, topic_filter: str) -> None:
        """UNSUBSCRIBE and wait for the UNSUBACK; raises MqttError if refused."""
        code = await self._request(
            lambda pid: _packet(_UNSUBSCRIBE, struct.pack("!H", pid) + b"\x00" + _str(topic_filter))
        )
        # 0x11 "no subscription existed" leaves the session as wanted.
        if code >= 0x80:
            raise MqttError(f"UNSUBSCRIBE {topic_filter} refused, reason code {code:#x}")

    async def publish(
        self, topic: str, payload: bytes, *, message_expiry_s: int | None = None
    ) -> None:
        """PUBLISH at QoS 1 and wait for the PUBACK; raises MqttError if refused."""
        props = b"" if message_expiry_s is None else b"\x02" + struct.pack("!I", message_expiry_s)
        semaphore = self._outgoing or asyncio.Semaphore(20)
        async with semaphore:
            code = await self._request(
                lambda pid: _packet(
                    _PUBLISH | 0x02,
                    _str(topic) + struct.pack("!H", pid) + _varint(len(props)) + props + payload,
                )
            )
        # 0x10 "no matching subscribers" is a success: the device is offline without a session.
        if code >= 0x80:
            raise MqttError(f"PUBLISH to {topic} refused, reason code {code:#x}")

    async def _keepalive(self) -> None:
        interval = max(1.0, self._keepalive_s / 2)
        while self.alive:
            await asyncio.sleep(interval)
            if time.monotonic() - self._last_received > self._keepalive_s * 1.5:
                logger.warning("mqtt keepalive expired, dropping the connection")
                self.abort()
                return
            if self._transport is not None:
                self._transport.write(bytes((_PINGREQ, 0)))

    def pause_reading(self) -> None:
        """Take no more deliveries (shutdown: finish what is in flight first)."""
        if self._transport is not None and not self.closed.done():
            self._transport.pause_reading()

    async def disconnect(self, *, end_session: bool = False) -> None:
        """Orderly DISCONNECT: the session stays with the broker for its expiry, or, with
        `end_session`, ends now (Session Expiry Interval 0: its subscriptions go with it)."""
        if self._transport is not None and not self.closed.done():
            if end_session:
                props = b"\x11" + struct.pack("!I", 0)
                self._transport.write(_packet(_DISCONNECT, b"\x00" + _varint(len(props)) + props))
            else:
                self._transport.write(bytes((_DISCONNECT, 0)))
            self._transport.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.closed), timeout=2)

    def abort(self) -> None:
        """Drop the connection now; un-acked deliveries come again on the next one."""
        if self._transport is not None:
            self._transport.abort()
