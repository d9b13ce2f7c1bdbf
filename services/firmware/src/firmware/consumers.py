"""Kafka consumers of the firmware service (thin: the work is in `progress` and `projection`)."""

from dataclasses import dataclass

from faststream.kafka import KafkaBroker
from sqlalchemy.ext.asyncio import AsyncEngine

from common.contracts import commands, device, fleet
from common.kafka_batch import BatchStats, subscribe_batch
from firmware.progress import ProgressHandlers
from firmware.projection import FleetProjection
from firmware.settings import FirmwareSettings

SOURCE = "firmware"


@dataclass
class Consumers:
    """Each consumer's counters (for tests and health)."""

    fleet: BatchStats
    presence: BatchStats
    reports: BatchStats
    command_status: BatchStats


def register(
    broker: KafkaBroker, settings: FirmwareSettings, engine: AsyncEngine, handlers: ProgressHandlers
) -> Consumers:
    """Subscribe the service's consumer groups to their topics."""
    prefix = settings.kafka_topic_prefix
    batch = {
        "source": SOURCE,
        "topic_prefix": prefix,
        "max_records": settings.consumer_batch_max,
        "batch_timeout_ms": settings.consumer_batch_timeout_ms,
    }
    projection = FleetProjection(engine, consumer=f"{prefix}firmware-fleet")
    return Consumers(
        fleet=subscribe_batch(
            broker,
            fleet.DEVICE,
            group_id=f"{prefix}firmware-fleet",
            handler=projection.apply,
            **batch,  # type: ignore[arg-type]
        ),
        presence=subscribe_batch(
            broker,
            device.PRESENCE,
            group_id=f"{prefix}firmware-presence",
            handler=handlers.presence,
            **batch,  # type: ignore[arg-type]
        ),
        reports=subscribe_batch(
            broker,
            device.REPORT,
            group_id=f"{prefix}firmware-reports",
            handler=handlers.reports,
            **batch,  # type: ignore[arg-type]
        ),
        command_status=subscribe_batch(
            broker,
            commands.STATUS,
            group_id=f"{prefix}firmware-commands",
            handler=handlers.command_status,
            **batch,  # type: ignore[arg-type]
        ),
    )
