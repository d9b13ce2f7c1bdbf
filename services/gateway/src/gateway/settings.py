"""Settings of the gateway service (environment prefix `GATEWAY_`)."""

import socket
from typing import ClassVar

from pydantic import Field, SecretStr

from common.settings import DatabaseSettings, service_config


class GatewaySettings(DatabaseSettings):
    """Everything the gateway service reads from its environment.

    MQTT addresses and the admin account may come from the shared prefix
    (`AUTOGEN_MQTT_HOST`, `AUTOGEN_MQTT_PORT`, `AUTOGEN_MQTT_ADMIN_USERNAME/PASSWORD`).
    """

    model_config = service_config("GATEWAY_")
    service_name: ClassVar[str] = "gateway"

    http_port: int = 8105

    database_url: SecretStr = SecretStr(
        "postgresql+asyncpg://gateway:gateway-dev@127.0.0.1:55432/gateway"
    )
    jwks_url: str = "http://127.0.0.1:8101/.well-known/jwks.json"

    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    # The gateway's own broker account (role `gateway`).
    mqtt_username: str = "autogen-gateway"
    mqtt_password: SecretStr = SecretStr("gateway-dev")
    # The dynamic-security admin account: creates, rotates and removes device accounts.
    mqtt_admin_username: str = "autogen-admin"
    mqtt_admin_password: SecretStr = SecretStr("mqtt-admin-dev")
    # Stable per replica: the broker keeps this session (and its un-acked QoS 1 messages)
    # while the process restarts. Two live replicas must not share it.
    mqtt_client_id: str = Field(default_factory=lambda: f"gateway-{socket.gethostname()}")
    mqtt_share_group: str = Field(default="gateway", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    mqtt_session_expiry_s: int = Field(default=3600, ge=0)
    # Un-acked messages the broker may have in flight to us (MQTT v5 Receive Maximum); the
    # gateway acks only after Kafka has the event, so this is its pipeline depth: throughput is
    # at most this many messages per Kafka acks=all round trip. 10,000 did not measurably help
    # on the loaded 2-core box (the limit there is CPU shared with Kafka), and left a bigger
    # heap after bursts; under 1 KB per message in flight, only while Kafka lags.
    mqtt_receive_maximum: int = Field(default=2000, ge=1, le=65535)
    mqtt_keepalive_s: int = Field(default=30, ge=5)
    mqtt_subscribe_timeout_s: float = Field(default=120.0, gt=0)
    mqtt_reconnect_max_s: float = Field(default=10.0, gt=0)
    max_payload_bytes: int = Field(default=16 * 1024, ge=1)
    # MQTT v5 Maximum Packet Size of the gateway's session: the broker does not deliver
    # larger uplinks to it (bounds the memory one message can take). Between this and
    # `max_payload_bytes` an uplink is dead-lettered (its first `max_payload_bytes` kept).
    mqtt_max_packet_bytes: int = Field(default=256 * 1024, ge=1024, le=268_435_455)
    # Per-device uplink budget (token bucket): `device_rate_per_s` messages a second, bursts of
    # `device_burst`; the excess is acknowledged and dropped (counted). 0 turns it off.
    device_rate_per_s: float = Field(default=20.0, ge=0)
    device_burst: float = Field(default=100.0, ge=1)
    # Telemetry waits up to this long to fill Kafka batches (no outbox: the broker session is
    # the buffer). Presence and reports never wait: they are on the commands' round trip.
    uplink_linger_ms: int = Field(default=5, ge=0, le=1000)
    dispatch_group_id: str = "gateway.dispatch"
    # Dispatched commands handled in one transaction (their publishes overlap).
    dispatch_batch_max_records: int = Field(default=200, ge=1, le=5000)
    # The outbox relay (`sent`/`expired` statuses) appends a whole batch before the producer
    # sends, so lingering only added its 5 ms to every status.
    kafka_linger_ms: int = Field(default=0, ge=0, le=1000)
    mqtt_publish_timeout_s: float = Field(default=10.0, gt=0)
