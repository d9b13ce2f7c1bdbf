"""The broker's device accounts, administered through Mosquitto's dynamic security plugin.

Commands go as JSON to `$CONTROL/dynamic-security/v1` over the admin account's MQTT session;
answers come back on `.../response`, matched by `correlationData`. Mosquitto 2.0.11's dynsec
does not substitute `%u`/`%c` in ACLs, so each device has its own role with explicit topics.
"""

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any

from gateway.mqtt import ConnectOptions, MqttConnection

logger = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"


class DynsecError(Exception):
    """The plugin refused a command (the message is its error text)."""


def device_role(device_id: str) -> str:
    """The per-device role name."""
    return f"device:{device_id}"


def device_acls(device_id: str) -> list[dict[str, Any]]:
    """A device may publish only under its `up/`, and read only its `down/`."""
    up, down = f"devices/{device_id}/up/#", f"devices/{device_id}/down/#"
    return [
        {"acltype": "publishClientSend", "topic": up, "allow": True},
        {"acltype": "subscribeLiteral", "topic": down, "allow": True},
        {"acltype": "subscribePattern", "topic": down, "allow": True},
        {"acltype": "publishClientReceive", "topic": down, "allow": True},
    ]


class DynsecAdmin:
    """One admin session to the broker; `execute()` runs commands and returns the answers."""

    def __init__(
        self, *, host: str, port: int, username: str, password: str, client_id: str
    ) -> None:
        self._host, self._port = host, port
        self._username, self._password = username, password
        self._client_id = client_id
        self._client: MqttConnection | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._lock = asyncio.Lock()
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the admin session connected (reconnecting with backoff) until `stop`."""
        delay = 0.5
        while not stop.is_set():
            conn: MqttConnection | None = None
            try:
                conn = await MqttConnection.open(
                    ConnectOptions(
                        host=self._host,
                        port=self._port,
                        client_id=self._client_id,
                        username=self._username,
                        password=self._password,
                        session_expiry_s=0,
                        receive_maximum=100,
                        max_packet_bytes=16 * 1024 * 1024,
                        clean_start=True,
                    ),
                    self._on_answer,
                )
                await asyncio.wait_for(conn.subscribe(RESPONSE_TOPIC, qos=1), timeout=10)
                self._client = conn
                self.ready.set()
                delay = 0.5
                stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({conn.closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
                if stop.is_set():
                    await conn.disconnect()
                else:
                    logger.warning("dynsec admin session lost")
            except (OSError, TimeoutError) as exc:  # MqttError is a ConnectionError
                logger.warning("dynsec admin session failed", extra={"error": repr(exc)})
            finally:
                self._client = None
                self.ready.clear()
                if conn is not None:
                    conn.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(delay * 2, 10.0)

    def _on_answer(
        self,
        conn: MqttConnection,
        _topic: str,
        payload: bytes,
        packet_id: int,
        qos: int,
        _retained: bool,
    ) -> None:
        if qos:
            conn.puback((packet_id,))
        try:
            answers = json.loads(payload).get("responses", [])
        except (ValueError, TypeError, AttributeError):
            return
        for answer in answers:
            future = self._pending.pop(str(answer.get("correlationData")), None)
            if future is not None and not future.done():
                future.set_result(answer)

    async def execute(
        self, commands: list[dict[str, Any]], *, timeout_s: float = 10.0
    ) -> list[dict[str, Any]]:
        """Send `commands` in one message; the answers in order (each may hold an `error`)."""
        client = self._client
        if client is None:
            raise ConnectionError("not connected to the broker's dynamic security plugin")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[dict[str, Any]]] = []
        tagged = []
        for command in commands:
            tag = uuid.uuid4().hex
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._pending[tag] = future
            futures.append(future)
            tagged.append({**command, "correlationData": tag})
        try:
            async with self._lock:
                await client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}).encode())
            async with asyncio.timeout(timeout_s):
                return list(await asyncio.gather(*futures))
        except TimeoutError as exc:
            raise ConnectionError("the dynamic security plugin did not answer") from exc
        finally:
            for command in tagged:
                self._pending.pop(command["correlationData"], None)

    async def ensure_device(self, device_id: str, password: str) -> bool:
        """Create the device's account, or set its password; True if it existed."""
        role = device_role(device_id)
        setup: list[dict[str, Any]] = [{"command": "createRole", "rolename": role}]
        setup += [
            {"command": "addRoleACL", "rolename": role, **acl} for acl in device_acls(device_id)
        ]
        # Role and ACLs may exist already (a rotation, or a half-finished earlier call).
        for answer in await self.execute(setup):
            error = answer.get("error")
            if error and "already exists" not in error.lower():
                raise DynsecError(f"{answer.get('command')}: {error}")
        created = await self.execute(
            [
                {
                    "command": "createClient",
                    "username": device_id,
                    "clientid": device_id,
                    "password": password,
                    "roles": [{"rolename": role}],
                }
            ]
        )
        error = created[0].get("error")
        if not error:
            return False
        if "already exists" not in error.lower():
            raise DynsecError(f"createClient: {error}")
        # An existing account: new password (dynsec disconnects sessions using the old one),
        # and make sure it is bound to its client id, enabled and holds its role.
        answers = await self.execute(
            [
                {"command": "setClientPassword", "username": device_id, "password": password},
                {"command": "setClientId", "username": device_id, "clientid": device_id},
                {"command": "enableClient", "username": device_id},
                {"command": "addClientRole", "username": device_id, "rolename": role},
            ]
        )
        for answer in answers[:3]:
            if answer.get("error"):
                raise DynsecError(f"{answer.get('command')}: {answer['error']}")
        return True

    async def remove_device(self, device_id: str) -> bool:
        """Delete the device's account and role (kicking its session); True if it existed."""
        answers = await self.execute(
            [
                {"command": "deleteClient", "username": device_id},
                {"command": "deleteRole", "rolename": device_role(device_id)},
            ]
        )
        for answer in answers:
            error = answer.get("error")
            if error and "not found" not in error.lower():
                raise DynsecError(f"{answer.get('command')}: {error}")
        return not answers[0].get("error")

    async def device_exists(self, device_id: str) -> bool:
        """Does the broker hold an account for the device?"""
        answer = (await self.execute([{"command": "getClient", "username": device_id}]))[0]
        return not answer.get("error")


async def ensure_bridge_account(
    admin: DynsecAdmin, *, username: str, password: str, share_group: str
) -> None:
    """An account like the gateway's for another share group (tests, benchmarks, a 2nd pool).

    Dynsec checks the subscribe ACL against the whole `$share/<group>/...` filter, so each share
    group needs its own grant.
    """
    role = f"bridge:{share_group}"
    acls = [
        ("subscribePattern", f"$share/{share_group}/devices/+/up/#"),
        ("subscribePattern", "devices/+/up/#"),
        ("publishClientReceive", "devices/+/up/#"),
        ("publishClientSend", "devices/+/down/#"),
    ]
    commands: list[dict[str, Any]] = [{"command": "createRole", "rolename": role}]
    commands += [
        {"command": "addRoleACL", "rolename": role, "acltype": t, "topic": topic, "allow": True}
        for t, topic in acls
    ]
    commands.append(
        {
            "command": "createClient",
            "username": username,
            "password": password,
            "roles": [{"rolename": role}],
        }
    )
    for answer in await admin.execute(commands):
        error = answer.get("error")
        if error and "already exists" not in error.lower():
            raise DynsecError(f"{answer.get('command')}: {error}")


async def remove_bridge_account(admin: DynsecAdmin, *, username: str, share_group: str) -> None:
    """Undo `ensure_bridge_account`."""
    await admin.execute(
        [
            {"command": "deleteClient", "username": username},
            {"command": "deleteRole", "rolename": f"bridge:{share_group}"},
        ]
    )
