"""Kafka, Mosquitto, PostgreSQL and Redis restart, and each service is SIGKILLed or SIGTERMed,
in the middle of a rollout and a command burst: nothing accepted is lost, runs twice or stays
stuck; readiness shows the outage; requests that need the missing server get 503 + Retry-After.
"""

import signal
import time
from pathlib import Path

import httpx
import pytest
from faults_harness import COMMANDS, COMPONENTS, SERVICES, Platform, wait_for
from faults_load import Counts, Load, report

# The readiness check that names each server in a service's /readyz document.
CHECK_OF = {"kafka": "kafka", "postgres": "database", "redis": "redis", "mosquitto": "mqtt"}
GRACE_S = 20.0  # the k8s/compose grace period: SIGTERM to exit
LATE_SHARE = 0.05
HOLD_S = {"kafka": 40.0}  # how long a server stays away (default 5 s)


def assert_clean(counts: Counts) -> None:
    """The verdict every load case shares."""
    assert counts.lost == 0, counts.line()
    assert counts.duplicated == 0, counts.line()
    assert counts.stuck == 0, counts.line()
    assert counts.errors_5xx == 0, counts.line()
    assert counts.failed_without_reason == 0, counts.line()
    assert counts.refused == 0, counts.line()
    assert counts.accepted > 0, counts.line()
    # Late: expired commands and devices that never started (see `Counts.late`).
    assert counts.late <= LATE_SHARE * (counts.accepted + counts.confirmed + counts.failed), (
        counts.line()
    )


def probe_outage_request(platform: Platform) -> httpx.Response | None:
    """A read that needs the database and the tokens service; None when it did not answer."""
    try:
        return httpx.get(
            f"{platform.api}/devices",
            params={"limit": 1},
            headers=platform.dealer_headers,
            timeout=15,
        )
    except httpx.TimeoutException:
        return None


@pytest.mark.parametrize("component", COMPONENTS)
def test_server_restart_during_load(platform: Platform, component: str, results: Path) -> None:
    """Stop one server mid-load, watch readiness and HTTP answers, start it again, count."""
    stack = platform.stack
    platform.relogin()
    check = CHECK_OF[component]
    needing = [s for s in stack.services.values() if check in s.readiness()["checks"]]
    assert needing, f"no service declares a {check} readiness check"
    load = Load(platform, f"restart {component}", COMMANDS)
    load.start_rollout()
    load.send_commands(COMMANDS // 2)

    stack.stop_component(component)
    outage_started = time.monotonic()
    not_ready: set[str] = set()
    healthz_bad: list[str] = []
    answers: list[httpx.Response | None] = []

    def all_report_outage() -> bool:
        for svc in needing:
            if svc.probe("/readyz") == 503:
                not_ready.add(svc.name)
        for svc in stack.services.values():
            if svc.probe("/healthz") != 200:
                healthz_bad.append(svc.name)
        answers.append(probe_outage_request(platform))
        return not_ready == {s.name for s in needing}

    wait_for(f"readiness 503 while {component} is down", all_report_outage, timeout=45)
    load.send_commands(COMMANDS - COMMANDS // 2)  # sent during the outage, retried on 503
    # Keep the server away a little longer, so requests and consumers meet the outage. Kafka
    # stays away past the producers' request timeout (30 s): batches then expire in the
    # producers, the case that once left aiokafka's idempotent producers failing for good.
    hold_s = HOLD_S.get(component, 5.0)
    wait_for("outage observed", lambda: time.monotonic() - outage_started > hold_s, timeout=60)
    answers.append(probe_outage_request(platform))
    stack.start_component(component)
    for svc in stack.services.values():
        svc.wait_ready(timeout=120)

    counts = load.settle()
    hung = sum(1 for a in answers if a is None)
    bad = [a for a in answers if a is not None and a.status_code >= 500 and not _is_503(a)]
    counts.errors_5xx += len(bad)
    counts.notes.append(
        f"readyz 503 seen on {sorted(not_ready)}; outage answers "
        f"{sorted({a.status_code for a in answers if a is not None})}, hung {hung}"
    )
    report(counts, results)
    assert not healthz_bad, f"/healthz failed during the {component} outage: {healthz_bad}"
    assert hung == 0, "a request hung during the outage"
    assert not bad, [(a.status_code, a.headers.get("content-type"), a.text[:200]) for a in bad]
    if component == "postgres":
        assert any(a is not None and _is_503(a) for a in answers), "no 503 while PG was down"
    assert_clean(counts)


def _is_503(response: httpx.Response) -> bool:
    """503 problem+json with Retry-After (the platform's answer to a missing dependency)."""
    return (
        response.status_code == 503
        and response.headers.get("content-type", "").startswith("application/problem+json")
        and "retry-after" in response.headers
    )


def test_sigkill_each_service_during_load(platform: Platform, results: Path) -> None:
    """SIGKILL each service in turn mid-load, start it again: the same outcome as without the
    crashes (one load for all six: a separate rollout per service costs minutes each here)."""
    platform.relogin()
    load = Load(platform, "sigkill each service", COMMANDS)
    load.start_rollout()
    load.send_commands(COMMANDS // 2)
    for name in SERVICES:
        svc = platform.stack.services[name]
        svc.signal(signal.SIGKILL)
        assert svc.wait_exit(timeout=10) == -signal.SIGKILL
        svc.stop()  # closes the log handle
        if name == "commands":
            load.send_commands(COMMANDS - COMMANDS // 2)  # queued while commands is dead
        svc.start()
        svc.wait_ready(timeout=120)
    counts = load.settle()
    report(counts, results)
    assert_clean(counts)


def test_sigterm_each_service_during_load(platform: Platform, results: Path) -> None:
    """SIGTERM each service in turn mid-load: it exits cleanly within the grace period, and
    after its restart nothing it had in hand is lost or run twice."""
    platform.relogin()
    load = Load(platform, "sigterm each service", COMMANDS)
    load.start_rollout()
    load.send_commands(COMMANDS // 2)
    exits: dict[str, tuple[int, float, bool]] = {}
    for name in SERVICES:
        svc = platform.stack.services[name]
        log_from = svc.log_path.stat().st_size
        started = time.monotonic()
        svc.signal(signal.SIGTERM)
        try:
            code = svc.wait_exit(timeout=GRACE_S + 10)
        except Exception:  # noqa: BLE001 - a hung service is the finding; kill it and go on
            svc.signal(signal.SIGKILL)
            code = svc.wait_exit(timeout=10)
        took = round(time.monotonic() - started, 1)
        svc.stop()  # closes the log handle
        with svc.log_path.open("rb") as log:
            log.seek(log_from)
            graceful = b"Application shutdown complete" in log.read()
        exits[name] = (code, took, graceful)
        svc.start()
        svc.wait_ready(timeout=120)
        if name == "commands":
            load.send_commands(COMMANDS - COMMANDS // 2)
    counts = load.settle()
    counts.notes.append(f"exits (code, s, shutdown complete): {exits}")
    report(counts, results)
    # Uvicorn re-raises the SIGTERM it caught once its shutdown is complete, so the exit code of
    # a clean stop is -SIGTERM (or 0); "clean" is the lifespan shutdown in the log, in time.
    slow = {
        n: e
        for n, e in exits.items()
        if e[1] > GRACE_S or e[0] not in (0, -signal.SIGTERM) or not e[2]
    }
    assert not slow, f"not a clean exit within {GRACE_S}s: {slow}"
    assert_clean(counts)
