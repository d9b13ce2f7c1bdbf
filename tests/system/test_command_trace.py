"""A command is one trace: the HTTP request, the dispatch through Kafka, the gateway's MQTT
publish, the device's acks and the status update, on the real Kafka, Mosquitto and PostgreSQL.

The commands service and the gateway run in this process, each with its own tracer provider
exporting to one in-memory exporter; the device is an MQTT client with an account issued through
the gateway's credentials route. The MQTT hop carries no trace context (the firmware contract has
none): the gateway's map from command to publish span is what joins the device's reports to the
command's trace, so without it the reports' spans start traces of their own and this test fails.
"""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiomqtt
import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from commands.app import create_app
from commands.testing import ADMIN, TOPICS, Api, Bus, eventually, settings_for
from common.contracts import commands, device
from common.testing.auth import TestIssuer
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses
from gateway.app import create_app as create_gateway_app
from gateway.dynsec import DynsecAdmin
from gateway.settings import GatewaySettings
from gateway.testing import Broker, admin_session, bridge_account

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
async def world(
    stack: StackAddresses, kafka_topics: KafkaTopics, fresh_database: Migrate
) -> AsyncIterator[dict[str, Any]]:
    await kafka_topics.create(*(t.name for t in TOPICS), device.DEADLETTER.name)
    gateway_db = await fresh_database("gateway")
    commands_db = await fresh_database("commands")
    prefix = kafka_topics.prefix
    spans = InMemorySpanExporter()
    issuer = TestIssuer()
    app = create_app(
        settings_for(stack, commands_db, prefix),
        verifier=issuer.verifier(),
        span_processors=(SimpleSpanProcessor(spans),),
    )
    broker = Broker.from_env()
    bus = Bus(stack.kafka_bootstrap_servers, prefix)
    device_id = f"T{uuid.uuid4().hex[:10]}"
    async with admin_session(broker) as admin, bridge_account(admin) as account:
        await only_uplinks_of(admin, account.share_group, device_id)
        gateway_app = create_gateway_app(
            GatewaySettings(
                env="test",
                database_url=gateway_db,
                kafka_bootstrap_servers=stack.kafka_bootstrap_servers,
                kafka_topic_prefix=prefix,
                mqtt_username=account.username,
                mqtt_password=account.password,
                mqtt_share_group=account.share_group,
                mqtt_client_id=f"test-gw-{uuid.uuid4().hex[:8]}",
                mqtt_session_expiry_s=60,
                outbox_poll_interval_s=0.05,
            ),
            verifier=issuer.verifier(),
            span_processors=(SimpleSpanProcessor(spans),),
        )
        async with (
            app.router.lifespan_context(app),
            gateway_app.router.lifespan_context(gateway_app),
        ):
            async with asyncio.timeout(20):
                await gateway_app.state.bridge.connected.wait()
                await gateway_app.state.admin.ready.wait()
            await bus.start()
            commands_http = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://commands"
            )
            gateway_http = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=gateway_app),
                base_url="http://gateway",
                headers=issuer.headers(ADMIN),
            )
            try:
                yield {
                    "api": Api(commands_http, issuer, bus),
                    "bus": bus,
                    "gateway": gateway_http,
                    "broker": broker,
                    "spans": spans,
                    "device_id": device_id,
                    "prefix": prefix,
                }
            finally:
                await commands_http.aclose()
                await gateway_http.aclose()
                await bus.stop()


async def only_uplinks_of(admin: DynsecAdmin, share_group: str, device_id: str) -> None:
    """Narrow this run's bridge account to its device's uplinks (as test_firmware_e2e does):
    a shared subscription receives every device of the broker, and another run's flood queued
    ahead of ours stalls the gateway's command publishes."""
    role = f"bridge:{share_group}"
    receive = {"rolename": role, "acltype": "publishClientReceive"}
    answers = await admin.execute(
        [
            {"command": "removeRoleACL", **receive, "topic": "devices/+/up/#"},
            {"command": "addRoleACL", **receive, "topic": "devices/+/up/#", "allow": False,
             "priority": 0},
            {"command": "addRoleACL", **receive, "topic": f"devices/{device_id}/up/#",
             "allow": True, "priority": 10},
        ]
    )  # fmt: skip
    for answer in answers:
        assert not answer.get("error"), answer


async def acking_device(client: aiomqtt.Client, device_id: str) -> None:
    """The device: every command is accepted, then done."""
    async for message in client.messages:
        command = json.loads(message.payload)
        for status in ("accepted", "succeeded"):
            body = {"command_id": command["command_id"], "status": status}
            await client.publish(f"devices/{device_id}/up/ack", json.dumps(body), qos=1)


def of_kind(spans: Sequence[ReadableSpan], kind: SpanKind, name_part: str) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is kind and name_part in s.name]


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[int]:
    """Span ids of `span`'s parents, nearest first, as far as the exported spans reach."""
    chain: list[int] = []
    parent = span.parent
    while parent is not None:
        chain.append(parent.span_id)
        found = by_id.get(parent.span_id)
        parent = found.parent if found is not None else None
    return chain


async def test_command_is_one_trace_from_http_to_the_status_update(
    world: dict[str, Any],
) -> None:
    api: Api = world["api"]
    spans: InMemorySpanExporter = world["spans"]
    device_id: str = world["device_id"]
    issued = await world["gateway"].put(f"/internal/v1/devices/{device_id}/credentials")
    assert issued.status_code == 201, issued.text
    creds = issued.json()
    await world["bus"].device_registered(device_id)
    await api.known(device_id)
    broker: Broker = world["broker"]
    client = aiomqtt.Client(
        broker.host,
        broker.port,
        username=creds["username"],
        password=creds["password"],
        identifier=creds["client_id"],
        protocol=aiomqtt.ProtocolVersion.V5,
    )
    try:
        async with client:
            await client.subscribe(f"devices/{device_id}/down/command", qos=1)
            device_task = asyncio.create_task(acking_device(client, device_id))
            try:
                response = await api.send(device_id, {"action": "reboot"})
                assert response.status_code == 202, response.text
                command_id = response.json()["id"]
                await api.wait_status(command_id, "succeeded", deadline_s=30)
            finally:
                device_task.cancel()
                await asyncio.gather(device_task, return_exceptions=True)
    finally:
        await world["gateway"].delete(f"/internal/v1/devices/{device_id}/credentials")

    async def update_spans() -> list[ReadableSpan]:
        return [
            s
            for s in spans.get_finished_spans()
            if s.name == "command ack succeeded"
            and (s.attributes or {}).get("command.id") == command_id
        ]

    # The update's span ends after its batch commits, a moment after the HTTP read saw it.
    update = (await eventually(update_spans, deadline_s=10))[0]
    finished = spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}

    posts = [
        s
        for s in of_kind(finished, SpanKind.SERVER, "POST")
        if "/commands" in str((s.attributes or {}).get("http.route", ""))
    ]
    assert len(posts) == 1, [s.name for s in posts]
    trace_id = posts[0].context.trace_id

    # The gateway's handling of the dispatch record. It reads dispatches a poll at a time, and
    # FastStream's spans of a whole poll start a trace of their own (they only link the
    # records'): each record is handled in a consumer span of its own trace.
    dispatched = [
        s
        for s in of_kind(finished, SpanKind.CONSUMER, commands.DISPATCH.name)
        if s.context.trace_id == trace_id
    ]
    published = of_kind(finished, SpanKind.PRODUCER, f"devices/{device_id}/down/command")
    # The commands service's spans of applying the device's reports (`ack accepted`, `ack
    # succeeded`); FastStream's span of a whole batch starts a trace of its own and only links.
    reported = [
        s
        for s in of_kind(finished, SpanKind.CONSUMER, "command ack ")
        if (s.attributes or {}).get("command.id") == command_id
    ]
    assert len(dispatched) == 1, [s.name for s in dispatched]
    assert len(published) == 1, [s.name for s in published]
    assert sorted(s.name for s in reported) == ["command ack accepted", "command ack succeeded"]

    def trace_of(s: ReadableSpan) -> str:
        return f"{s.context.trace_id:032x}"

    expected = f"{trace_id:032x}"
    assert trace_of(dispatched[0]) == expected, "dispatch left the request's trace"
    assert trace_of(published[0]) == expected, "MQTT publish left the trace"
    assert [trace_of(s) for s in reported] == [expected] * 2, "a report left the trace"
    assert trace_of(update) == expected, "the status update left the trace"

    # The parent links: the publish happens inside the dispatch consumer's handling; each report
    # is applied under the publish of its command (the context the gateway put on the report);
    # and all of it hangs off the HTTP request.
    assert dispatched[0].context.span_id in ancestors(published[0], by_id)
    for span in reported:
        assert span.parent is not None
        assert span.parent.span_id == published[0].context.span_id, span.name
    assert posts[0].context.span_id in ancestors(update, by_id)
