"""The console's pages against an in-memory API: sessions, CSRF, scope of what is shown."""

from typing import Any

import httpx

from console.session import SESSION_COOKIE


async def test_pages_need_a_session(console: httpx.AsyncClient) -> None:
    response = await console.get("/fleet?q=alice")
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Ffleet%3Fq%3Dalice"


async def test_login_keeps_the_token_in_a_strict_httponly_cookie(
    console: httpx.AsyncClient, sign_in_as: Any
) -> None:
    response = await sign_in_as(console, "dealer@one.example")
    assert response.status_code == 303
    assert response.headers["location"] == "/fleet"
    cookie = next(
        h for h in response.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE)
    )
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Secure" not in cookie  # plain http here


async def test_login_over_https_sets_a_secure_cookie(fake_api: Any, sign_in_as: Any) -> None:
    from console.app import create_app
    from console.settings import ConsoleSettings

    app = create_app(
        ConsoleSettings(api_base_url="http://api.test/api/v1"),
        transport=httpx.MockTransport(fake_api.handle),
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://console.test") as c:
            response = await sign_in_as(c, "dealer@one.example")
    cookie = next(
        h for h in response.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE)
    )
    assert "Secure" in cookie


async def test_wrong_password_says_so(console: httpx.AsyncClient, csrf_from: Any) -> None:
    page = await console.get("/login")
    response = await console.post(
        "/login",
        data={"csrf": csrf_from(page.text), "email": "dealer@one.example", "password": "nope"},
    )
    assert response.status_code == 401
    assert "Wrong email or password." in response.text
    assert SESSION_COOKIE not in response.cookies


async def test_login_without_the_form_token_is_refused(
    console: httpx.AsyncClient, fake_api: Any
) -> None:
    response = await console.post(
        "/login", data={"csrf": "forged", "email": "dealer@one.example", "password": "x"}
    )
    assert response.status_code == 400
    assert ("POST", "auth/login") not in fake_api.calls


async def test_login_never_redirects_off_site(console: httpx.AsyncClient, csrf_from: Any) -> None:
    page = await console.get("/login?next=//evil.example/x")
    assert 'value="/fleet"' in page.text
    from console.auth_pages import safe_next

    for target in ("https://evil.example/", "//evil.example", "/\\evil.example", "fleet"):
        assert safe_next(target) == "/fleet"
    assert safe_next("/devices/GEN-1?command=c1") == "/devices/GEN-1?command=c1"


async def test_every_page_shows_the_account_and_role(
    console: httpx.AsyncClient, sign_in_as: Any
) -> None:
    await sign_in_as(console, "dealer@one.example")
    for path in ("/fleet", "/map", "/firmware/unified", "/tokens", "/devices/GEN-001"):
        page = await console.get(path)
        assert page.status_code == 200, path
        assert 'data-testid="account-email">dealer@one.example<' in page.text, path
        assert 'data-testid="account-role">dealer<' in page.text, path


async def test_fleet_console_lists_and_searches(
    console: httpx.AsyncClient, sign_in_as: Any
) -> None:
    await sign_in_as(console, "dealer@one.example")
    page = await console.get("/fleet")
    assert 'data-device-id="GEN-001"' in page.text
    assert 'data-device-id="GEN-002"' in page.text
    rows = await console.get("/fleet/rows?q=quarry", headers={"HX-Request": "true"})
    assert 'data-device-id="GEN-002"' in rows.text
    assert 'data-device-id="GEN-001"' not in rows.text
    assert "<html" not in rows.text  # a fragment, not a page
    empty = await console.get("/fleet/rows?q=nobody")
    assert "No device matches this search." in empty.text


async def test_admin_sections_are_absent_for_dealers(
    console: httpx.AsyncClient, sign_in_as: Any
) -> None:
    await sign_in_as(console, "dealer@one.example")
    page = await console.get("/fleet")
    assert 'href="/dealers"' not in page.text
    assert (await console.get("/dealers")).status_code == 404


async def test_admins_see_the_dealers_section(console: httpx.AsyncClient, sign_in_as: Any) -> None:
    await sign_in_as(console, "admin@autogen.example")
    page = await console.get("/fleet")
    assert 'href="/dealers"' in page.text
    assert (await console.get("/dealers")).status_code == 200


async def test_posts_without_the_session_csrf_token_are_refused(
    console: httpx.AsyncClient, sign_in_as: Any, fake_api: Any
) -> None:
    await sign_in_as(console, "dealer@one.example")
    response = await console.post(
        "/devices/GEN-001/commands", data={"action": "start", "csrf": "guess"}
    )
    assert response.status_code == 403
    assert not fake_api.commands


async def test_start_sends_one_command_and_shows_its_status(
    console: httpx.AsyncClient, sign_in_as: Any, csrf_from: Any, fake_api: Any
) -> None:
    await sign_in_as(console, "dealer@one.example")
    page = await console.get("/devices/GEN-001")
    form = {"csrf": csrf_from(page.text), "action": "start", "idempotency_key": "k1"}
    first = await console.post("/devices/GEN-001/commands", data=form)
    assert first.status_code == 303
    assert first.headers["location"].startswith("/devices/GEN-001?command=cmd-1")
    assert fake_api.commands[0]["action"] == "start"
    assert fake_api.commands[0]["idempotency_key"] == "k1:start:"
    status = await console.get("/commands/cmd-1/status")
    assert 'data-testid="command-status">queued<' in status.text
    assert 'hx-trigger="every 1s"' in status.text  # still polling: not finished
    fake_api.commands[0]["status"] = "succeeded"
    done = await console.get("/commands/cmd-1/status")
    assert "hx-trigger" not in done.text  # finished: polling stops


async def test_reboot_asks_for_confirmation_first(
    console: httpx.AsyncClient, sign_in_as: Any, csrf_from: Any, fake_api: Any
) -> None:
    await sign_in_as(console, "dealer@one.example")
    csrf = csrf_from((await console.get("/devices/GEN-001")).text)
    ask = await console.post("/devices/GEN-001/commands", data={"csrf": csrf, "action": "reboot"})
    assert ask.status_code == 200
    assert "Confirm Reboot" in ask.text
    assert not fake_api.commands
    confirmed = await console.post(
        "/devices/GEN-001/commands",
        data={"csrf": csrf, "action": "reboot", "confirmed": "yes", "idempotency_key": "k"},
    )
    assert confirmed.status_code == 303
    assert [c["action"] for c in fake_api.commands] == ["reboot"]


async def test_api_refusal_detail_is_shown(
    console: httpx.AsyncClient, sign_in_as: Any, csrf_from: Any
) -> None:
    await sign_in_as(console, "reader@one.example")
    csrf = csrf_from((await console.get("/devices/GEN-001")).text)
    sent = await console.post(
        "/devices/GEN-001/commands", data={"csrf": csrf, "action": "stop"},
        follow_redirects=True,
    )  # fmt: skip
    assert "a read-only token cannot send commands" in sent.text
    missing = await console.get("/devices/GEN-999")
    assert missing.status_code == 404
    assert "no device GEN-999 in your scope" in missing.text


async def test_an_expired_session_goes_back_to_login(
    console: httpx.AsyncClient, sign_in_as: Any, fake_api: Any
) -> None:
    await sign_in_as(console, "dealer@one.example")
    fake_api.expired.add("tok-dealer")
    page = await console.get("/devices/GEN-001")
    assert page.status_code == 303
    assert page.headers["location"].startswith("/login?next=")
    polled = await console.get("/fleet/rows", headers={"HX-Request": "true"})
    assert polled.headers["HX-Redirect"] == "/login"


async def test_token_access_must_be_chosen(
    console: httpx.AsyncClient, sign_in_as: Any, csrf_from: Any, fake_api: Any
) -> None:
    await sign_in_as(console, "dealer@one.example")
    page = await console.get("/tokens")
    assert 'value="read" required>' in page.text  # no radio pre-checked
    assert "checked" not in page.text.split('name="access"')[1].split(">")[0]
    csrf = csrf_from(page.text)
    refused = await console.post(
        "/tokens",
        data={"csrf": csrf, "name": "dash", "user_id": "u-cust", "expires_in_days": "30"},
    )
    assert refused.status_code == 422
    assert "Decide deliberately" in refused.text
    assert not fake_api.tokens_created


async def test_new_token_secret_is_shown_once(
    console: httpx.AsyncClient, sign_in_as: Any, csrf_from: Any, fake_api: Any
) -> None:
    await sign_in_as(console, "dealer@one.example")
    csrf = csrf_from((await console.get("/tokens")).text)
    created = await console.post(
        "/tokens",
        data={"csrf": csrf, "name": "dash", "user_id": "u-cust", "access": "read",
              "device_ids": "GEN-001, GEN-002", "expires_in_days": "30"},
    )  # fmt: skip
    # Post/Redirect/Get: a reload of the page never re-creates the token.
    assert created.status_code == 303
    assert created.headers["location"] == "/tokens"
    shown = await console.get("/tokens")
    assert "agk_secret_shown_once" in shown.text
    assert "shown only once" in shown.text
    assert shown.headers["Cache-Control"] == "no-store"
    assert fake_api.tokens_created == [{
        "name": "dash", "user_id": "u-cust", "access": "read",
        "device_ids": ["GEN-001", "GEN-002"], "expires_in_days": 30,
    }]  # fmt: skip
    again = await console.get("/tokens")
    assert "agk_secret_shown_once" not in again.text


async def test_unified_console_asks_for_the_variant_first(
    console: httpx.AsyncClient, sign_in_as: Any, fake_api: Any
) -> None:
    await sign_in_as(console, "dealer@one.example")
    page = await console.get("/firmware/unified")
    assert "Choose the engine and transport variant" in page.text
    assert ("GET", "firmware/releases") not in fake_api.calls
    chosen = await console.get("/firmware/unified?engine=diesel&transport=gsm")
    assert "No Unified release for this variant yet." in chosen.text
    assert ("GET", "firmware/releases") in fake_api.calls
    ultra = await console.get("/firmware/ultra?engine=diesel")
    assert "Choose the transport variant" in ultra.text
    assert (await console.get("/firmware/nonsense")).status_code == 404


async def test_dealers_cannot_ask_for_a_global_rollout(
    console: httpx.AsyncClient, sign_in_as: Any, csrf_from: Any, fake_api: Any
) -> None:
    await sign_in_as(console, "dealer@one.example")
    csrf = csrf_from((await console.get("/firmware/xpro")).text)
    response = await console.post(
        "/firmware/releases/r1/deploy",
        data={"csrf": csrf, "scope": "global", "back": "/firmware/xpro"},
        follow_redirects=True,
    )
    assert "Dealers deploy to my_fleet only." in response.text
    assert ("POST", "rollouts") not in fake_api.calls


async def test_logout_clears_the_session(
    console: httpx.AsyncClient, sign_in_as: Any, csrf_from: Any
) -> None:
    await sign_in_as(console, "dealer@one.example")
    csrf = csrf_from((await console.get("/fleet")).text)
    response = await console.post("/logout", data={"csrf": csrf})
    assert response.status_code == 303
    assert (await console.get("/fleet")).status_code == 303


async def test_static_assets_are_vendored(console: httpx.AsyncClient) -> None:
    for path in ("/static/vendor/htmx/htmx.min.js", "/static/vendor/leaflet/leaflet.js",
                 "/static/vendor/leaflet/leaflet.css", "/static/map.js"):  # fmt: skip
        assert (await console.get(path)).status_code == 200, path
