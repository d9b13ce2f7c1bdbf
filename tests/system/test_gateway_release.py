"""A gone gateway replica's broker session is released without losing what it held.

Mosquitto keeps handing an offline member of the shared subscription its share of the devices'
uplinks, and drops them when the session expires. `python -m gateway release-session` takes
such a session over, forwards what it holds to Kafka and ends it, so the remaining replicas get
everything from then on. Real Mosquitto (dynsec), Kafka and the gateway's own MQTT client.
"""

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from common.contracts import device
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses
from gateway.dynsec import DynsecAdmin
from gateway.mqtt import ConnectOptions, MqttConnection
from gateway.testing import (
    TOPICS,
    Broker,
    KafkaTail,
    admin_session,
    bridge_account,
    device_client,
    running_gateway,
)

pytestmark = pytest.mark.stack

FIRST, THEN = 400, 100


@pytest.fixture(scope="module")
async def admin(stack: StackAddresses) -> AsyncIterator[DynsecAdmin]:
    async with admin_session(Broker.from_env()) as session:
        yield session


def telemetry(seq: int) -> str:
    body = {"ts": time.time(), "run_state": "running", "battery_v": 12.5, "fuel_pct": 50.0}
    return json.dumps({**body, "engine_hours": float(seq)})


async def test_a_gone_replicas_session_is_released_with_everything_it_held(
    stack: StackAddresses,
    kafka_topics: KafkaTopics,
    fresh_database: Migrate,
    admin: DynsecAdmin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One device publishes everything here: the live replica must not rate-limit it.
    monkeypatch.setenv("GATEWAY_DEVICE_RATE_PER_S", "0")
    await kafka_topics.create(*TOPICS)
    topic = kafka_topics.prefix + device.TELEMETRY.name
    url = await fresh_database("gateway")
    device_id, password = f"R{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    await admin.ensure_device(device_id, password)
    broker = Broker.from_env()
    gone_id = f"test-gone-{uuid.uuid4().hex[:8]}"
    async with (
        bridge_account(admin) as account,
        KafkaTail(stack.kafka_bootstrap_servers, [topic]) as tail,
        running_gateway(
            database_url=url,
            kafka_bootstrap=stack.kafka_bootstrap_servers,
            topic_prefix=kafka_topics.prefix,
            account=account,
        ),
    ):
        # A second member of the share group that goes away for good (a scaled-down pod):
        # killed, its session (and subscription) stays with the broker.
        options = ConnectOptions(
            host=broker.host,
            port=broker.port,
            client_id=gone_id,
            username=account.username,
            password=account.password,
            session_expiry_s=120,
        )
        gone = await MqttConnection.open(options, lambda *_: None)
        await gone.subscribe(f"$share/{account.share_group}/devices/+/up/#", qos=1)
        gone.abort()

        def seqs() -> set[int]:
            return {
                int(json.loads(r.value)["data"]["engine_hours"])
                for r in tail.records
                if r.key == device_id.encode()
            }

        async def settled(want: int, timeout_s: float) -> set[int]:
            """The sequence numbers in Kafka once `want` arrived or nothing came for 2 s."""
            deadline, last, since = time.monotonic() + timeout_s, -1, time.monotonic()
            while time.monotonic() < deadline:
                found = seqs()
                if len(found) >= want:
                    return found
                if len(found) != last:
                    last, since = len(found), time.monotonic()
                elif time.monotonic() - since > 2:
                    return found
                await asyncio.sleep(0.1)
            return seqs()

        async with device_client(device_id, password, max_inflight_messages=50) as client:
            for seq in range(FIRST):
                await client.publish(f"devices/{device_id}/up/telemetry", telemetry(seq), qos=1)
            stranded = FIRST - len(await settled(FIRST, 60))
            # Without a release, the gone member's share waits in its session.
            assert stranded > FIRST // 4, f"only {stranded} of {FIRST} went to the gone member"

            # The release must take the session's backlog whatever the per-device limit (more
            # of one device's messages wait there than its burst allows).
            env = {
                **{k: v for k, v in os.environ.items() if k != "GATEWAY_DEVICE_RATE_PER_S"},
                "GATEWAY_ENV": "test",
                "GATEWAY_DATABASE_URL": url,
                "GATEWAY_KAFKA_BOOTSTRAP_SERVERS": stack.kafka_bootstrap_servers,
                "GATEWAY_KAFKA_TOPIC_PREFIX": kafka_topics.prefix,
                "GATEWAY_MQTT_USERNAME": account.username,
                "GATEWAY_MQTT_PASSWORD": account.password,
                "GATEWAY_MQTT_SHARE_GROUP": account.share_group,
                "GATEWAY_LOG_LEVEL": "WARNING",
                # Fewer in flight than the session holds: the rest waits in its queue and
                # must come too, after the UNSUBSCRIBE.
                "GATEWAY_MQTT_RECEIVE_MAXIMUM": "10",
            }
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "gateway", "release-session", "--client-id", gone_id,
                 "--idle-s", "1"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            # The count includes other devices' retained statuses on the shared broker.
            released = re.search(rf"released the session of {gone_id}: (\d+) messages", done.stdout)
            assert released, done.stdout + done.stderr
            assert int(released.group(1)) >= stranded
            missing = sorted(set(range(FIRST)) - await settled(FIRST, 30))
            assert missing == [], f"{len(missing)} still held, first {missing[:10]}"

            # From now on the remaining replica gets every uplink.
            for seq in range(FIRST, FIRST + THEN):
                await client.publish(f"devices/{device_id}/up/telemetry", telemetry(seq), qos=1)
            missing = sorted(set(range(FIRST + THEN)) - await settled(FIRST + THEN, 30))
            assert missing == [], f"{len(missing)} stranded after the release: {missing[:10]}"

        # And the session is gone: connecting under its id finds none.
        again = await MqttConnection.open(options, lambda *_: None)
        try:
            assert again.session_present is False
        finally:
            await again.disconnect(end_session=True)
    await admin.remove_device(device_id)
