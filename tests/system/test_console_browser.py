"""The dealer console in Debian's Chromium (Playwright), against the running stack.

Needs what `make up` starts: the services behind nginx at 127.0.0.1:8080, the demo seed
(`deploy/local/seed`: `.local/demo/accounts.json`, `.local/demo/devices.json`) and the device
simulator. Each test waits for conditions with a deadline, never for a fixed time. Pages are
photographed into `services/console/docs/screenshots/` for the README's tour.
"""

import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from playwright.sync_api import Browser, Page, expect

from console.testing import (
    API,
    BASE_URL,
    LAPTOP,
    LIVE_DEADLINE_S,
    TABLET,
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


@pytest.fixture(scope="module")
def accounts() -> dict[str, Any]:
    """The demo's logins (written by `deploy/local/seed`)."""
    return load_accounts()


@pytest.fixture(scope="module")
def dealer(accounts: dict[str, Any]) -> dict[str, str]:
    """The first demo dealer's first staff login."""
    staff: dict[str, str] = accounts["dealers"][0]["staff"][0]
    return staff


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless (never a downloaded browser)."""
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser profile at laptop width."""
    with new_page(browser) as opened:
        yield opened


def test_login_rejects_a_wrong_password_and_shows_who_is_signed_in(
    page: Page, dealer: dict[str, str]
) -> None:
    page.goto("/login")
    page.get_by_label("Email").fill(dealer["email"])
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("Wrong email or password.")
    shot(page, "login")
    sign_in(page, dealer, keyboard=True)
    expect(page.get_by_test_id("account-role")).to_have_text("dealer")
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/login"))
    page.goto("/fleet")
    expect(page).to_have_url(re.compile(r"/login\?next="))


def running_or_stopped(headers: dict[str, str], device_id: str) -> str | None:
    response = httpx.get(f"{API}/devices/{device_id}", headers=headers)
    return response.json().get("run_state") if response.status_code == 200 else None


def test_dealer_finds_a_device_by_customer_email_and_starts_it(
    page: Page, dealer: dict[str, str]
) -> None:
    headers = api_login(dealer["email"], dealer["password"])
    candidates = wait_for(
        "a live device with a customer in the dealer's fleet",
        lambda: [d for d in api_devices(headers, connection="live") if d["customer_email"]],
    )
    device = next((d for d in candidates if d["run_state"] != "running"), candidates[0])
    if device["run_state"] == "running":  # start from a stopped unit, so Start shows a change
        stop = httpx.post(f"{API}/devices/{device['id']}/commands", headers=headers,
                          json={"action": "stop", "params": {}})  # fmt: skip
        assert stop.status_code == 202, stop.text
        wait_for("the unit to stop", lambda: running_or_stopped(headers, device["id"]) == "stopped")
    email = device["customer_email"]
    fragment = email[: email.index("@") + 4]  # "owner1@nor": part of the address only

    sign_in(page, dealer)
    page.wait_for_function("typeof window.htmx !== 'undefined'")
    search = page.get_by_label("Search")
    search.press_sequentially(fragment, delay=40)  # as you type: no submit
    row = page.locator(f'tr[data-device-id="{device["id"]}"]')
    expect(row).to_be_visible(timeout=15_000)
    for other in page.locator("#fleet-rows tr[data-device-id]").all():
        expect(other).to_contain_text(fragment)
    expect(row.get_by_test_id("connection")).to_have_text("live")
    shot(page, "fleet-console")

    row.get_by_role("link", name=re.compile("^Manage")).click()
    expect(page.get_by_role("heading", name=f"Manage {device['name']}")).to_be_visible()
    expect(page.get_by_test_id("device-id")).to_have_text(device["id"])
    page.get_by_role("button", name="Start", exact=True).click()
    expect(page.get_by_test_id("command-status")).to_have_text(
        "succeeded", timeout=LIVE_DEADLINE_S * 1000
    )
    expect(page.get_by_test_id("run-state")).to_have_text("running", timeout=LIVE_DEADLINE_S * 1000)
    expect(page.locator("#command-history")).to_contain_text("start")
    shot(page, "manage")


def command_history(headers: dict[str, str], device_id: str) -> list[dict[str, Any]]:
    """The device's commands through the API."""
    response = httpx.get(f"{API}/devices/{device_id}/commands", headers=headers)
    assert response.status_code == 200, f"command history: {response.status_code} {response.text}"
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def test_reboot_needs_a_confirmation(page: Page, dealer: dict[str, str]) -> None:
    headers = api_login(dealer["email"], dealer["password"])
    device = api_devices(headers)[0]
    sign_in(page, dealer)
    page.goto(f"/devices/{device['id']}")
    before = command_history(headers, device["id"])
    page.get_by_role("button", name="Reboot").click()
    expect(page.get_by_role("heading", name="Confirm Reboot")).to_be_visible()
    shot(page, "confirm-reboot")
    page.get_by_role("link", name="Cancel").click()
    after = command_history(headers, device["id"])
    assert len(after) == len(before), "Reboot was sent without confirmation"


def map_position_device(headers: dict[str, str], *, online: bool) -> dict[str, Any]:
    """A demo GPS unit that reports a position; online or gone offline, as asked."""
    found = [d for d in api_devices(headers) if d["gps"] and d["position"]]
    wanted = [d for d in found if (d["connection"] == "live") == online]
    return wanted[0] if wanted else {}


LOST_UNIT = "AG1LOST"


def lost_unit(headers: dict[str, str]) -> None:
    """A GPS unit that reported a position and then lost contact (a red marker).

    Registered in the dealer's fleet (kept across runs), it speaks the device protocol over
    MQTT with its own credentials: online, one telemetry reading with a position, offline.
    """
    body = {"id": LOST_UNIT, "name": "Lost Contact Unit", "model": "X Pro", "engine": None,
            "transport": "gsm", "gps": True, "firmware_version": "3.2.0"}  # fmt: skip
    created = httpx.post(f"{API}/devices", json=body, headers=headers)
    if created.status_code == 201 and created.json().get("mqtt_password"):
        password = created.json()["mqtt_password"]
    else:
        assert created.status_code in (201, 409), created.text
        issued = httpx.post(f"{API}/devices/{LOST_UNIT}/mqtt-credentials", headers=headers)
        assert issued.status_code == 201, issued.text
        password = issued.json()["password"]
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=LOST_UNIT,
        protocol=mqtt.MQTTv5,
    )  # fmt: skip
    client.username_pw_set(LOST_UNIT, password)
    client.connect(os.environ.get("AUTOGEN_MQTT_HOST", "127.0.0.1"),
                   int(os.environ.get("AUTOGEN_MQTT_PORT", "1883")))  # fmt: skip
    client.loop_start()
    try:
        up = f"devices/{LOST_UNIT}/up"
        now = time.time()
        for topic, payload, retain in (
            (f"{up}/status", {"state": "online", "fw": "3.2.0", "ts": now}, True),
            (f"{up}/telemetry", {"ts": now, "run_state": "stopped", "battery_v": 12.1,
                                 "fuel_pct": 40.0, "engine_hours": 812.5,
                                 "lat": 30.61, "lon": -97.35}, False),
            (f"{up}/status", {"state": "offline", "fw": "3.2.0", "ts": now + 1}, True),
        ):  # fmt: skip
            client.publish(topic, json.dumps(payload), qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()

    def reported() -> bool:
        found = httpx.get(f"{API}/devices/{LOST_UNIT}", headers=headers).json()
        return found.get("connection") == "offline" and found.get("position") is not None

    wait_for("the lost unit's position and offline state", reported)


def test_map_shows_green_and_red_markers_with_manage_links(
    page: Page, dealer: dict[str, str], accounts: dict[str, Any]
) -> None:
    headers = api_login(dealer["email"], dealer["password"])
    wait_for("a live GPS unit with a position", lambda: map_position_device(headers, online=True))
    lost_unit(headers)
    red = [
        f for f in httpx.get(
            f"{API}/map/devices", params={"bbox": "-180,-90,180,90"}, headers=headers
        ).json()["features"]
        if f["properties"]["marker"] == "red"
    ]  # fmt: skip
    assert LOST_UNIT in {f["properties"]["id"] for f in red}
    sign_in(page, dealer)
    page.get_by_role("link", name="Fleet Map").click()
    expect(page.locator("path.marker-green").first).to_be_visible()
    expect(page.locator("path.marker-red").first).to_be_visible()
    expect(page.locator("#map-status")).to_contain_text("green")
    page.locator("path.marker-red").last.click(force=True)
    popup = page.locator(".leaflet-popup-content")
    expect(popup).to_contain_text("Last seen")
    expect(popup.get_by_role("link", name="Manage")).to_be_visible()
    shot(page, "fleet-map")
    # No tile server is configured (and none is reachable here): markers show all the same.
    assert page.locator(".leaflet-tile").count() == 0


def test_pages_fit_a_tablet(browser: Browser, dealer: dict[str, str]) -> None:
    context = browser.new_context(viewport=TABLET, base_url=BASE_URL)
    page = context.new_page()
    try:
        sign_in(page, dealer)
        for path in ("/fleet", "/firmware/unified", "/tokens"):
            page.goto(path)
            overflow = page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 1, f"{path} scrolls sideways at tablet width ({overflow}px)"
        page.goto("/fleet")
        shot(page, "fleet-console-tablet")
    finally:
        context.close()


def test_admin_sections_are_absent_for_dealers(
    browser: Browser, dealer: dict[str, str], accounts: dict[str, Any]
) -> None:
    context = browser.new_context(viewport=LAPTOP, base_url=BASE_URL)
    page = context.new_page()
    try:
        sign_in(page, dealer)
        expect(page.get_by_role("link", name=re.compile("^Dealers"))).to_have_count(0)
        page.goto("/firmware/xpro?transport=gsm")
        expect(page.get_by_label(re.compile("^Scope"))).to_have_count(0)
        expect(page.get_by_text("Override")).to_have_count(0)
        page.goto("/dealers")
        expect(page.get_by_test_id("error-detail")).to_be_visible()
        refused = httpx.get(
            f"{API}/dealers", headers=api_login(dealer["email"], dealer["password"])
        )
        assert refused.status_code == 403
    finally:
        context.close()
    context = browser.new_context(viewport=LAPTOP, base_url=BASE_URL)
    page = context.new_page()
    try:
        sign_in(page, accounts["admin"])
        expect(page.get_by_test_id("account-role")).to_have_text("admin")
        page.get_by_role("link", name=re.compile("^Dealers")).click()
        expect(page.get_by_role("cell", name=accounts["dealers"][0]["name"])).to_be_visible()
        shot(page, "dealers-admin")
    finally:
        context.close()


def test_never_sees_another_dealers_device(
    page: Page, dealer: dict[str, str], accounts: dict[str, Any]
) -> None:
    other = accounts["dealers"][1]["staff"][0]
    theirs = api_devices(api_login(other["email"], other["password"]))
    mine = {d["id"] for d in api_devices(api_login(dealer["email"], dealer["password"]))}
    assert theirs, "the second demo dealer has no devices"
    assert not mine & {d["id"] for d in theirs}
    victim = theirs[0]
    sign_in(page, dealer)
    for query in (victim["id"], victim["name"], victim["customer_email"] or victim["id"]):
        page.goto(f"/fleet?q={query}")
        expect(page.locator(f'tr[data-device-id="{victim["id"]}"]')).to_have_count(0)
    page.goto(f"/devices/{victim['id']}")
    expect(page.get_by_test_id("error-detail")).to_be_visible()
    expect(page.get_by_text(victim["name"])).to_have_count(0)
    features = page.request.get("/map/data").json()["features"]
    assert victim["id"] not in {f["properties"]["id"] for f in features}
    assert {f["properties"]["id"] for f in features} <= mine
    page.goto("/tokens")
    assert victim["id"] not in page.locator("#device-ids").inner_html()
    page.goto("/firmware/unified?engine=gas&transport=gsm")
    assert victim["id"] not in page.content()


def test_customer_token_reads_its_device_and_cannot_command(
    page: Page, dealer: dict[str, str], accounts: dict[str, Any]
) -> None:
    customer = accounts["dealers"][0]["customers"][0]
    headers = api_login(dealer["email"], dealer["password"])
    theirs = [d for d in api_devices(headers) if d["customer_email"] == customer["email"]]
    assert theirs, f"no demo device belongs to {customer['email']}"
    device = theirs[0]
    name = f"pilot {uuid.uuid4().hex[:6]}"

    sign_in(page, dealer)
    page.get_by_role("link", name="API Tokens").click()
    expect(page.get_by_text("For dashboards, reporting and monitoring.")).to_be_visible()
    expect(page.get_by_label("Read-only")).not_to_be_checked()
    expect(page.get_by_label("Control-enabled")).not_to_be_checked()
    page.get_by_label("Name").fill(name)
    page.get_by_label("Account the token acts for").select_option(value=customer["id"])
    page.get_by_label("Read-only").check()
    page.get_by_label("Restrict to devices (optional)").fill(device["id"])
    page.get_by_label("Expires in (days)").fill("7")
    page.get_by_role("button", name="Create token").click()
    expect(page.get_by_test_id("new-token")).to_contain_text("shown only once")
    secret = page.get_by_test_id("token-secret").input_value()
    assert secret.startswith("agk_")
    shot(page, "api-tokens")

    bearer = {"Authorization": f"Bearer {secret}"}
    read = httpx.get(f"{API}/devices/{device['id']}", headers=bearer)
    assert read.status_code == 200, read.text
    assert read.json()["id"] == device["id"]
    command = httpx.post(f"{API}/devices/{device['id']}/commands", headers=bearer,
                         json={"action": "start", "params": {}})  # fmt: skip
    assert command.status_code == 403, command.text
    assert command.headers["content-type"].startswith("application/problem+json")
    others = [d for d in api_devices(headers) if d["id"] != device["id"]]
    assert httpx.get(f"{API}/devices/{others[0]['id']}", headers=bearer).status_code in (403, 404)

    page.reload()  # the secret is gone for good; the list shows the token
    expect(page.get_by_test_id("token-secret")).to_have_count(0)
    row = page.locator("tr", has_text=name)
    expect(row).to_contain_text("read-only")
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name=f"Revoke {name}").click()
    # Revoked: its Revoke button is gone (the list marks it revoked, or leaves it out).
    expect(page.get_by_role("button", name=f"Revoke {name}")).to_have_count(0)
    wait_for(
        "the revoked token to stop working",
        lambda: httpx.get(f"{API}/devices/{device['id']}", headers=bearer).status_code == 401,
        deadline_s=5,
    )
