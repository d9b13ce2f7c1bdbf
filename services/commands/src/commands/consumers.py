"""Kafka entry points (thin): each topic the service follows, to its use case.

Requests from other services are accepted one record at a time (each is an accept with its own
answer); everything else is applied a poll at a time (`commands.progress`), with a short poll
wait on the topics a command's latency depends on.
"""

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
from common.kafka_batch import record_traceparents, subscribe_batch

SOURCE = "commands"


def register(
    broker: KafkaBroker, service: CommandService, progress: Progress, settings: CommandsSettings
) -> dict[str, ConsumerStats]:
    """Subscribe the service's consumers (one consumer group per topic)."""
    prefix = settings.kafka_topic_prefix
    fast, slow = settings.batch_wait_ms, settings.projection_batch_wait_ms

    async def apply_reports(events: Sequence[Envelope[DeviceReport]]) -> None:
        await progress.apply_reports(events, traceparents=record_traceparents(broker))

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
