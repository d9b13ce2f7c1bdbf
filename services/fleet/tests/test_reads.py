"""The GET routes' reads: rows become devices by position, statements compile once."""

from dataclasses import fields

import pytest
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import create_async_engine

from fleet import store
from fleet.domain import Device
from fleet.reads import Reads


def test_device_columns_are_the_device_fields_in_order() -> None:
    # Rows are turned into devices positionally (`Device(*row)`): a column added to one and not
    # the other, or in another place, would shift every value after it.
    assert [c.name for c in store._DEVICE_COLUMNS] == [f.name for f in fields(Device)]


async def test_an_expanding_parameter_is_refused_before_any_query() -> None:
    engine = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    reads = Reads(engine)
    statement = select(store.devices.c.id).where(
        store.devices.c.id.in_(bindparam("ids", expanding=True))
    )
    with pytest.raises(ValueError, match="ANY"):
        await reads.fetch(statement, {"ids": ["a"]})
    await engine.dispose()
