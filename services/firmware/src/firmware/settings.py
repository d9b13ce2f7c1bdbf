"""Settings of the firmware service (environment prefix `FIRMWARE_`)."""

from typing import ClassVar

from pydantic import Field, SecretStr

from common.settings import DatabaseSettings, service_config


class FirmwareSettings(DatabaseSettings):
    """Everything the firmware service reads from its environment."""

    model_config = service_config("FIRMWARE_")
    service_name: ClassVar[str] = "firmware"

    http_port: int = 8104

    database_url: SecretStr = SecretStr(
        "postgresql+asyncpg://firmware:firmware-dev@127.0.0.1:55432/firmware"
    )
    # The tokens service's public keys for the internal JWT (also AUTOGEN_JWKS_URL).
    jwks_url: str = "http://127.0.0.1:8101/.well-known/jwks.json"

    # How long a device has, from the OTA request, to come back live with the new version.
    # The manual: GSM and GPS units take longer than WiFi units; do not assume failure early.
    deadline_wifi_s: float = Field(default=15 * 60, gt=0)
    deadline_gsm_s: float = Field(default=45 * 60, gt=0)
    deadline_gps_s: float = Field(default=45 * 60, gt=0)
    # Retries of an OTA that never reached the device or that the device reported failed,
    # with exponential backoff (base * 2**(attempt-1), capped).
    ota_max_retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_s: float = Field(default=30.0, ge=0)
    retry_backoff_max_s: float = Field(default=600.0, ge=0)
    # `fw_update` lets the device apply it when safe; `force_ota` applies it now.
    ota_action: str = Field(default="force_ota", pattern="^(force_ota|fw_update)$")

    # The dispatcher: how often it looks for work, and how many devices one pass sends at most.
    dispatch_interval_s: float = Field(default=0.2, gt=0, le=10)
    dispatch_max_per_pass: int = Field(default=2000, ge=1, le=20000)
    # Consumers of device traffic: records per batch, and how long a poll waits to fill one.
    consumer_batch_max: int = Field(default=1000, ge=1, le=20000)
    consumer_batch_timeout_ms: int = Field(default=100, ge=1, le=10000)
    # How often the rollout gauges on /metrics are read from the database.
    metrics_interval_s: float = Field(default=10.0, gt=0, le=3600)
