"""Formatting helpers used by the templates."""

from datetime import UTC, datetime

from console.views import ago, fmt_time

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_ago_reads_naturally() -> None:
    assert ago("2025-01-01T11:59:30Z", NOW) == "30 s ago"
    assert ago("2025-01-01T11:55:00+00:00", NOW) == "5 min ago"
    assert ago("2025-01-01T09:00:00Z", NOW) == "3 h ago"
    assert ago("2024-12-29T12:00:00Z", NOW) == "3 d ago"
    assert ago(None, NOW) == "never"
    assert ago("not a time", NOW) == "never"


def test_fmt_time_is_utc_and_total() -> None:
    assert fmt_time("2025-01-01T13:00:00+01:00") == "2025-01-01 12:00:00 UTC"
    assert fmt_time(None) == "—"
