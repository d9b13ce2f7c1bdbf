"""The fleet's Kafka consumers: device presence, telemetry and reports, applied in batches."""

from collections.abc import Sequence
from dataclasses import dataclass

from faststream.kafka import KafkaBroker

from common.contracts.device import (
    PRESENCE,
    REPORT,
    TELEMETRY,
    DevicePresence,
    DeviceReport,
    DeviceTelemetry,
)
from common.events import Envelope
from common.kafka_batch import BatchStats, subscribe_batch
from fleet import handlers
from fleet.settings import FleetSettings


@dataclass(frozen=True)
class Consumers:
    """Counters of the three consumers (health, tests, benchmarks)."""

    presence: BatchStats
    telemetry: BatchStats
    reports: BatchStats


def register(
    broker: KafkaBroker, settings: FleetSettings, sessions: handlers.Sessions
) -> Consumers:
    """Subscribe the fleet's consumers on `broker` (before it starts)."""
    prefix = settings.kafka_topic_prefix

    async def on_presence(events: Sequence[Envelope[DevicePresence]]) -> None:
        await handlers.apply_presence(sessions, events)

    async def on_telemetry(events: Sequence[Envelope[DeviceTelemetry]]) -> None:
        await handlers.apply_telemetry(sessions, events, history=settings.position_history)

    async def on_report(events: Sequence[Envelope[DeviceReport]]) -> None:
        await handlers.apply_reports(sessions, events)

    return Consumers(
        presence=subscribe_batch(
            broker,
            PRESENCE,
            group_id=f"{prefix}fleet-presence",
            handler=on_presence,
            source="fleet",
            topic_prefix=prefix,
        ),
        telemetry=subscribe_batch(
            broker,
            TELEMETRY,
            group_id=f"{prefix}fleet-telemetry",
            handler=on_telemetry,
            source="fleet",
            topic_prefix=prefix,
            max_records=settings.telemetry_batch_max,
            batch_timeout_ms=settings.telemetry_batch_timeout_ms,
            consumers=settings.telemetry_consumers,
        ),
        reports=subscribe_batch(
            broker,
            REPORT,
            group_id=f"{prefix}fleet-reports",
            handler=on_report,
            source="fleet",
            topic_prefix=prefix,
        ),
    )
