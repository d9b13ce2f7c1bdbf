"""The fault suite's private platform: its own stack, services, devices, simulator, observer.

Everything here runs on its own ports and directory (`.local/faults/`), so stopping Kafka or
killing a service never touches the shared stack other people and tests use. The session
fixture stops all of it at the end, whatever happened, and starts it from empty data every time
(as on a fresh clone: the last run's rollouts and devices are not part of the next).
`FAULTS_KEEP_SERVERS=1` leaves the private servers running, and a next run reuses them and
their data, for a faster next run while iterating (services always stop).
`FAULTS_SERVICE_ENV="NAME=value ..."` gives the services settings of your own (the rest of the
environment's service settings are stripped), e.g. `COMMANDS_OUTBOX_EAGER=false` to compare.

Scale: `FAULTS_DEVICES` simulated devices in each rollout (default 200, the issue's figure) and
`FAULTS_COMMANDS` commands per burst (default 500, likewise); lower them to iterate.
`FAULTS_CASE_TIMEOUT_S` bounds each case (default 900 s: the first one also starts the private
platform). Measured at the defaults on the 2-core machine with the shared stack and its demo
fleet running (load average 6-9; session 4): restart of Kafka 93-102 s (it stays away 40 s),
PostgreSQL 78 s, Redis 84 s, Mosquitto 122 s; SIGKILL of each service in turn 117 s, SIGTERM
likewise 116 s; the six infrastructure cases 11-17 min. Each case's summary line also says how
busy the machine was and what CPU each process used, for reading a failure from CI's output.
SIGTERM unwinds into the teardown, so the private stack stops even when the run is cancelled.
"""

import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from faults_harness import (
    DEVICES,
    ROOT,
    TIME_FACTOR,
    Platform,
    PrivateStack,
    wait_for,
)

CASE_TIMEOUT_S = int(os.environ.get("FAULTS_CASE_TIMEOUT_S", "900"))
# Imported when the session collects: results older than this belong to an earlier run.
_SESSION_STARTED = time.time()


def pytest_configure(config: pytest.Config) -> None:
    """Register the `faults` marker (select the suite with `-m faults`)."""
    config.addinivalue_line("markers", "faults: the fault suite on a private stack")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/faults is part of the fault suite, with a bound of its own.

    The project-wide 300 s timeout counts fixture setup, and the first case also starts the
    private platform (servers, migrations, six services, the simulated fleet).
    """
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.faults)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(CASE_TIMEOUT_S))


def _register_devices(
    stack: PrivateStack, headers: dict[str, str], dealer: dict[str, Any]
) -> list[dict[str, Any]]:
    """`DEVICES` Ultra WiFi units in the dealer's fleet, registered through the public API."""
    devices = []
    customer = dealer["customers"][0]["email"]
    run = uuid.uuid4().hex[:6]
    with httpx.Client(base_url=stack.api, headers=headers, timeout=30) as client:
        for n in range(DEVICES):
            body = {
                "id": f"FLT{run}{n:04d}".upper(),
                "name": f"fault unit {n}",
                "model": "Ultra",
                "engine": None,
                "transport": "wifi",
                "gps": False,
                "dealer_id": dealer["id"],
                "customer_email": customer,
                "firmware_version": "1.0.0",
            }
            response = client.post("/devices", json=body)
            assert response.status_code == 201, response.text
            devices.append(
                {
                    **{k: body[k] for k in ("id", "name", "model", "engine", "transport", "gps")},
                    "lat": 50.0 + n / 1000,
                    "lon": 14.0 + n / 1000,
                    "password": response.json()["mqtt_password"],
                    "firmware_version": "1.0.0",
                }
            )
    return devices


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (a CI job cancelled, `timeout`) unwinds like Ctrl-C, so the finally runs."""
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def platform() -> Iterator[Platform]:
    """Start the private stack, services, devices and simulator; stop them all at the end."""
    stack = PrivateStack(ROOT / ".local" / "faults")
    keep = os.environ.get("FAULTS_KEEP_SERVERS") == "1"
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        if not keep:
            # From scratch, as on a fresh clone (FAULTS_KEEP_SERVERS=1 reuses them, data too).
            stack.reset()
        stack.start_servers()
        stack.start_services()
        demo = stack.local_dir / "demo"
        demo.mkdir(exist_ok=True)
        stack.run_module("tokens", "seed", "--out", str(demo / "accounts.json"))
        accounts = json.loads((demo / "accounts.json").read_text())
        dealer = accounts["dealers"][0]
        platform = Platform(
            stack=stack,
            accounts=accounts,
            dealer_id=dealer["id"],
            dealer_headers={},
            admin_headers={},
            devices=[],
            acks_file=stack.log_dir / f"acks-{uuid.uuid4().hex[:6]}.jsonl",
        )
        platform.relogin()
        platform.devices = _register_devices(stack, platform.dealer_headers, dealer)
        devices_file = demo / "devices.json"
        devices_file.write_text(
            json.dumps({"mqtt": {"host": "127.0.0.1", "port": 0}, "devices": platform.devices})
        )
        stack.create_observer_account()
        stack.start_observer(platform.acks_file)
        stack.start_simulator(devices_file, TIME_FACTOR)
        ids = {d["id"] for d in platform.devices}

        def all_live() -> bool:
            response = httpx.get(
                f"{stack.api}/devices",
                params={"connection": "live", "limit": 500, "q": "FLT"},
                headers=platform.dealer_headers,
                timeout=10,
            )
            live = {d["id"] for d in response.json()["items"]}
            return ids <= live

        wait_for("every simulated device live", all_live, timeout=120, interval=1.0)
        yield platform
    finally:
        if keep:
            for proc in (stack.simulator, stack.observer):
                if proc is not None:
                    proc.terminate()
            for svc in stack.services.values():
                svc.stop()
        else:
            stack.stop_all()
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def results(platform: Platform) -> Path:
    """Where each case appends its counts (the suite summary reads it); empty at the start."""
    path = Path(platform.stack.log_dir) / "results.jsonl"
    path.write_text("")
    return path


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault suite's counts, one line per case, at the end of the run."""
    results = ROOT / ".local" / "faults" / "logs" / "results.jsonl"
    if not results.exists() or not results.read_text().strip():
        return
    if results.stat().st_mtime < _SESSION_STARTED:
        return  # an earlier run's counts; this run recorded none
    terminalreporter.section("fault suite counts")
    for line in results.read_text().splitlines():
        record = json.loads(line)
        if record["case"] == "schema fuzz":
            terminalreporter.write_line(
                f"schema fuzz: 5xx={record['errors_5xx']} "
                f"schema_mismatches={record['mismatches']} requests={record['requests']}"
            )
            continue
        terminalreporter.write_line(
            f"{record['case']}: lost={record['lost']} duplicated={record['duplicated']} "
            f"stuck={record['stuck']} 5xx={record['errors_5xx']} late={record.get('late', 0)} "
            f"(accepted {record['accepted']}, rollout confirmed {record['confirmed']} "
            f"failed {record['failed']}, 503 retried {record['unavailable']}, "
            f"{record.get('elapsed_s', 0):.0f}s)"
        )
        for note in record.get("notes", []):
            if note.startswith(("machine:", "failed e.g.")) or any(
                word in note for word in ("expired", "twice", "again", "yet run")
            ):
                terminalreporter.write_line(f"    {note}")
