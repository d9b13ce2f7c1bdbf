"""The event envelope every Kafka record carries, and its encoding.

`data` is typed per topic by the contracts in `common.contracts`; the envelope itself never
changes shape within a version.
"""

import uuid
from datetime import UTC, datetime
from typing import Generic, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

DataT = TypeVar("DataT", bound=BaseModel)


class Envelope(BaseModel, Generic[DataT]):
    """`{event_id, type, version, occurred_at, source, key, data}`."""

    model_config = ConfigDict(frozen=True)

    event_id: uuid.UUID
    type: str = Field(min_length=1, max_length=200)
    version: int = Field(ge=1)
    occurred_at: AwareDatetime
    source: str = Field(min_length=1, max_length=100)
    key: str | None = Field(default=None, max_length=200)
    data: DataT


def new_event(
    *,
    type: str,
    data: DataT,
    source: str,
    key: str | None = None,
    version: int = 1,
    occurred_at: datetime | None = None,
) -> Envelope[DataT]:
    """A fresh envelope with a new event id, stamped now unless told otherwise."""
    return Envelope[DataT](
        event_id=uuid.uuid4(),
        type=type,
        version=version,
        occurred_at=occurred_at or datetime.now(UTC),
        source=source,
        key=key,
        data=data,
    )


def encode(event: Envelope[DataT]) -> bytes:
    """Wire form: UTF-8 JSON."""
    return event.model_dump_json().encode()
