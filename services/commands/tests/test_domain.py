"""The command lifecycle and request checks, as pure functions."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from commands import domain
from commands.domain import Command, Device, InvalidCommandError, Release

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
WINDOW = timedelta(seconds=60)
D100 = Device("D1", "dealer-1", None, "D100", "diesel", "gsm")


def cmd(action: str = "reboot", status: str = "queued", **fields: object) -> Command:
    base = Command(
        id="c1",
        device_id="D1",
        action=action,
        status=status,
        created_at=T0,
        expires_at=T0 + timedelta(seconds=120),
        ota_version="2.5.0" if action in domain.OTA_ACTIONS else None,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# ------------------------------------------------------------------ forward-only lifecycle


def test_gateway_sent_moves_queued_to_sent_once() -> None:
    change = domain.on_gateway_status(cmd(), "sent", None)
    assert change is not None
    assert change.moved
    assert change.status == "sent"
    assert domain.on_gateway_status(change.command, "sent", None) is None


def test_sent_arriving_after_the_ack_does_not_move_back() -> None:
    acked = domain.on_ack(cmd(), "accepted", None, at(1))
    assert acked is not None
    assert acked.status == "acked"
    assert domain.on_gateway_status(acked.command, "sent", None) is None


def test_repeated_ack_changes_nothing() -> None:
    acked = domain.on_ack(cmd(status="sent"), "accepted", None, at(1))
    assert acked is not None
    assert domain.on_ack(acked.command, "accepted", None, at(2)) is None


def test_reboot_succeeds_on_the_devices_word() -> None:
    change = domain.on_ack(cmd(status="acked"), "succeeded", None, at(3))
    assert change is not None
    assert change.status == "succeeded"


@pytest.mark.parametrize(("ack", "status"), [("failed", "failed"), ("rejected", "rejected")])
def test_device_failure_and_rejection_end_the_command(ack: str, status: str) -> None:
    change = domain.on_ack(cmd(status="sent"), ack, "engine fault", at(1))
    assert change is not None
    assert change.status == status
    assert change.command.detail == "engine fault"


def test_nothing_moves_a_terminal_command() -> None:
    done = cmd(status="expired")
    assert domain.on_ack(done, "succeeded", None, at(1)) is None
    assert domain.on_gateway_status(done, "sent", None) is None
    assert domain.on_sweep(done, at(999), WINDOW) is None
    assert domain.on_run_state(cmd("start", status="succeeded"), "running", at(1)) is None


# ------------------------------------------------------------------ Start / Stop


def test_start_is_not_succeeded_on_the_ack_alone() -> None:
    change = domain.on_ack(cmd("start", status="acked"), "succeeded", None, at(2))
    assert change is not None
    assert change.status == "acked"
    assert change.command.device_result == "succeeded"
    assert "waiting for telemetry" in (change.command.detail or "")


def test_start_succeeds_when_telemetry_follows() -> None:
    waiting = domain.on_ack(cmd("start", status="acked"), "succeeded", None, at(2))
    assert waiting is not None
    assert domain.on_run_state(waiting.command, "stopped", at(3)) is None
    done = domain.on_run_state(waiting.command, "running", at(4))
    assert done is not None
    assert done.moved
    assert done.status == "succeeded"


def test_start_succeeds_at_once_when_telemetry_already_showed_running() -> None:
    change = domain.on_ack(
        cmd("start", status="acked"),
        "succeeded",
        None,
        at(2),
        run_state="running",
        run_state_at=at(1),
    )
    assert change is not None
    assert change.status == "succeeded"


def test_telemetry_from_before_the_command_does_not_count() -> None:
    change = domain.on_ack(
        cmd("stop", status="acked"),
        "succeeded",
        None,
        at(2),
        run_state="stopped",
        run_state_at=at(-5),
    )
    assert change is not None
    assert change.status == "acked"


def test_telemetry_without_the_devices_success_does_not_succeed() -> None:
    assert domain.on_run_state(cmd("start", status="acked"), "running", at(2)) is None


def test_start_fails_when_telemetry_never_follows_within_the_window() -> None:
    waiting = domain.on_ack(cmd("start", status="acked"), "succeeded", None, at(2))
    assert waiting is not None
    assert domain.on_sweep(waiting.command, at(2) + WINDOW - timedelta(seconds=1), WINDOW) is None
    failed = domain.on_sweep(waiting.command, at(2) + WINDOW, WINDOW)
    assert failed is not None
    assert failed.status == "failed"
    assert "telemetry did not show running" in (failed.command.detail or "")


# ------------------------------------------------------------------ OTA


def test_ota_phases_update_progress_and_prove_delivery() -> None:
    change = domain.on_ota_phase(cmd("force_ota", status="sent"), "downloading", 40, None, at(1))
    assert change is not None
    assert change.moved
    assert change.status == "acked"
    assert change.command.ota_phase == "downloading"
    assert change.command.ota_progress == 40
    more = domain.on_ota_phase(change.command, "installing", 90, None, at(2))
    assert more is not None
    assert not more.moved
    assert more.command.ota_phase == "installing"


def test_ota_failed_phase_fails_the_command() -> None:
    change = domain.on_ota_phase(cmd("fw_update", status="acked"), "failed", None, "bad sha", at(1))
    assert change is not None
    assert change.status == "failed"
    assert change.command.detail == "bad sha"


def test_ota_succeeds_when_the_device_is_back_with_the_new_firmware() -> None:
    rebooting = cmd("force_ota", status="acked", ota_phase="rebooting")
    assert domain.on_presence(rebooting, False, None, at(5)) is None
    done = domain.on_presence(rebooting, True, "2.5.0", at(6))
    assert done is not None
    assert done.status == "succeeded"


def test_ota_fails_when_the_device_returns_with_the_old_firmware() -> None:
    rebooting = cmd("force_ota", status="acked", ota_phase="rebooting")
    change = domain.on_presence(rebooting, True, "2.4.1", at(6))
    assert change is not None
    assert change.status == "failed"
    assert "2.4.1" in (change.command.detail or "")


def test_presence_before_the_update_started_is_not_a_verdict() -> None:
    assert domain.on_presence(cmd("fw_update", status="acked"), True, "2.4.1", at(1)) is None


def test_reboot_succeeds_when_the_device_returns_after_accepting_it() -> None:
    accepted = domain.on_ack(cmd(status="sent"), "accepted", None, at(1))
    assert accepted is not None
    assert domain.on_presence(accepted.command, True, "2.4.1", at(0.5)) is None
    back = domain.on_presence(accepted.command, True, "2.4.1", at(5))
    assert back is not None
    assert back.status == "succeeded"
    assert domain.on_presence(cmd(status="sent"), True, "2.4.1", at(5)) is None


def test_only_a_running_update_blocks_start_and_stop() -> None:
    assert cmd("force_ota", status="queued").updating
    assert not cmd("fw_update", status="acked").updating  # waits for the engine to stop
    assert cmd("fw_update", status="acked", ota_phase="installing").updating
    assert not cmd("force_ota", status="succeeded").updating


# ------------------------------------------------------------------ time


def test_sweep_expires_what_got_no_result_in_its_ttl() -> None:
    queued = cmd()
    assert domain.on_sweep(queued, at(119), WINDOW) is None
    change = domain.on_sweep(queued, at(120), WINDOW)
    assert change is not None
    assert change.status == "expired"
    assert "before it was sent" in (change.command.detail or "")


def test_gateway_expiry_does_not_override_an_ack() -> None:
    assert domain.on_gateway_status(cmd(status="acked"), "expired", None) is None
    change = domain.on_gateway_status(cmd(status="sent"), "expired", None)
    assert change is not None
    assert change.status == "expired"


# ------------------------------------------------------------------ request checks


def test_ttl_defaults_per_action_and_refuses_out_of_range() -> None:
    assert domain.resolve_ttl("start", None) == 120
    assert domain.resolve_ttl("fw_update", None) > domain.resolve_ttl("stop", None)
    with pytest.raises(InvalidCommandError) as err:
        domain.resolve_ttl("start", 100_000)
    assert err.value.field == "ttl_s"
    with pytest.raises(InvalidCommandError):
        domain.resolve_ttl("stop", 0)


@pytest.mark.parametrize(
    ("action", "params", "field"),
    [
        ("start", {"now": True}, "params"),
        ("fw_update", {}, "params.release_id"),
        ("force_ota", {"release_id": "r1", "url": "x"}, "params.url"),
        ("set_setting", {"value": 3}, "params.key"),
        ("set_setting", {"key": "turbo", "value": 3}, "params.key"),
        ("set_setting", {"key": "crank_attempts"}, "params.value"),
        ("set_setting", {"key": "crank_attempts", "value": 50}, "params.value"),
        ("set_setting", {"key": "crank_attempts", "value": "3"}, "params.value"),
        ("set_setting", {"key": "auto_start_on_mains_fail", "value": 1}, "params.value"),
        ("set_setting", {"key": "display_units", "value": "si"}, "params.key"),  # X Pro only
    ],
)
def test_bad_params_name_the_field(action: str, params: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidCommandError) as err:
        domain.check_params(action, params, D100)
    assert err.value.field == field


def test_good_setting_passes() -> None:
    params = {"key": "low_fuel_alarm_pct", "value": 20}
    assert domain.check_params("set_setting", params, D100) == params


def _release(**fields: object) -> Release:
    base = Release(
        "r1", "2.5.0", ("D100", "D180"), "diesel", None, "https://fw/x.bin", "a" * 64, 10
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def test_release_matching_names_the_mismatch() -> None:
    assert domain.release_mismatch(_release(), D100) is None
    assert "model D100" in (domain.release_mismatch(_release(models=("V5",)), D100) or "")
    assert "engine gas" in (domain.release_mismatch(_release(engine="gas"), D100) or "")
    assert "transport wifi" in (domain.release_mismatch(_release(transport="wifi"), D100) or "")
    assert "withdrawn" in (domain.release_mismatch(_release(withdrawn=True), D100) or "")


def test_ota_params_are_the_device_protocols_shape() -> None:
    assert domain.ota_params(_release()) == {
        "version": "2.5.0",
        "url": "https://fw/x.bin",
        "sha256": "a" * 64,
        "size": 10,
    }
