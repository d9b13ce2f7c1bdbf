"""Alembic environment of the firmware service."""

from common.migrations import run_env
from firmware.store import metadata

run_env(metadata)
