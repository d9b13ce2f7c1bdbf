"""Alembic environment of the tokens service."""

from common.migrations import run_env
from tokens.store import metadata

run_env(metadata)
