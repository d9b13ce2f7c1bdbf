"""Records what devices were sent and what they answered, from the broker's side (a script).

Run by the fault suite as its own process, so a broker restart only makes it reconnect: it
keeps a persistent MQTT session (clean start off, long expiry), so QoS 1 messages published
while it was away wait for it. One JSON line per message: `{"kind": "down"|"ack", "device",
"command_id", "status", "dup"}`.
"""

import argparse
import asyncio
import json
import sys
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


async def observe(args: argparse.Namespace) -> None:
    """Subscribe and append records until killed; reconnect with a capped backoff."""
    out = Path(args.out).open("a", buffering=1)  # noqa: SIM115, ASYNC230 - opened once, for the life of the process
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    delay = 0.2
    while True:
        try:
            async with aiomqtt.Client(
                "127.0.0.1",
                args.port,
                username=args.username,
                password=args.password,
                identifier="faults-observer",
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=False,
                properties=props,
                keepalive=10,
            ) as client:
                await client.subscribe("devices/+/down/#", qos=1)
                await client.subscribe("devices/+/up/ack", qos=1)
                delay = 0.2
                async for message in client.messages:
                    parts = str(message.topic).split("/")
                    try:
                        body = json.loads(bytes(message.payload))
                    except (ValueError, TypeError):
                        continue
                    if not isinstance(body, dict):
                        continue
                    record = {
                        "kind": "down" if parts[2] == "down" else "ack",
                        "device": parts[1],
                        "command_id": body.get("command_id") or body.get("id"),
                        "status": body.get("status"),
                        "action": body.get("action"),
                    }
                    out.write(json.dumps(record) + "\n")
        except aiomqtt.MqttError as exc:
            print(f"observer: {exc}; reconnecting in {delay:.1f}s", file=sys.stderr)  # noqa: T201
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--username", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--out", required=True)
    asyncio.run(observe(parser.parse_args()))


if __name__ == "__main__":
    main()
