"""The `autogen` commands through CliRunner over an httpx.MockTransport fake of the API."""

import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner, Result

from autogen_cli.app import app

Handler = Callable[[httpx.Request], httpx.Response]
DEVICE = {
    "id": "AG10000",
    "name": "[bold]North[/bold] Pump",
    "model": "X Pro",
    "engine": None,
    "transport": "gsm",
    "gps": True,
    "dealer_id": "d-1",
    "customer_email": "owner@example.com",
    "firmware_version": "3.2.0",
    "connection": "live",
    "last_seen_at": "2026-11-25T22:18:08.746846Z",
    "run_state": "stopped",
    "position": {"lat": 30.1, "lon": -97.8, "at": "2026-11-25T22:18:08.746000Z"},
    "attention": False,
    "test_device": True,
}


class FakeApi:
    """Routes `METHOD /path` to canned answers; records every request."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[httpx.Request] = []

    def on(self, route: str, *answers: Any, status: int = 200) -> None:
        """Answer `route` with each of `answers` in turn (the last one repeats)."""
        queue = list(answers)

        def answer(_: httpx.Request) -> httpx.Response:
            body = queue.pop(0) if len(queue) > 1 else queue[0]
            if isinstance(body, httpx.Response):
                return body
            return httpx.Response(status, json=body)

        self.routes[route] = answer

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        route = f"{request.method} {request.url.path.removeprefix('/api/v1')}"
        if route not in self.routes:
            return problem(404, "Not found", f"no route {route}")
        return self.routes[route](request)

    def bodies(self, route: str) -> list[Any]:
        method, path = route.split(" ", 1)
        return [
            json.loads(r.content)
            for r in self.requests
            if r.method == method and r.url.path == "/api/v1" + path
        ]


def problem(status: int, title: str, detail: str) -> httpx.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json"})


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture(autouse=True)
def private_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No saved session or token from the machine leaks into these tests."""
    monkeypatch.setenv("AUTOGEN_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("AUTOGEN_TOKEN", raising=False)
    monkeypatch.delenv("AUTOGEN_API_BASE_URL", raising=False)
    return tmp_path / "config"


def run(
    api: FakeApi,
    *args: str,
    token: str | None = "tok",  # noqa: S107
    stdin: str | None = None,
) -> Result:
    prefix = ["--token", token] if token else []
    return CliRunner().invoke(
        app, [*prefix, *args], obj=httpx.MockTransport(api), input=stdin, catch_exceptions=False
    )


def test_devices_search_prints_a_table_with_names_as_plain_text(api: FakeApi) -> None:
    api.on("GET /devices", {"items": [DEVICE], "next_cursor": None})
    result = run(api, "devices", "search", "north", "--connection", "live", "-m", "X Pro")
    assert result.exit_code == 0, result.stderr
    assert "AG10000" in result.stdout
    assert "[bold]North[/bold] Pump" in result.stdout  # a name is never read as markup
    assert "2026-11-25 22:18:08Z" in result.stdout
    params = api.requests[0].url.params
    assert (params["q"], params["connection"], params["model"]) == ("north", "live", "X Pro")


def test_devices_list_json_is_exactly_the_api_items_and_more_is_noted(api: FakeApi) -> None:
    api.on("GET /devices", {"items": [DEVICE, {**DEVICE, "id": "AG2"}], "next_cursor": "c"})
    result = run(api, "devices", "list", "--limit", "2", "-o", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == [DEVICE, {**DEVICE, "id": "AG2"}]
    assert "2 devices shown; more match" in result.stderr


def test_device_show_and_a_404_problem_shown_without_traceback(api: FakeApi) -> None:
    api.on("GET /devices/AG10000", DEVICE)
    shown = run(api, "devices", "show", "AG10000")
    assert shown.exit_code == 0
    assert "30.1, -97.8" in shown.stdout
    missing = run(api, "devices", "show", "NOPE")
    assert missing.exit_code == 1
    assert "Error: Not found (HTTP 404)" in missing.stderr
    assert "no route GET /devices/NOPE" in missing.stderr
    assert "Traceback" not in missing.stderr + missing.stdout


def test_connection_refused_is_a_clear_message_and_exit_3(api: FakeApi) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    result = CliRunner().invoke(
        app, ["--token", "t", "releases", "list"], obj=httpx.MockTransport(refuse)
    )
    assert result.exit_code == 3
    assert "Cannot connect to the API at http://127.0.0.1:8080/api/v1" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_no_token_at_all_is_a_usage_error(api: FakeApi) -> None:
    result = run(api, "devices", "list", token=None)
    assert result.exit_code == 2
    assert "autogen login" in result.stderr
    assert not api.requests


def test_a_bad_base_url_is_a_usage_error(api: FakeApi) -> None:
    result = run(api, "--base-url", "127.0.0.1:8080", "devices", "list")
    assert result.exit_code == 2
    assert "http://" in result.stderr


def command(status: str, detail: str | None = None) -> dict[str, Any]:
    return {"id": "cmd-1", "device_id": "AG10000", "action": "set_setting", "status": status,
            "params": {"key": "telemetry_interval_s", "value": 60}, "detail": detail}  # fmt: skip


def test_send_with_wait_follows_to_success_and_types_params(api: FakeApi) -> None:
    api.on("POST /devices/AG10000/commands", command("queued"), status=202)
    api.on("GET /commands/cmd-1", command("sent"), command("acked"), command("succeeded", "ok"))
    result = run(
        api, "commands", "send", "AG10000", "set_setting", "-p", "key=telemetry_interval_s",
        "-p", "value=60", "--wait", "--interval", "0.2", "-o", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "succeeded"
    # Each status check asks the API to answer when the command ends.
    gets = [r for r in api.requests if r.method == "GET"]
    assert len(gets) == 3
    assert all(r.headers["Prefer"] == "wait=1" for r in gets)
    sent = api.bodies("POST /devices/AG10000/commands")
    assert sent == [
        {"action": "set_setting", "params": {"key": "telemetry_interval_s", "value": 60}}
    ]


@pytest.mark.parametrize(("final", "code"), [("failed", 4), ("expired", 4)])
def test_send_with_wait_exits_4_when_the_command_ends_badly(
    api: FakeApi, final: str, code: int
) -> None:
    api.on("POST /devices/AG10000/commands", command("queued"), status=202)
    api.on("GET /commands/cmd-1", command(final, "engine running"))
    result = run(api, "commands", "send", "AG10000", "reboot", "--wait", "--interval", "0.2")
    assert result.exit_code == code
    assert f"the command {final}: engine running" in result.stderr


def test_send_with_wait_exits_5_at_the_timeout(api: FakeApi) -> None:
    api.on("POST /devices/AG10000/commands", command("queued"), status=202)
    api.on("GET /commands/cmd-1", command("sent"))
    result = run(
        api, "commands", "send", "AG10000", "reboot", "--wait", "-t", "1", "--interval", "0.2"
    )
    assert result.exit_code == 5
    assert "autogen commands wait cmd-1" in result.stderr


def test_a_param_without_equals_sign_is_refused_before_any_call(api: FakeApi) -> None:
    result = run(api, "commands", "send", "AG10000", "set_setting", "-p", "oops")
    assert result.exit_code == 2
    assert not api.requests


def rollout(status: str, **counts: int) -> dict[str, Any]:
    base = {"pending": 0, "sent": 0, "updating": 0, "awaiting_return": 0, "confirmed": 0,
            "failed": 0, "cancelled": 0}  # fmt: skip
    return {
        "id": "ro-1",
        "release": {"id": "rel-1", "console": "ultra", "version": "5.2.0"},
        "scope": "my_fleet",
        "status": status,
        "status_reason": None,
        "counts": base | counts,
    }


def test_deploy_sends_target_and_strategy_and_follows_to_completion(api: FakeApi) -> None:
    api.on("POST /rollouts", rollout("running", pending=2), status=201)
    api.on(
        "GET /rollouts/ro-1",
        rollout("running", pending=1, updating=1),
        rollout("paused", confirmed=1, pending=1),
        rollout("completed", confirmed=2),
    )
    result = run(
        api, "rollouts", "deploy", "rel-1", "-m", "Ultra", "--transport", "wifi", "-d", "AG1",
        "-d", "AG2", "--batch-size", "1", "--dealer", "d-1", "--override", "lab test",
        "--interval", "0.2",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert api.bodies("POST /rollouts") == [
        {
            "release_id": "rel-1",
            "scope": "my_fleet",
            "target": {"models": ["Ultra"], "device_ids": ["AG1", "AG2"], "transport": "wifi"},
            "strategy": {"batch_size": 1},
            "dealer_id": "d-1",
            "override": True,
            "override_reason": "lab test",
        }
    ]
    assert "ro-1: paused" in result.stderr  # every state change is told, not only the last
    assert "Rollout completed" in result.stderr
    assert "2/2 finished · 2 confirmed" in result.stdout


@pytest.mark.parametrize(
    ("final", "code", "message"),
    [
        (rollout("completed", confirmed=1, failed=1), 4, "completed with 1 failed"),
        (rollout("cleared", confirmed=1, cancelled=3), 4, "Rollout cleared"),
    ],
)
def test_follow_exits_4_unless_every_device_was_confirmed(
    api: FakeApi, final: dict[str, Any], code: int, message: str
) -> None:
    api.on("GET /rollouts/ro-1", final)
    result = run(api, "rollouts", "follow", "ro-1", "-o", "json")
    assert result.exit_code == code
    assert message in result.stderr
    assert json.loads(result.stdout)["status"] == final["status"]


def test_follow_can_stop_on_pause_or_at_its_timeout(api: FakeApi) -> None:
    api.on("GET /rollouts/ro-1", rollout("paused", pending=3))
    paused = run(api, "rollouts", "follow", "ro-1", "--stop-on-pause")
    assert paused.exit_code == 4
    timed_out = run(api, "rollouts", "follow", "ro-1", "-t", "0.5", "--interval", "0.2")
    assert timed_out.exit_code == 5
    assert "autogen rollouts follow ro-1" in timed_out.stderr


@pytest.mark.parametrize("action", ["pause", "resume", "clear"])
def test_rollout_actions_post_and_report_the_new_state(api: FakeApi, action: str) -> None:
    api.on(f"POST /rollouts/ro-1/{action}", rollout("paused"))
    result = run(api, "rollouts", action, "ro-1", "-o", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["status"] == "paused"


def test_a_conflict_shows_the_api_title_and_detail(api: FakeApi) -> None:
    api.on("POST /rollouts/ro-1/resume", problem(409, "Conflict", "the rollout is cleared"))
    result = run(api, "rollouts", "resume", "ro-1")
    assert result.exit_code == 1
    assert "Error: Conflict (HTTP 409)" in result.stderr
    assert "the rollout is cleared" in result.stderr


def test_token_create_defaults_to_the_caller_and_prints_the_secret_once(api: FakeApi) -> None:
    api.on("GET /me", {"user_id": "u-1", "role": "dealer"})
    api.on("POST /tokens", {"id": "t-1", "token": "agk_secret", "name": "erp", "user_id": "u-1",
                            "access": "read", "device_ids": ["AG1"]}, status=201)  # fmt: skip
    result = run(api, "tokens", "create", "--name", "erp", "-d", "AG1")
    assert result.exit_code == 0, result.stderr
    assert api.bodies("POST /tokens") == [
        {"name": "erp", "user_id": "u-1", "access": "read", "device_ids": ["AG1"],
         "expires_in_days": 90}
    ]  # fmt: skip
    assert result.stdout.count("agk_secret") == 1
    assert "cannot be shown again" in result.stderr


def test_token_revoke_deletes(api: FakeApi) -> None:
    api.on("DELETE /tokens/t-1", httpx.Response(204))
    result = run(api, "tokens", "revoke", "t-1")
    assert result.exit_code == 0
    assert "Token t-1 revoked" in result.stderr


def test_login_saves_a_private_session_that_later_calls_use(
    api: FakeApi, private_config: Path
) -> None:
    api.on(
        "POST /auth/login", {"access_token": "sess-1", "token_type": "bearer", "expires_in": 600}
    )
    api.on("GET /me", {"user_id": "u-1", "email": "a@example.com", "role": "admin"})
    login = run(api, "login", "-e", "a@example.com", token=None, stdin="pw\n")
    assert login.exit_code == 0, login.stderr
    assert api.bodies("POST /auth/login") == [{"email": "a@example.com", "password": "pw"}]
    saved = private_config / "session.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert run(api, "whoami", token=None).exit_code == 0
    assert api.requests[-1].headers["authorization"] == "Bearer sess-1"
    assert run(api, "logout", token=None).exit_code == 0
    assert run(api, "whoami", token=None).exit_code == 2


def test_bad_credentials_are_an_api_error(api: FakeApi) -> None:
    api.on("POST /auth/login", problem(401, "Unauthorized", "wrong email or password"))
    result = run(api, "login", "-e", "a@example.com", "--password", "x", token=None)
    assert result.exit_code == 1
    assert "wrong email or password" in result.stderr


def all_commands() -> list[list[str]]:
    root = typer.main.get_command(app)
    found: list[list[str]] = [[]]
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        found.append([name])
        found.extend([name, sub] for sub in getattr(cmd, "commands", {}))
    return found


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p) or "autogen")
def test_every_command_documents_itself(path: list[str]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0
    assert "Usage: autogen" in result.stdout
    assert len(result.stdout.splitlines()) > 4


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["rollouts", "follow", "ro-1"], "the rollout goes on: autogen rollouts follow ro-1"),
        (["commands", "wait", "cmd-1"], "the command goes on: autogen commands wait cmd-1"),
    ],
)
def test_ctrl_c_while_waiting_stops_waiting_only(api: FakeApi, args: list[str], says: str) -> None:
    def interrupt(_: httpx.Request) -> httpx.Response:
        raise KeyboardInterrupt

    api.routes["GET /rollouts/ro-1"] = interrupt
    api.routes["GET /commands/cmd-1"] = interrupt
    result = run(api, *args)
    assert result.exit_code == 130
    assert says in result.stderr
