"""Dispatching a batch of one rollout's pending devices in one SQL statement.

The statement picks the pending devices (SKIP LOCKED, in rollout order), moves them to `sent`
(`domain.dispatch` in SQL: next attempt, deadline by transport), and stages for each one its
`command.request.v1` and its `device_state_changed` event in the outbox, all in the caller's
transaction. The events are built once per batch by the contracts' own models (`events.py`)
and only the per-device fields (event id, device id, attempt, request id, TTL, reported
version) are patched in with `jsonb_set`, so their shape never drifts from the contracts.
"""

import json
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from common.contracts import commands, firmware
from common.telemetry import current_trace_headers
from firmware.domain import Policy
from firmware.events import RolloutInfo, ota_envelope, rollout_envelope

_SEND = text(
    """
WITH picked AS (
    SELECT device_id FROM rollout_devices
    WHERE rollout_id = CAST(:rollout_id AS text) AND state = 'pending'
      AND (next_attempt_at IS NULL OR next_attempt_at <= CAST(:now AS timestamptz))
    ORDER BY seq
    LIMIT CAST(:room AS int)
    FOR UPDATE SKIP LOCKED
), sent AS (
    UPDATE rollout_devices AS d SET
        state = 'sent',
        attempt = d.attempt + 1,
        command_id = NULL,
        sent_at = CAST(:now AS timestamptz),
        deadline_at = CAST(:now AS timestamptz) + make_interval(secs => CASE
            WHEN d.transport = 'gsm' AND d.gps THEN CAST(:gsm_gps AS float8)
            WHEN d.transport = 'gsm' THEN CAST(:gsm AS float8)
            WHEN d.gps THEN CAST(:wifi_gps AS float8)
            ELSE CAST(:wifi AS float8) END),
        next_attempt_at = NULL,
        detail = NULL,
        updated_at = CAST(:now AS timestamptz)
    FROM picked
    WHERE d.rollout_id = CAST(:rollout_id AS text) AND d.device_id = picked.device_id
    RETURNING d.device_id, d.seq, d.attempt, d.reported_version,
        greatest(1, floor(extract(epoch FROM d.deadline_at - d.sent_at)))::int AS ttl_s,
        gen_random_uuid() AS request_id, gen_random_uuid() AS event_id
), staged AS (
    INSERT INTO outbox (event_id, topic, key, payload, headers)
    SELECT e.event_id, e.topic, e.key, convert_to(e.payload::text, 'UTF8'), e.headers
    FROM sent
    CROSS JOIN LATERAL (VALUES
        (1, sent.request_id, CAST(:request_topic AS text), sent.device_id,
         jsonb_set(jsonb_set(jsonb_set(jsonb_set(jsonb_set(jsonb_set(jsonb_set(
             CAST(:request_template AS jsonb),
             '{event_id}', to_jsonb(sent.request_id::text)),
             '{key}', to_jsonb(sent.device_id)),
             '{data,request_id}',
             to_jsonb(CAST(:rollout_id AS text) || ':' || sent.device_id || ':' || sent.attempt)),
             '{data,device_id}', to_jsonb(sent.device_id)),
             '{data,ttl_s}', to_jsonb(sent.ttl_s)),
             '{data,correlation,device_id}', to_jsonb(sent.device_id)),
             '{data,correlation,attempt}', to_jsonb(sent.attempt::text)),
         CAST(:request_headers AS jsonb)),
        (2, sent.event_id, CAST(:event_topic AS text), CAST(:rollout_id AS text),
         jsonb_set(jsonb_set(jsonb_set(jsonb_set(
             CAST(:event_template AS jsonb),
             '{event_id}', to_jsonb(sent.event_id::text)),
             '{data,device_id}', to_jsonb(sent.device_id)),
             '{data,attempt}', to_jsonb(sent.attempt)),
             '{data,reported_version}', coalesce(to_jsonb(sent.reported_version), 'null'::jsonb)),
         CAST(:event_headers AS jsonb))
    ) AS e(n, event_id, topic, key, payload, headers)
    ORDER BY sent.seq, e.n
    RETURNING 1
)
SELECT count(*) FROM sent
"""
)

# Stand-ins patched per device; the templates are valid contract events as they are.
_DEVICE = "-"


def _headers(event_type: str) -> str:
    headers = current_trace_headers()
    headers["content-type"] = "application/json"
    headers["event-type"] = event_type
    return json.dumps(headers)


async def send_pending(
    conn: AsyncConnection,
    info: RolloutInfo,
    *,
    room: int,
    now: datetime,
    policy: Policy,
    action: str,
) -> int:
    """Dispatch up to `room` pending devices of the rollout; returns how many went out."""
    request = ota_envelope(
        info, _DEVICE, attempt=1, action=action, ttl_s=1, requested_by=f"firmware:{info.rollout_id}"
    )
    event = rollout_envelope(
        info,
        "device_state_changed",
        at=now,
        device_id=_DEVICE,
        state="sent",
        previous_state="pending",
        attempt=1,
        reported_version=None,
        detail=None,
    )
    params: dict[str, Any] = {
        "rollout_id": info.rollout_id,
        "now": now,
        "room": room,
        "gsm_gps": policy.deadline(transport="gsm", gps=True).total_seconds(),
        "gsm": policy.deadline(transport="gsm", gps=False).total_seconds(),
        "wifi_gps": policy.deadline(transport="wifi", gps=True).total_seconds(),
        "wifi": policy.deadline(transport="wifi", gps=False).total_seconds(),
        "request_topic": commands.REQUEST.name,
        "request_template": request.model_dump_json(),
        "request_headers": _headers(request.type),
        "event_topic": firmware.ROLLOUT.name,
        "event_template": event.model_dump_json(),
        "event_headers": _headers(event.type),
    }
    return int(await conn.scalar(_SEND, params) or 0)
