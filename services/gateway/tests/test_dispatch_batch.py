"""A poll of dispatched commands: each command goes to its device once, and a publish that
failed is retried alone when the poll is read again. Real PostgreSQL; the MQTT publish is a
fake that fails for one device."""

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from common.contracts import commands
from common.db import make_engine, make_sessionmaker
from common.events import Envelope, new_event
from common.testing.plugin import Migrate
from gateway import handlers, store
from gateway.bridge import Bridge
from gateway.settings import GatewaySettings

pytestmark = pytest.mark.stack


def _dispatch(device_id: str, *, expired: bool = False) -> Envelope[commands.CommandDispatch]:
    delta = timedelta(seconds=-1 if expired else 60)
    data = commands.CommandDispatch(
        command_id=f"cmd-{uuid.uuid4().hex[:8]}",
        device_id=device_id,
        action="reboot",
        expires_at=datetime.now(UTC) + delta,
    )
    return new_event(type=commands.DISPATCH.event_type, data=data, source="test", key=device_id)


class _Publishes:
    """Stands in for the MQTT publish: records it, or fails for the devices in `down`."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.down: set[str] = set()

    async def __call__(self, device_id: str, payload: bytes, **_: Any) -> None:
        if device_id in self.down:
            raise ConnectionError("MQTT publish not acknowledged")
        self.sent.append(json.loads(payload)["command_id"])


async def test_a_poll_delivers_each_command_once_and_retries_only_a_failed_publish(
    fresh_database: Migrate,
) -> None:
    engine = make_engine(await fresh_database("gateway"), pool_size=2)
    sessions = make_sessionmaker(engine)
    bridge = Bridge(GatewaySettings(), make_producer=lambda: None)  # never started
    publishes = _Publishes()
    bridge.publish_command = publishes  # type: ignore[method-assign]
    ok, failing, old = _dispatch("dev-ok"), _dispatch("dev-down"), _dispatch("dev-ok", expired=True)
    poll = [ok, failing, ok, old]  # `ok` twice: a redelivery within one poll
    try:
        publishes.down.add("dev-down")
        with pytest.raises(ConnectionError):
            await handlers.deliver_commands(sessions=sessions, bridge=bridge, events=poll)
        assert publishes.sent == [ok.data.command_id]

        # The poll is read again: only the failed publish goes out again.
        publishes.down.clear()
        outcomes = await handlers.deliver_commands(sessions=sessions, bridge=bridge, events=poll)
        assert outcomes == {
            ok.data.command_id: "duplicate",
            failing.data.command_id: "sent",
            old.data.command_id: "duplicate",
        }
        assert publishes.sent == [ok.data.command_id, failing.data.command_id]

        async with sessions() as session:
            rows = (await session.execute(select(store.outbox.c.payload))).scalars().all()
        statuses = sorted(
            (e["data"]["command_id"], e["data"]["status"]) for e in map(json.loads, rows)
        )
        assert statuses == sorted(
            [
                (ok.data.command_id, "sent"),
                (failing.data.command_id, "sent"),
                (old.data.command_id, "expired"),
            ]
        )
    finally:
        await engine.dispose()
