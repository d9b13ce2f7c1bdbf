"""Kafka entry points (thin): each topic the service follows, to its use case.

Requests from other services are accepted one record at a time (each is an accept with its own
answer); everything else is applied a poll at a time (`commands.progress`), with a short poll
wait on the topics a command's latency depends on.
"""

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from faststream.kafka import KafkaBroker

from commands.handlers import CommandService
from commands.progress import Progress
from commands.settings import CommandsSettings
from common.contracts import commands, device, firmware, fleet
from common.contracts.device import DeviceReport
from common.contracts.topic import Topic
from common.events import Envelope
from common.kafka import ConsumerStats, subscribe
from common.kafka_batch import subscribe_batch

SOURCE = "commands"


def register(
    broker: KafkaBroker, service: CommandService, progress: Progress, settings: CommandsSettings
) -> dict[str, ConsumerStats]:
    """Subscribe the service's consumers (one consumer group per topic)."""
    prefix = settings.kafka_topic_prefix
    fast, slow = settings.batch_wait_ms, settings.projection_batch_wait_ms

    async def apply_reports(events: Sequence[Envelope[DeviceReport]]) -> None:
        await progress.apply_reports(events, traceparents=_record_traceparents(broker))

    batches: dict[str, tuple[Topic[Any], Callable[[Sequence[Any]], Awaitable[None]], int]] = {
        "gateway-status": (commands.STATUS, progress.apply_gateway_statuses, fast),
        "reports": (device.REPORT, apply_reports, fast),
        "telemetry": (device.TELEMETRY, progress.apply_telemetry, fast),
        "presence": (device.PRESENCE, progress.apply_presence, fast),
        "fleet-devices": (fleet.DEVICE, progress.apply_fleet_devices, slow),
        "releases": (firmware.RELEASE, progress.apply_releases, slow),
    }
    stats: dict[str, ConsumerStats] = {
        "requests": subscribe(
            broker,
            commands.REQUEST,
            group_id=f"{prefix}commands.requests",
            handler=service.handle_request,
            source=SOURCE,
            topic_prefix=prefix,
        )
    }
    for name, (topic, handler, wait_ms) in batches.items():
        stats[name] = subscribe_batch(
            broker,
            topic,
            group_id=f"{prefix}commands.{name}",
            handler=handler,
            source=SOURCE,
            topic_prefix=prefix,
            max_records=settings.batch_max_records,
            batch_timeout_ms=wait_ms,
        )
    return stats


def _record_traceparents(broker: KafkaBroker) -> dict[str, str]:
    """Event id → `traceparent` of the records of the batch being handled that carry one.

    FastStream's span of a batch is a new trace (it only links the records'), so the reports'
    own contexts (the gateway's publish of their command) are read here. Reports are few; only
    a record with a trace context has its value parsed for its event id.
    """
    message = broker.context.get_local("message")
    raw = getattr(message, "raw_message", None)
    records = raw if isinstance(raw, tuple) else (() if raw is None else (raw,))
    found: dict[str, str] = {}
    for record in records:
        traceparent = next((v for k, v in record.headers or () if k == "traceparent"), None)
        if traceparent is None:
            continue
        try:
            event_id = json.loads(record.value)["event_id"]
            found[str(event_id)] = traceparent.decode()
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # the batch consumer dead-letters what is not an event
    return found
