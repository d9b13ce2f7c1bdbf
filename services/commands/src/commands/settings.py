"""Settings of the commands service (environment prefix `COMMANDS_`)."""

from typing import ClassVar

from pydantic import Field, SecretStr

from common.settings import DatabaseSettings, service_config


class CommandsSettings(DatabaseSettings):
    """Everything the commands service reads from its environment."""

    model_config = service_config("COMMANDS_")
    service_name: ClassVar[str] = "commands"

    http_port: int = 8103

    database_url: SecretStr = SecretStr(
        "postgresql+asyncpg://commands:commands-dev@127.0.0.1:55432/commands"
    )
    jwks_url: str = "http://127.0.0.1:8101/.well-known/jwks.json"
    # How often the service expires commands past their TTL and fails unconfirmed Start/Stop.
    sweep_interval_s: float = Field(default=1.0, gt=0, le=60)
    # How long after the device says Start/Stop is done its telemetry has to show the new
    # run state before the command counts as failed.
    run_state_window_s: float = Field(default=60.0, gt=0, le=3600)
    # A request over Kafka naming a device or a release this service has not heard of yet (its
    # fleet/firmware event is still on the way) is read again for this long before it is
    # rejected: the projections and the requests travel on different topics.
    request_grace_s: float = Field(default=60.0, ge=0, le=3600)
    # How often the `autogen_commands_active` gauge is refreshed (one indexed count query).
    metrics_interval_s: float = Field(default=5.0, gt=0, le=300)
    # Batch consumers: at most this many records per transaction, and how long a poll waits
    # for records on the topics a command's latency depends on (reports, the gateway's
    # status, telemetry, presence) and on the projections. A poll returns as soon as records
    # arrive, so the wait costs no latency: it is only how often an idle consumer wakes (at
    # 20 ms, four consumers woke 200 times a second for nothing).
    batch_max_records: int = Field(default=500, ge=1, le=10_000)
    batch_wait_ms: int = Field(default=200, ge=1, le=5000)
    projection_batch_wait_ms: int = Field(default=200, ge=1, le=5000)
    # Telemetry and presence batches start at most this often (larger batches, less work).
    device_batch_interval_ms: int = Field(default=100, ge=0, le=5000)
    # The relay publishes a batch it holds at once (it appends all of it before the producer
    # sends), so lingering only adds latency to every command.
    kafka_linger_ms: int = Field(default=0, ge=0, le=1000)
