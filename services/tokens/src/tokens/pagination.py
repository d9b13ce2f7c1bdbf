"""Keyset pagination (`limit`, `cursor` → `{items, next_cursor}`) shared by the list routes."""

import base64
import json
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Select, and_, or_

from common.http import ProblemError


def encode_cursor(created_at: datetime, row_id: str) -> str:
    """An opaque cursor after the row (created_at, id)."""
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a cursor points after; 422 when it is not one of ours."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, row_id = json.loads(base64.urlsafe_b64decode(padded))
        return datetime.fromisoformat(created), str(row_id)
    except (ValueError, TypeError) as exc:
        raise ProblemError(422, "Invalid request", "cursor: not a valid cursor") from exc


def page(
    query: Select[Any],
    *,
    created: Column[Any],
    row_id: Column[Any],
    cursor: str | None,
    limit: int,
    newest_first: bool,
) -> Select[Any]:
    """`query` ordered by (created, id), after `cursor`, one row more than `limit`."""
    if cursor is not None:
        at, last_id = decode_cursor(cursor)
        if newest_first:
            query = query.where(or_(created < at, and_(created == at, row_id < last_id)))
        else:
            query = query.where(or_(created > at, and_(created == at, row_id > last_id)))
    order = (created.desc(), row_id.desc()) if newest_first else (created.asc(), row_id.asc())
    return query.order_by(*order).limit(limit + 1)


def finish(rows: list[Any], limit: int) -> tuple[list[Any], str | None]:
    """The page's rows and the cursor of the next page (None at the end)."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1].created_at, rows[-1].id)
