"""The gateway's Prometheus metrics (served on `/metrics` with the common ones)."""

from prometheus_client import Counter, Gauge

UPLINKS = Counter(
    "autogen_gateway_uplinks_total",
    "Device uplinks the gateway finished with, by outcome (forwarded, dead_lettered, dropped).",
    ["outcome"],
)
DEAD_LETTERED = Counter(
    "autogen_gateway_dead_lettered_total",
    "Uplinks refused and sent to device.deadletter.v1, by reason class "
    "(topic, device_id, kind, oversize, json, schema).",
    ["reason"],
)
DROPPED = Counter(
    "autogen_gateway_dropped_total",
    "Uplinks acknowledged to the broker but not forwarded, by reason (rate_limited: over the "
    "per-device rate; overload: QoS 0 while the Kafka pipeline is full).",
    ["reason"],
)
PRODUCE_FAILURES = Counter(
    "autogen_gateway_produce_failures_total",
    "Uplinks whose Kafka produce failed (left un-acked: the broker redelivers them).",
)
CONNECTED_DEVICES = Gauge(
    "autogen_gateway_connected_devices",
    "Devices whose latest status message seen by this replica says online (retained status "
    "and Last Will). Exact with one replica; with several, each counts the devices whose "
    "status messages it received, so the sum can lag when a device's messages alternate "
    "between replicas. The fleet service's presence projection is the authoritative count.",
)
COMMANDS_SENT = Counter(
    "autogen_gateway_commands_sent_total", "Commands published to devices (QoS 1, PUBACKed)."
)
