"""Kafka consumers of the gateway: `command.dispatch.v1` → the device's command topic."""

from collections.abc import Sequence

from faststream.kafka import KafkaBroker
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.contracts import commands
from common.events import Envelope
from common.kafka import ConsumerStats
from common.kafka_batch import record_traceparents, subscribe_batch
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
    """Subscribe the dispatch consumer (one consumer group shared by all replicas), a poll of
    dispatches at a time: one transaction and one offset commit per poll, not per command, and
    the publishes of a poll go out together (one at a time, each waiting for its PUBACK and its
    commit, the queue grew to seconds at 50 commands a second)."""
    topic = settings.topic_name(commands.DISPATCH.name)

    async def on_dispatch(events: Sequence[Envelope[commands.CommandDispatch]]) -> None:
        await handlers.deliver_commands(
            sessions=sessions,
            bridge=bridge,
            events=events,
            traceparents=record_traceparents(broker),
            topic=topic,
        )

    return subscribe_batch(
        broker,
        commands.DISPATCH,
        # Prefixed like the topics, so test sessions never join the platform's group.
        group_id=settings.kafka_topic_prefix + settings.dispatch_group_id,
        handler=on_dispatch,
        source=SOURCE,
        topic_prefix=settings.kafka_topic_prefix,
        max_records=settings.dispatch_batch_max_records,
        # A poll returns as soon as records arrive: this is only how often an idle one wakes.
        batch_timeout_ms=500,
    )
