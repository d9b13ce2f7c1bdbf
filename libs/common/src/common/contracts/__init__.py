"""Versioned topic contracts shared by producers and consumers.

Consumers import these, never the producing service. Within a version, changes are additive.
"""

from common.contracts import commands, device, firmware, fleet, platform, tokens
from common.contracts.topic import Topic

ALL_TOPICS: tuple[Topic, ...] = (  # type: ignore[type-arg]
    device.TELEMETRY,
    device.PRESENCE,
    device.REPORT,
    device.DEADLETTER,
    fleet.DEVICE,
    commands.REQUEST,
    commands.DISPATCH,
    commands.STATUS,
    firmware.RELEASE,
    firmware.ROLLOUT,
    tokens.TOKEN,
    platform.DEADLETTER,
)

__all__ = [
    "ALL_TOPICS",
    "Topic",
    "commands",
    "device",
    "firmware",
    "fleet",
    "platform",
    "tokens",
]
