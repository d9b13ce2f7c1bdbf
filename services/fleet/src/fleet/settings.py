"""Settings of the fleet service (environment prefix `FLEET_`)."""

from typing import ClassVar

from pydantic import Field, SecretStr

from common.settings import DatabaseSettings, service_config


class FleetSettings(DatabaseSettings):
    """Everything the fleet service reads from its environment."""

    model_config = service_config("FLEET_")
    service_name: ClassVar[str] = "fleet"

    http_port: int = 8102

    database_url: SecretStr = SecretStr(
        "postgresql+asyncpg://fleet:fleet-dev@127.0.0.1:55432/fleet"
    )
    # The tokens service's public keys for the internal JWT (also AUTOGEN_JWKS_URL).
    jwks_url: str = "http://127.0.0.1:8101/.well-known/jwks.json"
    # The gateway's internal API, which issues and revokes devices' MQTT credentials.
    gateway_url: str = "http://127.0.0.1:8105"
    gateway_timeout_s: float = Field(default=5.0, gt=0, le=60)

    # `attention`: a device offline longer than this (seconds) needs a look. GSM and GPS
    # units drop out of coverage routinely, so they get longer than WiFi units.
    offline_attention_wifi_s: int = Field(default=15 * 60, ge=0)
    offline_attention_gsm_s: int = Field(default=60 * 60, ge=0)
    offline_attention_gps_s: int = Field(default=2 * 60 * 60, ge=0)
    # Telemetry alarms.
    low_fuel_pct: float = Field(default=15.0, ge=0, le=100)
    low_battery_v: float = Field(default=11.5, ge=0)

    # Recent positions kept per device (a ring of this many slots).
    position_history: int = Field(default=20, ge=1, le=1000)
    # Telemetry consumer: records per batch, and how long a poll waits to fill one.
    telemetry_batch_max: int = Field(default=2000, ge=1, le=50000)
    telemetry_batch_timeout_ms: int = Field(default=200, ge=1, le=10000)
    # Telemetry group members in this process (they split the partitions): one parses its
    # batch while another waits for the database.
    telemetry_consumers: int = Field(default=2, ge=1, le=32)
    # `autogen_fleet_devices` (live/offline/attention) is counted this often (seconds).
    state_metrics_interval_s: float = Field(default=15.0, gt=0, le=3600)
    # Map answers at most this many features (the rest is flagged `truncated`).
    map_max_features: int = Field(default=5000, ge=1, le=100000)
