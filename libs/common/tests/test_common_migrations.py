"""`common.migrations`: Alembic config from code, and each service's migration chain."""

from importlib import resources

import pytest
from alembic.script import ScriptDirectory

from common.migrations import alembic_config

DB_SERVICES = ("tokens", "fleet", "commands", "firmware", "gateway")


def test_alembic_config_keeps_a_percent_in_the_url() -> None:
    url = "postgresql+asyncpg://fleet:p%40ss%25word@db.internal:5432/fleet"
    config = alembic_config(url, "fleet")
    assert config.get_main_option("sqlalchemy.url") == url


def test_alembic_config_points_at_the_package_migrations() -> None:
    config = alembic_config("postgresql+asyncpg://x@y/z", "fleet")
    location = config.get_main_option("script_location")
    assert location == str(resources.files("fleet") / "migrations")


@pytest.mark.parametrize("package", DB_SERVICES)
def test_service_ships_a_migration_environment(package: str) -> None:
    migrations = resources.files(package) / "migrations"
    assert (migrations / "env.py").is_file()
    assert (migrations / "versions").is_dir()


@pytest.mark.parametrize("package", DB_SERVICES)
def test_service_migrations_have_exactly_one_head(package: str) -> None:
    scripts = ScriptDirectory.from_config(alembic_config("postgresql+asyncpg://x@y/z", package))
    heads = scripts.get_heads()
    assert len(heads) == 1, f"{package} has heads {heads}: merge them"
    # The chain from the head goes all the way down to a single base.
    revisions = list(scripts.walk_revisions())
    assert revisions
    assert len(scripts.get_bases()) == 1
