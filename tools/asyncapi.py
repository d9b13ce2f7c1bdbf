"""Render the platform's AsyncAPI document from the topic contracts (FastStream's generator).

`python tools/asyncapi.py` rewrites docs/asyncapi.yaml; `--check` exits 1 when the committed
document no longer matches the contracts in `libs/common/src/common/contracts/` (the test suite
runs the check, so the document stays true).
"""

import argparse
import sys
from pathlib import Path

import yaml
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI

from common.contracts import ALL_TOPICS
from common.events import Envelope

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml"


def render() -> str:
    """The AsyncAPI 3.0 document of every contract topic."""
    broker = KafkaBroker(
        "kafka:9092",
        description="The platform's Kafka cluster. Records are JSON envelopes keyed as stated.",
    )
    for topic in ALL_TOPICS:
        broker.publisher(
            topic.name,
            title=topic.name,
            description=f"{topic.description} Key: {topic.key}. Event type: `{topic.event_type}`.",
            schema=Envelope[topic.data],  # type: ignore[name-defined]
        )
    spec = AsyncAPI(
        broker,
        title="AutoGen Fleet events",
        version="1",
        description=(
            "Events exchanged by AutoGen Fleet services and offered to other services. Every "
            "record is an envelope {event_id, type, version, occurred_at, source, key, data}; "
            "W3C trace context travels in the Kafka headers. Within a topic version, changes "
            "are additive only."
        ),
        schema_version="3.0.0",
    )
    # FastStream's output order depends on the hash seed; sort so the document is stable.
    document = spec.to_specification().to_jsonable()
    rendered: str = yaml.safe_dump(document, sort_keys=True, allow_unicode=True, width=100)
    return rendered


def main() -> int:
    """Write or check the document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the document is stale")
    args = parser.parse_args()
    rendered = render()
    if args.check:
        current = DOCUMENT.read_text() if DOCUMENT.is_file() else ""
        if current != rendered:
            print(f"{DOCUMENT} is stale: run `uv run python tools/asyncapi.py`", file=sys.stderr)
            return 1
        return 0
    DOCUMENT.write_text(rendered)
    print(f"wrote {DOCUMENT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
