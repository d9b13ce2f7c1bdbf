"""Safe OTA through the Unified firmware console, in Debian's Chromium against the stack.

The manual's procedure: validate the release on a test device, choose console, engine and
variant, deploy to `my_fleet`, watch the rollout (pause, resume, clear), and confirm in the
Fleet Console that the devices report the new version. An admin publishes the release first
(`POST /firmware/releases` is admin only). Needs the demo seed and the simulator running.
"""

import re
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from console.testing import (
    API,
    OTA_DEADLINE_S,
    api_devices,
    api_login,
    chromium,
    load_accounts,
    new_page,
    shot,
    sign_in,
    wait_for,
)

pytestmark = pytest.mark.stack

MODEL, ENGINE, TRANSPORT = "D100", "gas", "gsm"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless."""
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser profile at laptop width."""
    with new_page(browser) as opened:
        yield opened


def publish_release(admin: dict[str, str]) -> dict[str, Any]:
    """A new Unified release for D100 / gas / GSM, as the platform admin publishes it."""
    version = f"2.5.{secrets.randbelow(10**6)}"
    response = httpx.post(
        f"{API}/firmware/releases",
        headers=admin,
        json={
            "console": "unified", "version": version, "models": [MODEL], "engine": ENGINE,
            "transport": TRANSPORT,
            "artifact_url": f"https://firmware.autogen.example/unified/{version}.bin",
            "sha256": secrets.token_hex(32), "size": 1_048_576,
            "notes": "Browser test release: generator start sequence tuning.",
        },
    )  # fmt: skip
    assert response.status_code == 201, response.text
    release: dict[str, Any] = response.json()
    return release


def rollout_status(page: Page) -> str:
    return page.get_by_test_id("rollout-status").inner_text()


def validate_on_test_device(page: Page, version: str, device_id: str) -> Locator:
    """Choose the variant, validate the release on the test device, wait until it passes."""
    page.get_by_role("link", name="Unified firmware").click()
    expect(page.get_by_text("Choose the engine and transport variant")).to_be_visible()
    page.get_by_label("Model").select_option(MODEL)
    page.get_by_label("Engine (required)").select_option(ENGINE)
    page.get_by_label("Transport (required)").select_option(TRANSPORT)
    page.get_by_role("button", name="Show releases").click()
    article = page.locator(f'article[data-version="{version}"]')
    expect(article.get_by_test_id("validated")).to_have_text("not validated")
    article.get_by_label("Test device").select_option(device_id)
    article.get_by_role("button", name="Validate on test device").click()
    expect(page.get_by_role("status").filter(has_text="Validation started")).to_be_visible()
    article = page.locator(f'article[data-version="{version}"]')
    expect(article.get_by_test_id("validation-state")).to_have_text(
        "confirmed", timeout=OTA_DEADLINE_S * 1000
    )
    page.reload()
    article = page.locator(f'article[data-version="{version}"]')
    expect(article.get_by_test_id("validated")).to_have_text("validated")
    shot(page, "firmware-unified")
    return article


def watch_fleet_console(page: Page, version: str, live_targets: set[str]) -> None:
    """Wait until every unit that was live reports `version` in the Fleet Console."""
    page.get_by_role("link", name="Fleet Console").click()
    page.get_by_label("Model").select_option(MODEL)
    page.get_by_label("Firmware").fill(version)
    page.get_by_role("button", name="Search").click()

    def updated() -> set[str] | None:
        # One snapshot of the rows (the live refresh swaps them between calls): the live ids,
        # once every row listed is on `version`. Until the filtered search has rendered, the
        # table may still list the model's other units on the old version.
        rows: list[list[str]] = page.eval_on_selector_all(
            "#fleet-rows tr[data-device-id]",
            """rows => rows.map(r => [
                r.dataset.deviceId,
                r.querySelector('[data-testid=connection]')?.innerText.trim() ?? '',
                r.querySelector('[data-testid=firmware]')?.innerText.trim() ?? '',
            ])""",
        )
        if not rows or any(firmware != version for _, _, firmware in rows):
            return None
        return {device for device, connection, _ in rows if connection == "live"}

    wait_for(
        f"every live {MODEL} {ENGINE} {TRANSPORT} unit to report {version} in the Fleet Console",
        lambda: live_targets <= (updated() or set()) or None,
        deadline_s=OTA_DEADLINE_S,
    )
    shown: list[str] = page.eval_on_selector_all(
        "#fleet-rows [data-testid=firmware]", "cells => cells.map(c => c.innerText.trim())"
    )
    assert shown, "the Fleet Console shows no device of the new version"
    assert set(shown) == {version}, shown
    shot(page, "fleet-console-after-rollout")


def clear_rollouts_of(release_id: str, headers: dict[str, str]) -> None:
    """Leave no active rollout behind, whatever happened (the next run would get a 409)."""
    rollouts = httpx.get(f"{API}/rollouts", headers=headers).json()["items"]
    for rollout in rollouts:
        if rollout["release"]["id"] == release_id and rollout["status"] in ("running", "paused"):
            httpx.post(f"{API}/rollouts/{rollout['id']}/clear", headers=headers)


def test_unified_validate_deploy_and_watch_versions_change(page: Page) -> None:
    accounts = load_accounts()
    dealer = accounts["dealers"][0]["staff"][0]
    admin = api_login(accounts["admin"]["email"], accounts["admin"]["password"])
    headers = api_login(dealer["email"], dealer["password"])
    targets = [
        d for d in api_devices(headers, model=MODEL)
        if d["engine"] == ENGINE and d["transport"] == TRANSPORT
    ]  # fmt: skip
    tests = [d for d in targets if d["test_device"]]
    assert tests, f"the demo dealer has no {MODEL} {ENGINE} {TRANSPORT} test device"
    test_device = wait_for(
        "the test device to be live",
        lambda: next(
            (d for d in api_devices(headers, model=MODEL, connection="live")
             if d["id"] in {t["id"] for t in tests}), None),
    )  # fmt: skip
    release = publish_release(admin)
    try:
        deploy_and_watch(page, dealer, headers, release, test_device)
    finally:
        clear_rollouts_of(release["id"], headers)


def deploy_and_watch(
    page: Page,
    dealer: dict[str, Any],
    headers: dict[str, str],
    release: dict[str, Any],
    test_device: dict[str, Any],
) -> None:
    """The manual's workflow, in the console, for one release."""
    version = release["version"]

    # 1-2. Validate on the test device, in the Unified console, with the variant chosen.
    sign_in(page, dealer)
    article = validate_on_test_device(page, version, test_device["id"])

    # 3. Deploy to my_fleet, small batches; pause and resume on the way.
    live_targets = {d["id"] for d in api_devices(headers, model=MODEL, connection="live")
                    if d["engine"] == ENGINE and d["transport"] == TRANSPORT}  # fmt: skip
    article.get_by_label("Batch size").fill("2")
    article.get_by_role("button", name="Deploy to my_fleet").click()
    expect(page.get_by_role("heading", name=f"Rollout of {version}")).to_be_visible()
    if rollout_status(page) == "running":
        page.get_by_role("button", name="Pause").click()
        expect(page.get_by_test_id("rollout-status")).to_have_text("paused")
        page.get_by_role("button", name="Resume").click()
        expect(page.get_by_test_id("rollout-status")).to_have_text(re.compile("running|completed"))
    expect(page.get_by_test_id("count-confirmed")).not_to_have_text(
        "0", timeout=OTA_DEADLINE_S * 1000
    )
    shot(page, "rollout")

    # 4-5. The Fleet Console shows the devices live again with the new version.
    watch_fleet_console(page, version, live_targets)

    # Clear whatever is left (offline units that never came back), if it has not finished.
    rollouts = httpx.get(f"{API}/rollouts", headers=headers).json()["items"]
    mine = next(r for r in rollouts if r["release"]["id"] == release["id"])
    page.goto(f"/rollouts/{mine['id']}")
    if rollout_status(page) in ("running", "paused"):
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Clear").click()
        expect(page.get_by_test_id("rollout-status")).to_have_text("cleared")
