"""Alembic environment of the commands service."""

from commands.store import metadata
from common.migrations import run_env

run_env(metadata)
