"""Helpers for the console's browser tests (Playwright + Debian's Chromium) against the stack.

Dev-only: imports playwright and pytest; the service never imports this module.
"""

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, ViewportSize, expect, sync_playwright

SERVICE_DIR = Path(__file__).resolve().parents[2]
ROOT = SERVICE_DIR.parents[1]
BASE_URL = os.environ.get("AUTOGEN_CONSOLE_URL", "http://127.0.0.1:8080/").rstrip("/")
API = os.environ.get("AUTOGEN_API_BASE_URL", f"{BASE_URL}/api/v1")
DEMO = Path(os.environ.get("AUTOGEN_LOCAL_DIR", ROOT / ".local")) / "demo"
SHOTS = SERVICE_DIR / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
LAPTOP: ViewportSize = {"width": 1366, "height": 900}
TABLET: ViewportSize = {"width": 820, "height": 1180}
# The simulated fleet answers within seconds; OTAs (download, install, reboot) take longer.
LIVE_DEADLINE_S = 60.0
OTA_DEADLINE_S = 240.0


def wait_for(what: str, check: Callable[[], Any], deadline_s: float = LIVE_DEADLINE_S) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline."""
    end = time.monotonic() + deadline_s
    last: Any = None
    while time.monotonic() < end:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"timed out after {deadline_s:.0f}s waiting for {what} (last: {last!r})")


def load_accounts() -> dict[str, Any]:
    """The demo's logins (written by `deploy/local/seed`)."""
    path = DEMO / "accounts.json"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run deploy/local/seed (make up does) first")
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def api_login(email: str, password: str) -> dict[str, str]:
    """Bearer headers of a fresh session, through the API gateway."""
    response = httpx.post(f"{API}/auth/login", json={"email": email, "password": password})
    if response.status_code != 200:
        pytest.fail(f"login as {email}: {response.status_code} {response.text}")
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def api_devices(headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    """Every device the caller sees (all pages)."""
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {"limit": 500, **params, **({"cursor": cursor} if cursor else {})}
        response = httpx.get(f"{API}/devices", params=query, headers=headers)
        if response.status_code != 200:
            pytest.fail(f"GET /devices: {response.status_code} {response.text}")
        body = response.json()
        found.extend(body["items"])
        cursor = body.get("next_cursor")
        if not cursor:
            return found


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright (never a downloaded browser)."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        yield launched
        launched.close()


@contextmanager
def new_page(browser: Browser, viewport: ViewportSize | None = None) -> Iterator[Page]:
    """A fresh browser profile (laptop width unless told)."""
    context = browser.new_context(viewport=viewport or LAPTOP, base_url=BASE_URL)
    context.set_default_timeout(15_000)
    try:
        yield context.new_page()
    finally:
        context.close()


def shot(page: Page, name: str) -> None:
    """A screenshot for the README's tour."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(page: Page, account: dict[str, str], *, keyboard: bool = False) -> None:
    """Sign in through the login page (optionally with the keyboard only)."""
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login"))
    if keyboard:
        page.get_by_label("Email").focus()
        page.keyboard.type(account["email"])
        page.keyboard.press("Tab")
        page.keyboard.type(account["password"])
        page.keyboard.press("Enter")
    else:
        page.get_by_label("Email").fill(account["email"])
        page.get_by_label("Password").fill(account["password"])
        page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Fleet Console")).to_be_visible()
    expect(page.get_by_test_id("account-email")).to_have_text(account["email"])
