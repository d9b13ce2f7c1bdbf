"""Kafka entry points (thin): each topic the service follows, to its use case."""

from faststream.kafka import KafkaBroker

from commands.handlers import CommandService
from commands.settings import CommandsSettings
from common.contracts import commands, device, firmware, fleet
from common.kafka import ConsumerStats, subscribe

SOURCE = "commands"


def register(
    broker: KafkaBroker, service: CommandService, settings: CommandsSettings
) -> dict[str, ConsumerStats]:
    """Subscribe the service's consumers (one consumer group per topic)."""
    prefix = settings.kafka_topic_prefix
    wiring = {
        "requests": (commands.REQUEST, service.handle_request),
        "gateway-status": (commands.STATUS, service.apply_gateway_status),
        "reports": (device.REPORT, service.apply_report),
        "telemetry": (device.TELEMETRY, service.apply_telemetry),
        "presence": (device.PRESENCE, service.apply_presence),
        "fleet-devices": (fleet.DEVICE, service.apply_fleet_device),
        "releases": (firmware.RELEASE, service.apply_release),
    }
    return {
        name: subscribe(
            broker,
            topic,  # type: ignore[arg-type]
            group_id=f"{prefix}commands.{name}",
            handler=handler,  # type: ignore[arg-type]
            source=SOURCE,
            topic_prefix=prefix,
        )
        for name, (topic, handler) in wiring.items()
    }
