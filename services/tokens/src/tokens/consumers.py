"""Kafka consumers of the tokens service: the device ownership projection."""

from faststream.kafka import KafkaBroker

from common.contracts import fleet
from common.events import Envelope
from common.kafka import ConsumerStats, subscribe
from tokens import handlers
from tokens.handlers import Context


def register(broker: KafkaBroker, ctx: Context) -> ConsumerStats:
    """Project `fleet.device.v1` into the `devices` table."""

    async def on_device(event: Envelope[fleet.FleetDevice]) -> None:
        await handlers.apply_device(ctx, event)

    prefix = ctx.settings.kafka_topic_prefix
    return subscribe(
        broker,
        fleet.DEVICE,
        group_id=f"{prefix}{handlers.DEVICE_CONSUMER}",
        handler=on_device,
        source=handlers.SOURCE,
        topic_prefix=prefix,
    )
