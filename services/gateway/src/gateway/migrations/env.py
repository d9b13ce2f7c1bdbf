"""Alembic environment of the gateway service."""

from common.migrations import run_env
from gateway.store import metadata

run_env(metadata)
