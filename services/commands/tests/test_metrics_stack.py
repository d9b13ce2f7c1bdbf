"""`/metrics` shows commands by status: transitions as they commit, and what is on its way."""

import re

import pytest

from commands.testing import Api, eventually, new_id

pytestmark = pytest.mark.stack


def _value(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_metrics_count_transitions_and_active_commands(api: Api) -> None:
    device_id = new_id()
    await api.bus.device_registered(device_id)
    await api.known(device_id)
    before = (await api.client.get("/metrics")).text
    queued_before = _value(
        before, "autogen_commands_transitions_total", 'action="set_setting",status="queued"'
    )
    succeeded_before = _value(
        before, "autogen_commands_transitions_total", 'action="set_setting",status="succeeded"'
    )
    body = {"action": "set_setting", "params": {"key": "cooldown_s", "value": 30}}
    cmd = (await api.send(device_id, body)).json()

    async def counted_queued_and_active() -> bool:
        text = (await api.client.get("/metrics")).text
        queued = _value(
            text, "autogen_commands_transitions_total", 'action="set_setting",status="queued"'
        )
        return (
            queued == queued_before + 1
            and _value(text, "autogen_commands_active", 'status="queued"') >= 1
        )

    await eventually(counted_queued_and_active)
    await api.bus.ack(cmd, "succeeded")
    await api.wait_status(cmd["id"], "succeeded")
    text = (await api.client.get("/metrics")).text
    assert (
        _value(
            text, "autogen_commands_transitions_total", 'action="set_setting",status="succeeded"'
        )
        == succeeded_before + 1
    )
