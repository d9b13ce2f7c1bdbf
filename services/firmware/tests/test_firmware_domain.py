"""The pure rules: release variants, the per-device state machine, pace and threshold."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from firmware.domain import (
    Pace,
    Policy,
    Progress,
    RuleError,
    Variant,
    burst_of,
    cancel,
    check_release,
    check_target,
    crosses_threshold,
    dispatch,
    next_status,
    on_command_status,
    on_deadline,
    on_ota_report,
    on_presence,
    pace_room,
    variant_mismatch,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POLICY = Policy(
    deadline_wifi=timedelta(minutes=10),
    deadline_gsm=timedelta(minutes=30),
    deadline_gps=timedelta(minutes=45),
    max_retries=1,
    backoff=timedelta(seconds=30),
    backoff_max=timedelta(minutes=5),
)
ULTRA_GSM = Variant("ultra", ("Ultra",), None, "gsm")
UNIFIED = Variant("unified", ("D100", "V5"), "diesel", "wifi")


def sent(at: datetime = T0) -> Progress:
    return dispatch(Progress(state="pending"), now=at, deadline=timedelta(minutes=10)).after


# ------------------------------------------------------------------ variants


@pytest.mark.parametrize(
    ("variant", "field"),
    [
        (Variant("ultra", ("Ultra",), None, None), "transport"),
        (Variant("ultra", ("Ultra", "D100"), None, "gsm"), "models"),
        (Variant("unified", ("Ultra",), "diesel", "gsm"), "models"),
        (Variant("unified", ("D100",), None, "gsm"), "engine"),
        (Variant("unified", ("D100",), "diesel", None), "transport"),
        (Variant("unified", ("D100",), "steam", "gsm"), "engine"),
        (Variant("xpro", ("X Pro",), "diesel", None), "engine"),
        (Variant("xpro", ("X Pro", "Nope"), None, None), "models"),
        (Variant("xpro", (), None, None), "models"),
    ],
)
def test_releases_that_cross_console_policy_are_refused(variant: Variant, field: str) -> None:
    with pytest.raises(RuleError) as caught:
        check_release(variant)
    assert caught.value.status == 422
    assert caught.value.field == field


@pytest.mark.parametrize(
    "variant",
    [ULTRA_GSM, UNIFIED, Variant("xpro", ("X Pro",), None, None)],
)
def test_valid_releases_pass(variant: Variant) -> None:
    check_release(variant)


def test_ultra_gsm_release_does_not_match_ultra_wifi_device() -> None:
    assert variant_mismatch(ULTRA_GSM, model="Ultra", engine=None, transport="wifi") == (
        "transport",
        "the release is for gsm units, not wifi",
    )
    assert variant_mismatch(ULTRA_GSM, model="Ultra", engine=None, transport="gsm") is None


def test_unified_release_matches_only_its_models_engine_and_transport() -> None:
    assert variant_mismatch(UNIFIED, model="V5", engine="diesel", transport="wifi") is None
    assert variant_mismatch(UNIFIED, model="D180", engine="diesel", transport="wifi")[0] == "model"  # type: ignore[index]
    assert variant_mismatch(UNIFIED, model="D100", engine="gas", transport="wifi")[0] == "engine"  # type: ignore[index]
    assert variant_mismatch(UNIFIED, model="Ultra", engine=None, transport="wifi")[0] == "model"  # type: ignore[index]


def test_rollout_target_outside_the_release_is_refused() -> None:
    check_target(UNIFIED, models=["V5"], engine="diesel", transport="wifi")
    for kwargs, field in (
        ({"models": ["D180"], "engine": None, "transport": None}, "target.models"),
        ({"models": None, "engine": "gas", "transport": None}, "target.engine"),
        ({"models": None, "engine": None, "transport": "gsm"}, "target.transport"),
    ):
        with pytest.raises(RuleError) as caught:
            check_target(UNIFIED, **kwargs)
        assert caught.value.field == field


# ------------------------------------------------------------------ the happy path


def test_a_device_goes_pending_sent_updating_awaiting_return_confirmed() -> None:
    p = sent()
    assert (p.state, p.attempt, p.deadline_at) == ("sent", 1, T0 + timedelta(minutes=10))
    later = T0 + timedelta(seconds=5)
    p = on_command_status(
        p, attempt=1, command_id="c1", status="acked", detail=None, now=later, policy=POLICY
    ).after  # type: ignore[union-attr]
    assert (p.state, p.command_id) == ("sent", "c1")
    for phase in ("downloading", "installing", "rebooting"):
        p = on_ota_report(
            p, command_id="c1", phase=phase, detail=None, now=later, policy=POLICY
        ).after  # type: ignore[union-attr]
        assert p.state == "updating"
    p = on_presence(p, online=False, fw=None, at=later, target_version="2.0.0").after  # type: ignore[union-attr]
    assert p.state == "awaiting_return"
    change = on_presence(p, online=True, fw="2.0.0", at=later, target_version="2.0.0")
    assert change is not None
    assert change.moved
    assert (change.after.state, change.after.reported_version) == ("confirmed", "2.0.0")


def test_live_again_with_another_version_after_the_reboot_fails() -> None:
    p = replace(sent(), state="awaiting_return", command_id="c1", last_report="rebooting")
    change = on_presence(p, online=True, fw="1.0.0", at=T0 + timedelta(1), target_version="2.0.0")
    assert change is not None
    assert change.after.state == "failed"
    assert "1.0.0" in (change.after.detail or "")


@pytest.mark.parametrize("offline_read_first", [False, True])
def test_the_reboot_counts_whichever_of_its_report_and_the_offline_is_read_first(
    offline_read_first: bool,
) -> None:
    later = T0 + timedelta(seconds=5)
    p = on_ota_report(
        sent(), command_id="c1", phase="installing", detail=None, now=later, policy=POLICY
    ).after  # type: ignore[union-attr]

    def report(p: Progress) -> Progress:
        change = on_ota_report(
            p, command_id="c1", phase="rebooting", detail=None, now=later, policy=POLICY
        )
        return change.after if change else p

    def offline(p: Progress) -> Progress:
        return on_presence(p, online=False, fw=None, at=later, target_version="2").after  # type: ignore[union-attr]

    p = report(offline(p)) if offline_read_first else offline(report(p))
    assert (p.state, p.last_report) == ("awaiting_return", "rebooting")
    change = on_presence(p, online=True, fw="1", at=later, target_version="2")
    assert change is not None
    assert change.after.state == "failed"


def test_a_connection_lost_mid_download_is_not_a_failed_update() -> None:
    later = T0 + timedelta(seconds=5)
    p = on_ota_report(
        sent(), command_id="c1", phase="downloading", detail=None, now=later, policy=POLICY
    ).after  # type: ignore[union-attr]
    p = on_presence(p, online=False, fw=None, at=later, target_version="2").after  # type: ignore[union-attr]
    assert p.state == "awaiting_return"
    # Back on the old version before any reboot: the download goes on, the deadline stands.
    change = on_presence(p, online=True, fw="1", at=later, target_version="2")
    assert change is not None
    assert (change.after.state, change.after.deadline_at) == ("updating", p.deadline_at)
    p = change.after
    for phase in ("installing", "rebooting"):
        p = on_ota_report(
            p, command_id="c1", phase=phase, detail=None, now=later, policy=POLICY
        ).after  # type: ignore[union-attr]
    p = on_presence(p, online=False, fw=None, at=later, target_version="2").after  # type: ignore[union-attr]
    change = on_presence(p, online=True, fw="2", at=later, target_version="2")
    assert change is not None
    assert change.after.state == "confirmed"
    # Never back at all: the deadline fails it, as any update not back in time.
    assert p.deadline_at is not None
    stranded = on_deadline(
        replace(p, state="updating"), now=p.deadline_at + timedelta(1), policy=POLICY
    )
    assert stranded is not None
    assert stranded.after.state == "failed"


def test_going_offline_before_any_ota_phase_is_not_awaiting_return() -> None:
    p = sent()
    assert on_presence(p, online=False, fw=None, at=T0 + timedelta(1), target_version="2") is None
    # ... and coming back on the old version before starting the OTA is not a failure.
    change = on_presence(p, online=True, fw="1.0.0", at=T0 + timedelta(2), target_version="2")
    assert change is not None
    assert not change.moved


def test_presence_older_than_the_request_is_ignored() -> None:
    p = replace(sent(), state="awaiting_return")
    assert on_presence(p, online=True, fw="2", at=T0 - timedelta(1), target_version="2") is None


def test_a_pending_device_already_on_the_version_is_confirmed() -> None:
    change = on_presence(Progress("pending"), online=True, fw="2", at=T0, target_version="2")
    assert change is not None
    assert change.after.state == "confirmed"


# ------------------------------------------------------------------ failures and retries


def test_command_expiry_before_any_phase_retries_with_backoff_then_fails() -> None:
    p = sent()
    change = on_command_status(
        p, attempt=1, command_id="c1", status="expired", detail=None, now=T0, policy=POLICY
    )
    assert change is not None
    assert change.after.state == "pending"
    assert change.after.next_attempt_at == T0 + timedelta(seconds=30)
    p = dispatch(change.after, now=T0 + timedelta(seconds=30), deadline=timedelta(minutes=10)).after
    assert p.attempt == 2
    change = on_command_status(
        p, attempt=2, command_id="c2", status="failed", detail="x", now=T0, policy=POLICY
    )
    assert change is not None
    assert change.after.state == "failed"


def test_status_of_an_earlier_attempt_is_ignored() -> None:
    p = dispatch(replace(sent(), state="pending"), now=T0, deadline=timedelta(minutes=1)).after
    assert p.attempt == 2
    assert (
        on_command_status(
            p, attempt=1, command_id="c1", status="expired", detail=None, now=T0, policy=POLICY
        )
        is None
    )


def test_device_reported_ota_failure_retries_then_fails() -> None:
    p = replace(sent(), state="updating", command_id="c1")
    change = on_ota_report(p, command_id="c1", phase="failed", detail="sha", now=T0, policy=POLICY)
    assert change is not None
    assert change.after.state == "pending"
    last = replace(change.after, state="updating", attempt=2, command_id="c2")
    change = on_ota_report(
        last, command_id="c2", phase="failed", detail="sha", now=T0, policy=POLICY
    )
    assert change is not None
    assert change.after.state == "failed"
    assert "sha" in (change.after.detail or "")


def test_report_about_another_command_is_ignored() -> None:
    p = replace(sent(), state="updating", command_id="c2")
    assert (
        on_ota_report(p, command_id="c1", phase="failed", detail=None, now=T0, policy=POLICY)
        is None
    )


def test_deadline_fails_in_flight_devices_only_when_due() -> None:
    p = replace(sent(), state="awaiting_return")
    assert on_deadline(p, now=T0 + timedelta(minutes=9), policy=POLICY) is None
    change = on_deadline(p, now=T0 + timedelta(minutes=10), policy=POLICY)
    assert change is not None
    assert change.after.state == "failed"
    assert on_deadline(Progress("pending"), now=T0 + timedelta(days=1), policy=POLICY) is None


def test_the_deadline_window_starts_again_when_the_device_starts() -> None:
    # The request waited 7 of its 10 minutes in the platform (a backlog, a broker outage).
    started = T0 + timedelta(minutes=7)
    change = on_ota_report(
        sent(), command_id="c1", phase="downloading", detail=None, now=started, policy=POLICY
    )
    assert change is not None
    assert change.after.deadline_at == started + timedelta(minutes=10)
    updating = change.after
    assert on_deadline(updating, now=T0 + timedelta(minutes=12), policy=POLICY) is None
    # Later phases do not push it further.
    later = on_ota_report(
        updating,
        command_id="c1",
        phase="installing",
        detail=None,
        now=started + timedelta(minutes=5),
        policy=POLICY,
    )
    assert later is not None
    assert later.after.deadline_at == updating.deadline_at


def test_a_device_that_never_started_is_retried_then_failed() -> None:
    first = on_deadline(sent(), now=T0 + timedelta(minutes=10), policy=POLICY)
    assert first is not None
    assert first.after.state == "pending"  # attempt 1 of 1 + max_retries
    assert first.after.next_attempt_at == T0 + timedelta(minutes=10, seconds=30)
    again = dispatch(first.after, now=T0 + timedelta(minutes=11), deadline=timedelta(minutes=10))
    last = on_deadline(again.after, now=T0 + timedelta(minutes=21), policy=POLICY)
    assert last is not None
    assert last.after.state == "failed"
    assert "did not start the update within 600s" in (last.after.detail or "")


def test_gsm_and_gps_units_get_longer_than_wifi_units() -> None:
    wifi = POLICY.deadline(transport="wifi", gps=False)
    assert POLICY.deadline(transport="gsm", gps=False) > wifi
    assert POLICY.deadline(transport="wifi", gps=True) > wifi
    assert POLICY.deadline(transport="gsm", gps=True) == timedelta(minutes=45)


def test_backoff_doubles_and_is_capped() -> None:
    assert [POLICY.retry_delay(n).total_seconds() for n in (1, 2, 3, 5, 9)] == [
        30,
        60,
        120,
        300,
        300,
    ]


def test_only_pending_devices_are_cancelled() -> None:
    assert cancel(sent(), why="cleared") is None
    change = cancel(Progress("pending"), why="cleared")
    assert change is not None
    assert change.after.state == "cancelled"


def test_dispatching_a_non_pending_device_is_a_bug() -> None:
    with pytest.raises(ValueError, match="cannot dispatch"):
        dispatch(sent(), now=T0, deadline=timedelta(1))


# ------------------------------------------------------------------ rollouts


def test_pause_resume_clear_follow_the_status() -> None:
    assert next_status("running", "pause") == "paused"
    assert next_status("paused", "resume") == "running"
    assert next_status("paused", "clear") == "cleared"
    for status, action in (("paused", "pause"), ("running", "resume"), ("completed", "clear")):
        with pytest.raises(RuleError) as caught:
            next_status(status, action)  # type: ignore[arg-type]
        assert caught.value.status == 409


def test_threshold_counts_finished_devices_and_respects_a_resume() -> None:
    assert not crosses_threshold(failed=0, confirmed=0, threshold_pct=10, acknowledged_failed=0)
    assert not crosses_threshold(failed=1, confirmed=9, threshold_pct=10, acknowledged_failed=0)
    assert crosses_threshold(failed=2, confirmed=9, threshold_pct=10, acknowledged_failed=0)
    # After a resume the two known failures do not pause it again; a third one does.
    assert not crosses_threshold(failed=2, confirmed=9, threshold_pct=10, acknowledged_failed=2)
    assert crosses_threshold(failed=3, confirmed=9, threshold_pct=10, acknowledged_failed=2)


def test_pace_is_anchored_to_the_start_and_exact_over_a_run() -> None:
    pace = Pace(anchor_at=T0)
    # One device at the start, then max_per_minute / 60 a second, whatever the passes' timing.
    assert pace_room(pace, max_per_minute=600, now=T0) == (1, pace)
    sent = 0.0
    for ms in (130, 250, 1100, 1170, 2900, 4000, 4010, 5000):
        now = T0 + timedelta(milliseconds=ms)
        room, pace = pace_room(replace(pace, sent=sent), max_per_minute=600, now=now)
        sent = pace.sent + room
    # After 5 s at 10/s: exactly 1 + 50 sent, no rounding lost between passes.
    assert sent == 51
    room, _ = pace_room(
        Pace(anchor_at=T0, sent=51), max_per_minute=600, now=T0 + timedelta(seconds=5)
    )
    assert room == 0
    assert pace_room(pace, max_per_minute=None, now=T0)[0] == float("inf")


def test_pace_after_a_stall_reanchors_with_at_most_a_burst() -> None:
    # The dispatcher was down for ten minutes: at most five seconds' worth goes at once.
    room, pace = pace_room(Pace(anchor_at=T0), max_per_minute=600, now=T0 + timedelta(minutes=10))
    assert room == burst_of(600) == 50
    later = T0 + timedelta(minutes=10, seconds=1)
    # And from there the pace goes on: one second later, ten more.
    assert pace_room(replace(pace, sent=pace.sent + room), max_per_minute=600, now=later)[0] == 10
    assert burst_of(6) == 1
    # A clock that went backwards never yields negative room.
    assert pace_room(Pace(anchor_at=T0, sent=5), max_per_minute=600, now=T0 - timedelta(1))[0] == 0


def test_threshold_waits_for_its_minimum_sample() -> None:
    # One early failure in a 200-device rollout is not a 100% failure rate.
    args = {"threshold_pct": 10, "acknowledged_failed": 0, "min_finished": 20, "targeted": 200}
    assert not crosses_threshold(failed=1, confirmed=0, **args)
    assert not crosses_threshold(failed=2, confirmed=17, **args)
    assert crosses_threshold(failed=3, confirmed=17, **args)
    assert not crosses_threshold(failed=2, confirmed=18, **args)
    # A rollout smaller than the sample is judged once all of it has finished.
    small = {**args, "targeted": 3}
    assert not crosses_threshold(failed=2, confirmed=0, **small)
    assert crosses_threshold(failed=2, confirmed=1, **small)
