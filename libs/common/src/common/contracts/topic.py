"""A topic contract: its versioned name, the model of its envelope's `data`, and its key."""

from dataclasses import dataclass
from typing import Generic

from common.events import DataT, Envelope


@dataclass(frozen=True)
class Topic(Generic[DataT]):
    """A Kafka topic and the one data model its events carry (additive changes only)."""

    name: str
    data: type[DataT]
    event_type: str
    key: str
    description: str

    def parse(self, raw: bytes | str) -> Envelope[DataT]:
        """Validate a record's value as this topic's envelope; raises `ValidationError`."""
        return Envelope[self.data].model_validate_json(raw)  # type: ignore[name-defined]
