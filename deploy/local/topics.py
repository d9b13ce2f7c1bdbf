"""Apply the declared Kafka topics (deploy/topics.yaml) to a cluster, idempotently.

Creates missing topics, raises partition counts that are below the declared ones (never
lowers them: Kafka cannot) and sets each topic's dynamic config to exactly the declared
config. Prints one line per topic and a summary; exits non-zero on any failure.

    uv run --no-sync python deploy/local/topics.py deploy/topics.yaml \
        [--bootstrap-servers 127.0.0.1:9092] [--dry-run]

The bootstrap servers default to $AUTOGEN_KAFKA_BOOTSTRAP_SERVERS, then 127.0.0.1:9092.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import for_code

# DescribeConfigs config_source values that mean "set on this topic" (not inherited).
_DYNAMIC_TOPIC_CONFIG = 1


@dataclass(frozen=True)
class TopicSpec:
    """One declared topic."""

    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str] = field(default_factory=dict)


def _scalar(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    try:
        return int(text)
    except ValueError:
        return text


def _strip_comment(line: str) -> str:
    # Good enough for this file: '#' starts a comment unless quoted.
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"":
            quote = None if quote == ch else (quote or ch)
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def parse_simple_yaml(text: str) -> Any:
    """Parse the block-style YAML subset topics.yaml uses (mappings, lists, scalars).

    Used only when PyYAML is not installed, so this script needs nothing but aiokafka.
    """
    lines: list[tuple[int, str]] = []
    for raw in text.splitlines():
        line = _strip_comment(raw).rstrip()
        if line.strip():
            lines.append((len(line) - len(line.lstrip()), line.strip()))
    pos = 0

    def block(indent: int) -> Any:
        nonlocal pos
        if lines[pos][1].startswith("- "):
            items: list[Any] = []
            while pos < len(lines) and lines[pos][0] == indent and lines[pos][1].startswith("- "):
                # Re-read the item's first line as if it were indented past the dash.
                item_indent = indent + 2
                lines[pos] = (item_indent, lines[pos][1][2:].lstrip())
                if ":" in lines[pos][1]:
                    items.append(block(item_indent))
                else:
                    items.append(_scalar(lines[pos][1]))
                    pos += 1
            return items
        mapping: dict[str, Any] = {}
        while pos < len(lines) and lines[pos][0] == indent:
            key, sep, rest = lines[pos][1].partition(":")
            if not sep:
                raise ValueError(f"expected 'key: value', got {lines[pos][1]!r}")
            pos += 1
            if rest.strip():
                mapping[key.strip()] = _scalar(rest)
            elif pos < len(lines) and lines[pos][0] > indent:
                mapping[key.strip()] = block(lines[pos][0])
            else:
                mapping[key.strip()] = None
        return mapping

    return block(lines[0][0]) if lines else {}


def load_specs(path: Path) -> list[TopicSpec]:
    """Read and validate the declared topics."""
    text = path.read_text(encoding="utf-8")
    try:
        import yaml  # noqa: PLC0415 - optional dependency

        doc = yaml.safe_load(text)
    except ImportError:
        doc = parse_simple_yaml(text)
    defaults = doc.get("defaults") or {}
    specs = []
    for entry in doc.get("topics") or []:
        rf = int(entry.get("replication_factor", defaults.get("replication_factor", 1)))
        config = {str(k): str(v) for k, v in (entry.get("config") or {}).items()}
        specs.append(TopicSpec(entry["name"], int(entry["partitions"]), rf, config))
    names = [s.name for s in specs]
    if len(names) != len(set(names)):
        raise ValueError(f"{path}: a topic is declared twice")
    return specs


async def current_configs(
    admin: AIOKafkaAdminClient, names: list[str]
) -> dict[str, dict[str, str]]:
    """Each topic's dynamic (topic-level) config."""
    if not names:
        return {}
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    )
    result: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.to_object()["resources"]:
            if resource["error_code"]:
                raise for_code(resource["error_code"])(resource["error_message"])
            result[resource["resource_name"]] = {
                entry["config_names"]: entry["config_value"]
                for entry in resource["config_entries"]
                if entry.get("config_source", _DYNAMIC_TOPIC_CONFIG) == _DYNAMIC_TOPIC_CONFIG
                and not entry.get("is_default", False)
            }
    return result


def _raise_for_errors(response: Any, what: str) -> None:
    obj = response.to_object()
    for key in ("topic_errors", "resources"):
        for item in obj.get(key, []):
            if item["error_code"]:
                name = item.get("topic") or item.get("name") or item.get("resource_name")
                message = item.get("error_message") or ""
                raise for_code(item["error_code"])(f"{what} {name}: {message}")


async def _create_missing(
    admin: AIOKafkaAdminClient, missing: list[TopicSpec], dry_run: bool
) -> None:
    for spec in missing:
        print(f"  create     {spec.name} partitions={spec.partitions} {spec.config}")
    if missing and not dry_run:
        new = [
            NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=s.config)
            for s in missing
        ]
        _raise_for_errors(await admin.create_topics(new), "create")


async def _grow_partitions(
    admin: AIOKafkaAdminClient, present: list[TopicSpec], existing: dict[str, Any], dry_run: bool
) -> set[str]:
    grow = {}
    for spec in present:
        have = len(existing[spec.name]["partitions"])
        if have < spec.partitions:
            print(f"  partitions {spec.name} {have} -> {spec.partitions}")
            grow[spec.name] = NewPartitions(spec.partitions)
        elif have > spec.partitions:
            print(
                f"  warning    {spec.name} has {have} partitions, more than the declared "
                f"{spec.partitions}; Kafka cannot lower it",
                file=sys.stderr,
            )
    if grow and not dry_run:
        await admin.create_partitions(grow)
    return set(grow)


async def _reconcile_configs(
    admin: AIOKafkaAdminClient, present: list[TopicSpec], dry_run: bool
) -> set[str]:
    configs = await current_configs(admin, [s.name for s in present])
    alter = []
    for spec in present:
        have = configs.get(spec.name, {})
        if have != spec.config:
            print(f"  config     {spec.name} {have} -> {spec.config}")
            # AlterConfigs (not incremental) replaces the topic's whole dynamic config.
            alter.append(ConfigResource(ConfigResourceType.TOPIC, spec.name, configs=spec.config))
    if alter and not dry_run:
        for response in await admin.alter_configs(alter):
            _raise_for_errors(response, "alter config of")
    return {r.name for r in alter}


async def apply(specs: list[TopicSpec], bootstrap: str, *, dry_run: bool) -> int:
    """Bring the cluster's topics in line with the specs; returns the number of changes."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="autogen-topics")
    await admin.start()
    try:
        existing = {t["topic"]: t for t in await admin.describe_topics()}
        missing = [s for s in specs if s.name not in existing]
        present = [s for s in specs if s.name in existing]
        await _create_missing(admin, missing, dry_run)
        grown = await _grow_partitions(admin, present, existing, dry_run)
        reconfigured = await _reconcile_configs(admin, present, dry_run)
    finally:
        await admin.close()
    declared = {s.name for s in specs}
    others = sorted(n for n in existing if not n.startswith("_") and n not in declared)
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        print(f"  note       {len(others)} topic(s) not in the declared list: {shown}")
    unchanged = len(present) - len(grown | reconfigured)
    print(
        f"topics: {len(specs)} declared, {len(missing)} created, {len(grown)} grown, "
        f"{len(reconfigured)} reconfigured, {unchanged} unchanged"
        + (" (dry run)" if dry_run else "")
    )
    return len(missing) + len(grown) + len(reconfigured)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="the declared topics (deploy/topics.yaml)")
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("AUTOGEN_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
    )
    parser.add_argument("--dry-run", action="store_true", help="print, change nothing")
    args = parser.parse_args(argv)
    specs = load_specs(args.file)
    asyncio.run(apply(specs, args.bootstrap_servers, dry_run=args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
