"""Alembic environment of the fleet service."""

from common.migrations import run_env
from fleet.store import metadata

run_env(metadata)
