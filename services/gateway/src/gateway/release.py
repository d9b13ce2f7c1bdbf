"""`python -m gateway release-session --client-id ID`: end a gone replica's broker session.

The broker keeps handing a shared-subscription member's session its share of the devices'
uplinks while the member is away, and drops them when the session expires (1 h). A replica
removed for good (a scaled-down `gateway-N`) never comes back to take them: this takes its
session over, forwards what it holds to Kafka and ends it (`Bridge.release`). Run it with the
gateway's own settings (any running gateway pod has them), for an id no running replica uses.
"""

import argparse
import asyncio
import sys

from gateway.bridge import Bridge, make_producer
from gateway.settings import GatewaySettings


def main(argv: list[str]) -> int:
    """Parse the arguments and release the session; the exit code."""
    parser = argparse.ArgumentParser(prog="python -m gateway release-session")
    parser.add_argument(
        "--client-id", required=True, help="the gone replica's MQTT client id (gateway-<pod>)"
    )
    parser.add_argument(
        "--idle-s",
        type=float,
        default=3.0,
        help="how long the session must stay quiet before it is unsubscribed, then ended",
    )
    args = parser.parse_args(argv)
    settings = GatewaySettings()
    if args.client_id == settings.mqtt_client_id:
        parser.error("that is this process's own client id: name the gone replica's")
    # No per-device rate limit: the backlog came in over the session's whole absence, and a
    # device's share of it is routinely more than its burst (the limit dropped half of one
    # device's 200 held messages).
    settings = settings.model_copy(
        update={"mqtt_client_id": args.client_id, "device_rate_per_s": 0}
    )
    try:
        forwarded = asyncio.run(_release(settings, args.idle_s))
    except (OSError, TimeoutError) as exc:  # MqttError is a ConnectionError
        # What was not forwarded stays in the session (PUBACK only after Kafka's ack).
        sys.stderr.write(f"session of {args.client_id} not released: {exc!r}; run it again\n")
        return 1
    sys.stdout.write(f"released the session of {args.client_id}: {forwarded} messages forwarded\n")
    return 0


async def _release(settings: GatewaySettings, idle_s: float) -> int:
    bridge = Bridge(settings, lambda: make_producer(settings))
    await bridge.start_producer()
    try:
        return await bridge.release(idle_s=idle_s)
    finally:
        await bridge.stop_producer()
