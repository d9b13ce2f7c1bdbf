"""The real `autogen` command against the running stack, through the API gateway (nginx).

Each case runs `python -m autogen_cli` as a subprocess, the way an operator or a script does,
with the demo accounts (`deploy/local/seed`) and the simulated demo fleet. The rollout case
publishes its own release as the admin and clears its rollout whatever happens.
"""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
API = os.environ.get("AUTOGEN_API_BASE_URL", "http://127.0.0.1:8080/api/v1").rstrip("/")
DEMO = Path(os.environ.get("AUTOGEN_LOCAL_DIR", ROOT / ".local")) / "demo"
LIVE_DEADLINE_S = 60.0
OTA_DEADLINE_S = 420.0  # OTAs include download, install and a reboot per unit


def wait_for(what: str, check: Callable[[], Any], deadline_s: float = LIVE_DEADLINE_S) -> Any:
    """Poll `check` until truthy; fail naming `what` at the deadline."""
    end = time.monotonic() + deadline_s
    last: Any = None
    while time.monotonic() < end:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"timed out after {deadline_s:.0f}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def accounts() -> dict[str, Any]:
    path = DEMO / "accounts.json"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run deploy/local/seed (make up does) first")
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A private config folder: no saved session of the machine's user leaks in."""
    return tmp_path / "autogen-config"


Autogen = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def autogen(config_dir: Path) -> Autogen:
    """`autogen(*args, token=None, timeout=...)` → the finished process (text output)."""

    def run(
        *args: str, token: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "AUTOGEN_TOKEN"}
        env |= {"AUTOGEN_API_BASE_URL": API, "AUTOGEN_CONFIG_DIR": str(config_dir)}
        if token:
            env["AUTOGEN_TOKEN"] = token
        return subprocess.run(
            [sys.executable, "-m", "autogen_cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result).stdout)


def login(autogen: Autogen, account: dict[str, str]) -> str:
    """A session token through `autogen login --print-token`."""
    result = ok(autogen("login", "-e", account["email"], "--print-token",
                        "--password", account["password"]))  # fmt: skip
    return result.stdout.strip()


def api_get(token: str, path: str, **params: Any) -> Any:
    response = httpx.get(f"{API}/{path}", params=params, headers=bearer(token), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def north(accounts: dict[str, Any]) -> dict[str, Any]:
    dealer: dict[str, Any] = accounts["dealers"][0]
    return dealer


# ------------------------------------------------------------------------ devices


def test_a_dealer_searches_its_fleet_and_shows_one_device(
    autogen: Autogen, accounts: dict[str, Any]
) -> None:
    dealer = north(accounts)
    token = login(autogen, dealer["staff"][0])
    found = as_json(autogen("devices", "search", "pump", "--all", "-o", "json", token=token))
    assert found, "the demo dealer has no device named like 'pump'"
    assert {d["dealer_id"] for d in found} == {dealer["id"]}
    assert all("pump" in (d["id"] + d["name"] + (d["customer_email"] or "")).lower() for d in found)

    # --limit stops early and says more exist; --all followed every page (same as the API).
    two = autogen("devices", "list", "--limit", "2", "-o", "json", token=token)
    assert len(as_json(two)) == 2
    assert "more match" in two.stderr
    everything = as_json(autogen("devices", "list", "--all", "-o", "json", token=token))
    assert len(everything) > 2
    assert {d["id"] for d in found} <= {d["id"] for d in everything}

    device = found[0]
    shown = ok(autogen("devices", "show", device["id"], token=token)).stdout
    assert device["name"] in shown
    assert device["model"] in shown
    assert device["firmware_version"] in shown

    # Another dealer's device is invisible: a 404 problem, shown plainly, exit 1.
    other = login(autogen, accounts["dealers"][1]["staff"][0])
    theirs = as_json(autogen("devices", "list", "-n", "1", "-o", "json", token=other))[0]
    hidden = autogen("devices", "show", theirs["id"], token=token)
    assert hidden.returncode == 1
    assert "(HTTP 404)" in hidden.stderr
    assert "Traceback" not in hidden.stderr


def test_an_unreachable_api_is_a_clear_message_and_exit_3(autogen: Autogen) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # released at once: nothing listens there
    result = autogen(
        "--base-url", f"http://127.0.0.1:{port}/api/v1", "devices", "list", token="anything"
    )
    assert result.returncode == 3
    assert "Cannot connect to the API" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_token_is_the_apis_401_problem(autogen: Autogen) -> None:
    result = autogen("whoami", token="agk_not_a_real_token")
    assert result.returncode == 1
    assert "(HTTP 401)" in result.stderr


# ------------------------------------------------------------------------ commands


def test_a_command_sent_with_wait_succeeds_on_a_simulated_device(
    autogen: Autogen, accounts: dict[str, Any]
) -> None:
    token = login(autogen, north(accounts)["staff"][0])
    live = wait_for(
        "a live demo device",
        lambda: as_json(autogen("devices", "list", "-c", "live", "-n", "5", "-o", "json",
                                token=token)),
    )  # fmt: skip
    device = live[0]["id"]
    # A harmless setting every model accepts; the simulator acks and reports success.
    result = ok(autogen(
        "commands", "send", device, "set_setting", "-p", "key=exercise_interval_days",
        "-p", "value=7", "--wait", "--timeout", "120", "-o", "json", token=token, timeout=180,
    ))  # fmt: skip
    command = json.loads(result.stdout)
    assert command["status"] == "succeeded"
    assert command["params"] == {"key": "exercise_interval_days", "value": 7}
    assert api_get(token, f"commands/{command['id']}")["status"] == "succeeded"
    history = as_json(autogen("devices", "history", device, "-o", "json", token=token))
    assert command["id"] in {c["id"] for c in history}

    # A setting the model does not have: the API's 422, the field named, exit 1.
    refused = autogen("commands", "send", device, "set_setting", "-p", "key=warp_drive",
                      "-p", "value=1", token=token)  # fmt: skip
    assert refused.returncode == 1
    assert "(HTTP 422)" in refused.stderr
    assert "params.key" in refused.stderr


# ------------------------------------------------------------------------ tokens


def test_a_dealer_creates_a_scoped_token_uses_it_and_revokes_it(
    autogen: Autogen, accounts: dict[str, Any]
) -> None:
    token = login(autogen, north(accounts)["staff"][0])
    device = as_json(autogen("devices", "list", "-n", "1", "-o", "json", token=token))[0]["id"]
    name = f"cli test {secrets.token_hex(3)}"
    created = as_json(autogen(
        "tokens", "create", "--name", name, "--access", "read", "-d", device,
        "--expires-in-days", "1", "-o", "json", token=token,
    ))  # fmt: skip
    secret = created["token"]
    assert secret.startswith("agk_")
    listed = as_json(autogen("tokens", "list", "--all", "-o", "json", token=token))
    mine = next(t for t in listed if t["id"] == created["id"])
    assert "token" not in mine  # the secret is shown only at creation

    # The new token works through the CLI and sees only its device.
    seen = as_json(autogen("devices", "list", "--all", "-o", "json", token=secret))
    assert [d["id"] for d in seen] == [device]
    read_only = autogen("commands", "send", device, "reboot", token=secret)
    assert read_only.returncode == 1
    assert "(HTTP 403)" in read_only.stderr

    ok(autogen("tokens", "revoke", created["id"], token=token))
    wait_for(
        "the revoked token to stop working",
        lambda: autogen("whoami", token=secret).returncode == 1,
        deadline_s=30,  # the API says within a second; each check also starts a process
    )
    assert "(HTTP 401)" in autogen("whoami", token=secret).stderr


# ------------------------------------------------------------------------ firmware


def publish_release(admin_token: str) -> dict[str, Any]:
    """A new Ultra WiFi release, published by the admin through the API."""
    version = f"5.9.{secrets.randbelow(10**6)}"
    response = httpx.post(
        f"{API}/firmware/releases",
        headers=bearer(admin_token),
        json={
            "console": "ultra", "version": version, "models": ["Ultra"], "transport": "wifi",
            "artifact_url": f"https://firmware.autogen.example/ultra/{version}.bin",
            "sha256": secrets.token_hex(32), "size": 1_048_576,
            "notes": "CLI system test release.",
        },
        timeout=30,
    )  # fmt: skip
    assert response.status_code == 201, response.text
    release: dict[str, Any] = response.json()
    return release


@pytest.fixture
def admin_token(autogen: Autogen, accounts: dict[str, Any]) -> str:
    return login(autogen, accounts["admin"])


@pytest.fixture
def release(admin_token: str) -> Iterator[dict[str, Any]]:
    """This test's own release; any rollout of it still active afterwards is cleared."""
    published = publish_release(admin_token)
    yield published
    for rollout in api_get(admin_token, "rollouts", limit=500)["items"]:
        if rollout["release"]["id"] == published["id"] and rollout["status"] in (
            "running",
            "paused",
        ):
            httpx.post(f"{API}/rollouts/{rollout['id']}/clear", headers=bearer(admin_token))


def test_releases_are_listed_and_shown(
    autogen: Autogen, admin_token: str, release: dict[str, Any], accounts: dict[str, Any]
) -> None:
    dealer = login(autogen, north(accounts)["staff"][0])
    listed = as_json(autogen("releases", "list", "--console", "ultra", "--transport", "wifi",
                             "--all", "-o", "json", token=dealer))  # fmt: skip
    assert release["id"] in {r["id"] for r in listed}
    assert all(r["console"] == "ultra" for r in listed)
    table = ok(autogen("releases", "list", "--console", "ultra", "-n", "500", token=dealer))
    assert release["version"] in table.stdout
    shown = ok(autogen("releases", "show", release["id"], token=dealer)).stdout
    assert release["sha256"] in shown


def test_a_rollout_is_deployed_followed_paused_resumed_and_completes(
    autogen: Autogen,
    admin_token: str,
    release: dict[str, Any],
    accounts: dict[str, Any],
    tmp_path: Path,
) -> None:
    dealer_id = north(accounts)["id"]
    units = wait_for(
        "two live Ultra WiFi units of the demo dealer",
        lambda: [
            d for d in as_json(autogen("devices", "list", "-m", "Ultra", "-c", "live", "--all",
                                       "-o", "json", token=admin_token))
            if d["transport"] == "wifi" and d["dealer_id"] == dealer_id
        ][:2],
    )  # fmt: skip
    targets = sorted(d["id"] for d in units)

    # Deploy and follow in one process (the live bar), while another pauses and resumes.
    log = tmp_path / "follow.log"
    env = {k: v for k, v in os.environ.items() if k != "AUTOGEN_CONFIG_DIR"}
    env |= {"AUTOGEN_API_BASE_URL": API, "AUTOGEN_TOKEN": admin_token}
    with log.open("w") as stderr:
        follower = subprocess.Popen(
            [sys.executable, "-m", "autogen_cli", "rollouts", "deploy", release["id"],
             "--dealer", dealer_id, "-m", "Ultra", "--transport", "wifi",
             *(a for t in targets for a in ("-d", t)), "--batch-size", "2",
             "--override", "CLI system test on simulated units", "--interval", "0.5",
             "--timeout", str(OTA_DEADLINE_S), "-o", "json"],
            env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
        try:
            rollout_id = wait_for(
                "the rollout to start",
                lambda: next(
                    (r["id"] for r in api_get(admin_token, "rollouts", limit=50)["items"]
                     if r["release"]["id"] == release["id"]), None),
            )  # fmt: skip
            paused = as_json(autogen("rollouts", "pause", rollout_id, "-o", "json",
                                     token=admin_token))  # fmt: skip
            assert paused["status"] == "paused"
            assert as_json(autogen("rollouts", "show", rollout_id, "-o", "json",
                                   token=admin_token))["status"] == "paused"  # fmt: skip
            in_list = as_json(autogen("rollouts", "list", "--status", "paused", "-o", "json",
                                      token=admin_token))  # fmt: skip
            assert rollout_id in {r["id"] for r in in_list}
            wait_for("the follower to see the pause", lambda: "paused" in log.read_text())
            resumed = as_json(autogen("rollouts", "resume", rollout_id, "-o", "json",
                                      token=admin_token))  # fmt: skip
            assert resumed["status"] in ("running", "completed")
            stdout, _ = follower.communicate(timeout=OTA_DEADLINE_S + 60)
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
    story = log.read_text()
    assert follower.returncode == 0, story
    final = json.loads(stdout)
    assert final["id"] == rollout_id
    assert final["status"] == "completed"
    assert final["counts"]["confirmed"] == len(targets)
    assert f"{rollout_id}: paused" in story
    assert f"{rollout_id}: completed" in story
    assert "Traceback" not in story

    # The units report the release's version; the per-device view says confirmed.
    for device in targets:
        shown = as_json(autogen("devices", "show", device, "-o", "json", token=admin_token))
        assert shown["firmware_version"] == release["version"]
    states = as_json(autogen("rollouts", "devices", rollout_id, "-o", "json", token=admin_token))
    assert {d["device_id"]: d["state"] for d in states} == dict.fromkeys(targets, "confirmed")

    # A finished rollout cannot be resumed: the API's 409, shown plainly.
    again = autogen("rollouts", "resume", rollout_id, token=admin_token)
    assert again.returncode == 1
    assert "(HTTP 409)" in again.stderr


def test_clear_ends_a_rollout_and_follow_reports_it(
    autogen: Autogen, admin_token: str, release: dict[str, Any], accounts: dict[str, Any]
) -> None:
    dealer_id = north(accounts)["id"]
    unit = wait_for(
        "a live Ultra WiFi unit of the demo dealer",
        lambda: next(
            (d["id"] for d in as_json(autogen("devices", "list", "-m", "Ultra", "-c", "live",
                                              "--all", "-o", "json", token=admin_token))
             if d["transport"] == "wifi" and d["dealer_id"] == dealer_id), None),
    )  # fmt: skip
    created = as_json(autogen(
        "rollouts", "deploy", release["id"], "--dealer", dealer_id, "-d", unit,
        "--override", "CLI system test: cleared at once", "--no-follow", "-o", "json",
        token=admin_token,
    ))  # fmt: skip
    assert created["status"] == "running"
    cleared = as_json(autogen("rollouts", "clear", created["id"], "-o", "json", token=admin_token))
    assert cleared["status"] == "cleared"
    followed = autogen("rollouts", "follow", created["id"], "-o", "json", token=admin_token)
    assert followed.returncode == 4
    assert "Rollout cleared" in followed.stderr
    assert json.loads(followed.stdout)["status"] == "cleared"
