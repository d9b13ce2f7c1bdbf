# mypy: allow-untyped-defs
"""The fleet's plain rules: attention thresholds, cursors, bboxes, catalog checks."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from fleet.domain import (
    AttentionRules,
    Device,
    InvalidInputError,
    check_product,
    decode_cursor,
    encode_cursor,
    marker,
    needs_attention,
    parse_bbox,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RULES = AttentionRules(
    offline_wifi=timedelta(minutes=15),
    offline_gsm=timedelta(hours=1),
    offline_gps=timedelta(hours=2),
    low_fuel_pct=15,
    low_battery_v=11.5,
)
BASE = Device(
    id="D1", name="n", model="D100", engine="diesel", transport="wifi", gps=False,
    dealer_id="a", customer_email=None, test_device=False, firmware_version=None,
    connection="offline", last_seen_at=NOW - timedelta(minutes=30), run_state=None,
    battery_v=None, fuel_pct=None, lat=None, lon=None, position_at=None,
    created_at=NOW - timedelta(days=1),
)  # fmt: skip


def test_offline_threshold_depends_on_transport_and_gps():
    assert needs_attention(BASE, RULES, NOW), "WiFi offline 30 min > 15 min"
    gsm = replace(BASE, transport="gsm")
    assert not needs_attention(gsm, RULES, NOW), "GSM gets an hour"
    assert needs_attention(replace(gsm, last_seen_at=NOW - timedelta(minutes=61)), RULES, NOW)
    gps = replace(BASE, gps=True, last_seen_at=NOW - timedelta(minutes=90))
    assert not needs_attention(gps, RULES, NOW), "GPS units get two hours"
    never = replace(gsm, last_seen_at=None, created_at=NOW - timedelta(minutes=5))
    assert not needs_attention(never, RULES, NOW), "counted from registration"


def test_alarms_and_markers():
    live = replace(BASE, connection="live", last_seen_at=NOW)
    assert marker(live, RULES, NOW) == "green"
    assert marker(replace(live, fuel_pct=10.0), RULES, NOW) == "red"
    assert marker(replace(live, battery_v=11.0), RULES, NOW) == "red"
    recently_offline = replace(BASE, transport="gsm", last_seen_at=NOW - timedelta(minutes=1))
    assert not needs_attention(recently_offline, RULES, NOW)
    assert marker(recently_offline, RULES, NOW) == "red", "offline is red on the map"


def test_cursor_round_trip_and_garbage():
    assert decode_cursor(encode_cursor("AB-1:x")) == "AB-1:x"
    for bad in ("", "!!!", "djI6eA", "bm9wZQ"):
        with pytest.raises(InvalidInputError) as err:
            decode_cursor(bad)
        assert err.value.field == "cursor"


def test_bbox():
    box = parse_bbox("-10.5,20,30,40.25")
    assert (box.min_lon, box.min_lat, box.max_lon, box.max_lat) == (-10.5, 20, 30, 40.25)
    for bad in ("1,2,3", "1,2,3,x", "0,0,181,1", "0,95,1,96", "5,0,1,1", "inf,0,1,1"):
        with pytest.raises(InvalidInputError):
            parse_bbox(bad)


@pytest.mark.parametrize(
    ("model", "engine", "transport", "field"),
    [("Nope", None, "gsm", "model"), ("V100", None, "wifi", "engine"),
     ("Ultra", "gas", "gsm", "engine"), ("X Pro", None, "5g", "transport")],
)  # fmt: skip
def test_catalog_reasons_name_the_field(model, engine, transport, field):
    with pytest.raises(InvalidInputError) as err:
        check_product(model, engine, transport)
    assert err.value.field == field


def test_catalog_accepts_real_products():
    check_product("X Pro", None, "wifi")
    check_product("V5", "gas", "gsm")
