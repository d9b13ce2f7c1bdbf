"""The simulator against the real broker, gateway and Kafka: commands change what devices report.

Start makes telemetry say `running`; an OTA goes downloading → installing → rebooting, offline,
and back online with the new version, the WiFi unit before the GSM unit; a unit with the
`ota_fail` fault reports `failed`; a command already run is ignored; an OTA whose broker session
drops mid-download still ends with the new version.
"""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from common.contracts import commands, device
from common.events import encode, new_event
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses
from gateway.simulator.__main__ import parse_args, run
from gateway.testing import (
    TOPICS,
    Broker,
    KafkaTail,
    admin_session,
    bridge_account,
    running_gateway,
)

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
async def fleet(
    stack: StackAddresses, kafka_topics: KafkaTopics, fresh_database: Migrate, tmp_path_factory: Any
) -> AsyncIterator[dict[str, Any]]:
    await kafka_topics.create(*TOPICS)
    url = await fresh_database("gateway")
    tag = uuid.uuid4().hex[:6]
    rows: list[dict[str, Any]] = [
        {"id": f"S{tag}-wifi", "model": "Ultra", "transport": "wifi", "gps": False},
        {"id": f"S{tag}-gsm", "model": "D100", "engine": "diesel", "transport": "gsm", "gps": True},
        {"id": f"S{tag}-bad", "model": "X Pro", "transport": "wifi", "gps": False},
    ]
    path: Path = tmp_path_factory.mktemp("sim") / "devices.json"
    broker = Broker.from_env()
    names = [kafka_topics.prefix + t for t in TOPICS]
    async with (
        admin_session(broker) as admin,
        bridge_account(admin) as account,
        running_gateway(
            database_url=url,
            kafka_bootstrap=stack.kafka_bootstrap_servers,
            topic_prefix=kafka_topics.prefix,
            account=account,
        ),
        KafkaTail(stack.kafka_bootstrap_servers, names) as tail,
    ):
        for row in rows:
            row.update(name=row["id"], firmware_version="1.0.0", password=uuid.uuid4().hex)
            await admin.ensure_device(row["id"], row["password"])
        path.write_text(  # noqa: ASYNC240 - a tiny file
            json.dumps({"mqtt": {"host": broker.host, "port": broker.port}, "devices": rows})
        )
        args = parse_args(
            [
                "--devices",
                str(path),
                "--time-factor",
                "0.05",
                "--telemetry-interval",
                "0.5",
                "--fault",
                f"ota_fail={rows[2]['id']}",
                "--log-level",
                "WARNING",
            ]
        )
        simulator = asyncio.create_task(run(args))
        producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap_servers)
        await producer.start()
        try:
            yield {
                "ids": [r["id"] for r in rows],
                "tail": tail,
                "producer": producer,
                "prefix": kafka_topics.prefix,
            }
        finally:
            await producer.stop()
            simulator.cancel()
            for row in rows:
                await admin.remove_device(row["id"])


async def send(fleet: dict[str, Any], device_id: str, action: str, **params: Any) -> str:
    command = commands.CommandDispatch(
        command_id=f"c-{uuid.uuid4().hex[:8]}",
        device_id=device_id,
        action=action,
        params=params,
        expires_at=datetime.now(UTC) + timedelta(minutes=2),
    )
    event = new_event(type="command.dispatch", data=command, source="test", key=device_id)
    await fleet["producer"].send_and_wait(
        fleet["prefix"] + commands.DISPATCH.name, encode(event), key=device_id.encode()
    )
    return command.command_id


async def test_start_makes_telemetry_running(fleet: dict[str, Any]) -> None:
    device_id = fleet["ids"][0]
    tail: KafkaTail = fleet["tail"]
    telemetry = fleet["prefix"] + device.TELEMETRY.name
    await tail.wait_for(telemetry, lambda e: e["key"] == device_id)
    command_id = await send(fleet, device_id, "start")
    reports = fleet["prefix"] + device.REPORT.name
    await tail.wait_for(
        reports,
        lambda e: e["data"]["command_id"] == command_id and e["data"]["status"] == "succeeded",
    )
    await tail.wait_for(
        telemetry, lambda e: e["key"] == device_id and e["data"]["run_state"] == "running"
    )
    acks = tail.matching(reports, lambda e: e["data"]["command_id"] == command_id)
    assert [json.loads(a.value)["data"]["status"] for a in acks] == ["accepted", "succeeded"]


async def test_ota_returns_with_new_version_wifi_before_gsm(fleet: dict[str, Any]) -> None:
    wifi, gsm, _ = fleet["ids"]
    tail: KafkaTail = fleet["tail"]
    presence = fleet["prefix"] + device.PRESENCE.name
    await tail.wait_for(presence, lambda e: e["key"] == wifi)
    await tail.wait_for(presence, lambda e: e["key"] == gsm)
    for device_id in (gsm, wifi):
        await send(
            fleet, device_id, "force_ota", version="2.0.0", url="http://x/fw", sha256="0", size=1
        )

    def back(device_id: str) -> Any:
        return lambda e: (
            e["key"] == device_id and e["data"]["state"] == "online" and e["data"]["fw"] == "2.0.0"
        )

    wifi_back = (await tail.wait_for(presence, back(wifi), timeout_s=30))[0]
    gsm_back = (await tail.wait_for(presence, back(gsm), timeout_s=30))[0]

    def returned_at(record: Any) -> datetime:
        # When the gateway received the device's status, not the Kafka record's time: a gateway
        # busy for a moment sends the statuses it read meanwhile in one batch, with one time.
        return datetime.fromisoformat(json.loads(record.value)["data"]["received_at"])

    assert returned_at(wifi_back) < returned_at(gsm_back)
    phases = [
        json.loads(r.value)["data"]["phase"]
        for r in tail.matching(
            fleet["prefix"] + device.REPORT.name,
            lambda e: e["key"] == gsm and e["data"]["kind"] == "ota",
        )
    ]
    assert phases[-3:] == ["downloading", "installing", "rebooting"]
    offline = tail.matching(presence, lambda e: e["key"] == gsm and e["data"]["state"] == "offline")
    assert offline, "the unit went offline while it rebooted"


async def test_faulty_ota_reports_failed_and_repeat_is_ignored(fleet: dict[str, Any]) -> None:
    bad = fleet["ids"][2]
    tail: KafkaTail = fleet["tail"]
    reports = fleet["prefix"] + device.REPORT.name
    await tail.wait_for(fleet["prefix"] + device.PRESENCE.name, lambda e: e["key"] == bad)
    command_id = await send(fleet, bad, "force_ota", version="9.9.9")
    await tail.wait_for(
        reports, lambda e: e["data"]["command_id"] == command_id and e["data"]["phase"] == "failed"
    )
    # The same command id again, as a new dispatch: the device already ran it.
    repeat = commands.CommandDispatch(
        command_id=command_id,
        device_id=bad,
        action="start",
        expires_at=datetime.now(UTC) + timedelta(minutes=1),
    )
    event = new_event(type="command.dispatch", data=repeat, source="test", key=bad)
    await fleet["producer"].send_and_wait(
        fleet["prefix"] + commands.DISPATCH.name, encode(event), key=bad.encode()
    )
    later = await send(fleet, bad, "stop")
    await tail.wait_for(
        reports, lambda e: e["data"]["command_id"] == later and e["data"]["status"] == "succeeded"
    )
    accepted = tail.matching(
        reports,
        lambda e: (
            e["data"]["command_id"] == command_id
            and e["data"]["kind"] == "ack"
            and e["data"]["status"] == "accepted"
        ),
    )
    assert len(accepted) == 1


async def test_an_ota_survives_a_lost_broker_session(fleet: dict[str, Any], tmp_path: Path) -> None:
    """The image comes over HTTP, not MQTT: a unit whose broker session drops mid-download
    (a broker restart, a network blip) finishes the update and comes back with the new
    version (it used to give up and come back with the old one)."""
    tail: KafkaTail = fleet["tail"]
    presence = fleet["prefix"] + device.PRESENCE.name
    reports = fleet["prefix"] + device.REPORT.name
    broker = Broker.from_env()
    unit_id, password = f"S{uuid.uuid4().hex[:6]}-ota", uuid.uuid4().hex
    unit = {
        "id": unit_id,
        "name": "ota unit",
        "model": "Ultra",
        "transport": "wifi",
        "gps": False,
        "firmware_version": "1.0.0",
        "password": password,
    }
    path = tmp_path / "devices.json"
    path.write_text(
        json.dumps({"mqtt": {"host": broker.host, "port": broker.port}, "devices": [unit]})
    )
    async with admin_session(broker) as admin:
        await admin.ensure_device(unit_id, password)
        # Real time: the download takes 1.5 s, long enough to cut the session in the middle.
        args = parse_args(
            ["--devices", str(path), "--time-factor", "1", "--telemetry-interval", "30",
             "--log-level", "WARNING"]
        )  # fmt: skip
        simulator = asyncio.create_task(run(args))
        try:
            await tail.wait_for(presence, lambda e: e["key"] == unit_id)
            command_id = await send(
                fleet,
                unit_id,
                "force_ota",
                version="3.0.0",
                url="http://x/fw",
                sha256="0",
                size=1,
            )
            await tail.wait_for(
                reports,
                lambda e: (
                    e["data"]["command_id"] == command_id
                    and e["data"].get("phase") == "downloading"
                ),
            )
            # Removing the account makes the broker drop the unit at once; it is back (same
            # password) before the unit's reconnect.
            await admin.remove_device(unit_id)
            await admin.ensure_device(unit_id, password)
            await tail.wait_for(
                presence,
                lambda e: (
                    e["key"] == unit_id
                    and e["data"]["state"] == "online"
                    and e["data"]["fw"] == "3.0.0"
                ),
                timeout_s=60,
            )
            failed = tail.matching(
                reports,
                lambda e: (
                    e["data"]["command_id"] == command_id and e["data"].get("phase") == "failed"
                ),
            )
            assert failed == []
        finally:
            simulator.cancel()
            await admin.remove_device(unit_id)
