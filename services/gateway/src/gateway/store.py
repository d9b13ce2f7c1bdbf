"""The gateway service's tables (its own database; no other service reads them)."""

from sqlalchemy import MetaData

from common.idempotency import processed_events_table
from common.outbox import outbox_table

metadata = MetaData()
outbox = outbox_table(metadata)
processed_events = processed_events_table(metadata)
