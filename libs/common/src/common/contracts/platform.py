"""Platform-wide records that belong to no domain: consumer dead letters."""

from pydantic import AwareDatetime, BaseModel, ConfigDict

from common.contracts.topic import Topic


class DeadLetter(BaseModel):
    """A Kafka record a consumer could not use, kept whole with the reason."""

    model_config = ConfigDict(frozen=True)

    topic: str
    partition: int
    offset: int
    key: str | None
    value_b64: str
    headers: dict[str, str]
    consumer: str
    reason: str
    failed_at: AwareDatetime


DEADLETTER = Topic(
    name="platform.deadletter.v1",
    data=DeadLetter,
    event_type="platform.deadletter",
    key="the original record's key",
    description="Records any consumer refused (invalid envelope or data, or a permanent error).",
)
