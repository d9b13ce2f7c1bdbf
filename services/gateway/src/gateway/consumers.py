"""Kafka consumers of the gateway: `command.dispatch.v1` → the device's command topic."""

from faststream.kafka import KafkaBroker
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.contracts import commands
from common.events import Envelope
from common.kafka import ConsumerStats, subscribe
from gateway import handlers
from gateway.bridge import SOURCE, Bridge
from gateway.settings import GatewaySettings


def register(
    broker: KafkaBroker,
    settings: GatewaySettings,
    *,
    sessions: async_sessionmaker[AsyncSession],
    bridge: Bridge,
) -> ConsumerStats:
    """Subscribe the dispatch consumer (one consumer group shared by all replicas)."""

    async def on_dispatch(event: Envelope[commands.CommandDispatch]) -> None:
        await handlers.deliver_command(sessions=sessions, bridge=bridge, event=event)

    return subscribe(
        broker,
        commands.DISPATCH,
        # Prefixed like the topics, so test sessions never join the platform's group.
        group_id=settings.kafka_topic_prefix + settings.dispatch_group_id,
        handler=on_dispatch,
        source=SOURCE,
        topic_prefix=settings.kafka_topic_prefix,
    )
