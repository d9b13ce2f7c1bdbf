"""Runs simulated devices over MQTT: one aiomqtt session per device, all in one process."""

import asyncio
import contextlib
import json
import logging
import random
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.simulator.model import (
    Command,
    DeviceSpec,
    DeviceState,
    Timing,
    malformed_telemetry,
)

logger = logging.getLogger("gateway.simulator")


@dataclass
class Fleet:
    """Shared settings of a simulator run."""

    host: str
    port: int
    timing: Timing
    persistent_sessions: bool = True
    malformed_every: int = 5
    seed: int = 1
    # First connections are spread over this many seconds (a big fleet must not stampede).
    spread_s: float = 2.0
    # At most this many CONNECT handshakes at once (each one takes an executor thread in
    # aiomqtt); the rest wait their turn instead of piling up sockets.
    max_connecting: int = 50
    _connecting: asyncio.Semaphore | None = None

    @property
    def connecting(self) -> asyncio.Semaphore:
        """The gate every device passes to connect."""
        if self._connecting is None:
            self._connecting = asyncio.Semaphore(self.max_connecting)
        return self._connecting


@dataclass
class _Offline:
    """Why and for how long a device leaves the broker."""

    seconds: float | None  # None: it never comes back
    announce: bool  # publish an orderly `offline` status first (reboot), or just vanish


NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class SimulatedDevice:
    """One device: connects, reports, obeys commands, goes offline and returns."""

    def __init__(self, spec: DeviceSpec, fleet: Fleet) -> None:
        self.spec = spec
        self.fleet = fleet
        self.rng = random.Random(f"{fleet.seed}:{spec.id}")  # noqa: S311 - a simulation
        self.state = DeviceState.new(spec, self.rng)
        self.online = asyncio.Event()
        self._leave: asyncio.Future[_Offline] | None = None
        self._busy = False
        # The session's client while one is up: an OTA outlives sessions (see `_ota`).
        self._connected: aiomqtt.Client | None = None

    @property
    def topic(self) -> str:
        """This device's topic root."""
        return f"devices/{self.spec.id}"

    def _client(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.fleet.persistent_sessions:
            props.SessionExpiryInterval = 86400  # commands sent while it reboots wait for it
        will = aiomqtt.Will(
            f"{self.topic}/up/status",
            json.dumps(self.state.status("offline", None)),
            qos=1,
            retain=True,
        )
        return aiomqtt.Client(
            self.fleet.host,
            self.fleet.port,
            username=self.spec.username or self.spec.id,
            password=self.spec.password,
            identifier=self.spec.id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=not self.fleet.persistent_sessions,
            properties=props,
            will=will,
            keepalive=60,
            # paho leaves Nagle's algorithm on: an ack written right after the broker's packet
            # waited ~40 ms for the delayed ACK (a controller's stack sends at once).
            socket_options=(NODELAY,),
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Live until `stop`: connect, and reconnect after every reboot, OTA or failure."""
        delay = 1.0
        # Spread the fleet's first connections over a few seconds.
        await asyncio.sleep(self.rng.uniform(0, self.fleet.spread_s))
        while not stop.is_set():
            # Jittered (half to all of the backoff), as a fleet's firmware should: after a
            # broker restart the units do not all knock again in the same second.
            offline = _Offline(seconds=delay * self.rng.uniform(0.5, 1.0), announce=False)
            try:
                offline = await self._session(stop)
                delay = 1.0
            except aiomqtt.MqttError as exc:
                logger.debug("device %s: session failed: %s", self.spec.id, exc)
                delay = min(delay * 2, 60.0)
            finally:
                self.online.clear()
                self._connected = None
            if offline.seconds is None:
                logger.info("device %s is gone for good (fault never_returns)", self.spec.id)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=offline.seconds)

    async def _session(self, stop: asyncio.Event) -> _Offline:
        loop = asyncio.get_running_loop()
        self._leave = loop.create_future()
        client = self._client()
        async with contextlib.AsyncExitStack() as session:
            async with self.fleet.connecting:
                await session.enter_async_context(client)
            await client.subscribe(f"{self.topic}/down/command", qos=1)
            await self._publish(client, "status", self.state.status("online", _now()), retain=True)
            self.online.set()
            self._connected = client
            tasks = [
                asyncio.create_task(self._report(client)),
                asyncio.create_task(self._listen(client)),
            ]
            if "flapping" in self.spec.faults:
                tasks.append(asyncio.create_task(self._flap()))
            stopping = asyncio.create_task(stop.wait())
            waits: set[asyncio.Future[Any]] = {self._leave, stopping, *tasks}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (stopping, *tasks):
                    task.cancel()
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if stop.is_set():
                await self._publish(client, "status", self.state.status("offline", _now()), True)
                return _Offline(seconds=0, announce=True)
            leave = self._leave.result()
            if leave.announce:
                await self._publish(client, "status", self.state.status("offline", _now()), True)
            else:
                # Vanish without DISCONNECT, so the broker fires the Last Will.
                with contextlib.suppress(OSError):
                    sock = client._client.socket()
                    if sock is not None:
                        sock.close()
        return leave

    def go_offline(self, seconds: float | None, *, announce: bool) -> None:
        """Leave the broker now; come back after `seconds` (never if None)."""
        if self._leave is not None and not self._leave.done():
            self._leave.set_result(_Offline(seconds, announce))

    async def _publish(
        self, client: aiomqtt.Client, kind: str, body: dict[str, Any] | bytes, retain: bool = False
    ) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body)
        await client.publish(f"{self.topic}/up/{kind}", payload, qos=1, retain=retain)

    async def _report(self, client: aiomqtt.Client) -> None:
        interval = self.fleet.timing.telemetry_interval_s
        # Simulated time runs 1/time-factor times faster, so readings move visibly in demos.
        speedup = 10.0 / max(self.fleet.timing.telemetry_interval_s, 1e-3)
        await asyncio.sleep(self.rng.uniform(0, interval))
        while True:
            self.state.tick(interval * speedup, self.rng)
            self.state.sent += 1
            if (
                "malformed" in self.spec.faults
                and self.state.sent % self.fleet.malformed_every == 0
            ):
                await self._publish(client, "telemetry", malformed_telemetry(self.rng))
            else:
                await self._publish(client, "telemetry", self.state.telemetry(_now()))
            await asyncio.sleep(interval * self.rng.uniform(0.9, 1.1))

    async def _flap(self) -> None:
        await asyncio.sleep(self.fleet.timing.flap_every_s * self.rng.uniform(0.5, 1.5))
        self.go_offline(self.fleet.timing.step_s, announce=False)

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            command = Command.parse(message.payload if isinstance(message.payload, bytes) else b"")
            if command is None or command.expired(_now()):
                continue  # a device ignores what it cannot read and what came too late
            if not self.state.first_time(command.command_id):
                continue  # ...and a command it already ran
            await self._obey(client, command)

    async def _ack(
        self, client: aiomqtt.Client, command: Command, status: str, detail: str | None = None
    ) -> None:
        body = {"command_id": command.command_id, "status": status, "detail": detail}
        await self._publish(client, "ack", body)

    async def _obey(self, client: aiomqtt.Client, command: Command) -> None:
        step = self.fleet.timing.step_s
        action = command.action
        if action in ("start", "stop"):
            await self._ack(client, command, "accepted")
            await asyncio.sleep(step)
            self.state.run_state = "running" if action == "start" else "stopped"
            await self._publish(client, "telemetry", self.state.telemetry(_now()))
            await self._ack(client, command, "succeeded")
        elif action == "set_setting":
            await self._ack(client, command, "accepted")
            await self._ack(client, command, "succeeded")
        elif action == "reboot":
            await self._ack(client, command, "accepted")
            await asyncio.sleep(step)
            self.state.run_state = "stopped"
            self.go_offline(self.fleet.timing.reboot_offline_s, announce=True)
        elif action in ("fw_update", "force_ota"):
            if self._busy:
                await self._ack(client, command, "rejected", "an update is already running")
                return
            await self._ack(client, command, "accepted")
            self._busy = True
            asyncio.get_running_loop().create_task(self._ota(command))
        else:
            await self._ack(client, command, "rejected", f"unknown action {action}")

    async def _ota(self, command: Command) -> None:
        """Download, install, reboot. The image comes over HTTP, not MQTT: a lost broker session
        (a broker restart, a network blip) does not stop it. Progress is reported while a
        session is up and skipped while none is; a failure waits for the next session."""
        try:
            await self._ota_steps(command)
        finally:
            self._busy = False

    async def _send_when_connected(self, kind: str, body: dict[str, Any], *, wait: bool) -> None:
        """Publish on the session that is up; with `wait`, the next one if none is (or it just
        went), else drop it."""
        while True:
            client = self._connected
            if client is not None:
                try:
                    await self._publish(client, kind, body)
                    return
                except aiomqtt.MqttError:
                    logger.debug("device %s: %s not sent, session lost", self.spec.id, kind)
            if not wait:
                return
            await asyncio.sleep(0.1)  # the session that failed is still marked up: let it go
            await self.online.wait()

    async def _ota_steps(self, command: Command) -> None:
        step = self.fleet.timing.step_s
        version = str(command.params.get("version") or "")
        if command.action == "fw_update":
            # fw_update waits until it is safe: the engine stopped.
            while self.state.run_state == "running":  # noqa: ASYNC110 - a state, not an event
                await asyncio.sleep(step)
        for pct in (0, 50, 100):
            await self._ota_phase(command, "downloading", pct)
            await asyncio.sleep(step / 2)
        if "ota_fail" in self.spec.faults or not version:
            detail = "image checksum mismatch" if version else "no version in params"
            await self._ota_phase(command, "failed", None, detail)
            body = {"command_id": command.command_id, "status": "failed", "detail": detail}
            await self._send_when_connected("ack", body, wait=True)
            return
        await self._ota_phase(command, "installing", None)
        await asyncio.sleep(step)
        await self._ota_phase(command, "rebooting", None)
        if "wrong_version" not in self.spec.faults:
            self.state.fw = version
        self.state.run_state = "stopped"
        if "never_returns" in self.spec.faults:
            self.go_offline(None, announce=False)
        else:
            self.go_offline(self.state.return_delay_s(self.fleet.timing), announce=True)

    async def _ota_phase(
        self, command: Command, phase: str, pct: float | None, detail: str | None = None
    ) -> None:
        body = {
            "command_id": command.command_id,
            "phase": phase,
            "progress_pct": pct,
            "detail": detail,
        }
        await self._send_when_connected("ota", body, wait=phase == "failed")


def _now() -> datetime:
    return datetime.now(UTC)
