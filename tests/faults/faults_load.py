"""The load every fault case runs: a firmware rollout over the simulated devices plus a burst of
commands, then the counts that say whether anything was lost, duplicated or stuck."""

import collections
import concurrent.futures
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from faults_harness import cpu_snapshot, machine_note, read_jsonl, wait_for

FINAL_COMMAND = {"succeeded", "failed", "expired", "rejected"}
FINAL_DEVICE = {"confirmed", "failed"}
# Worth a retry with the same Idempotency-Key: the platform said "not now" (503 with
# Retry-After, or nginx's 502/504 while a service restarts).
RETRYABLE = {502, 503, 504}
SHA = "a" * 64


@dataclass
class Counts:
    """What one fault case found."""

    case: str
    accepted: int = 0
    lost: int = 0
    duplicated: int = 0
    stuck: int = 0
    errors_5xx: int = 0
    unavailable: int = 0
    confirmed: int = 0
    failed: int = 0
    failed_without_reason: int = 0
    refused: int = 0  # commands answered 4xx other than 409 (a conflict with device state)
    # Commands that expired and rollout devices that never started their update: the outages
    # here last seconds against TTLs and deadlines of minutes, so these mean the platform did
    # not deliver in time (a few may age out on a loaded machine; most may not).
    late: int = 0
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The summary line the case prints."""
        return (
            f"FAULTS {self.case}: lost={self.lost} duplicated={self.duplicated} "
            f"stuck={self.stuck} 5xx={self.errors_5xx} | accepted={self.accepted} "
            f"rollout confirmed={self.confirmed} failed={self.failed} "
            f"retried_503={self.unavailable} refused={self.refused} late={self.late} "
            f"took={self.elapsed_s:.0f}s"
            + (f" | {'; '.join(self._grouped_notes())}" if self.notes else "")
        )

    def _grouped_notes(self) -> list[str]:
        """Each distinct note once, with how often it came (500 commands make 500 alike)."""
        counted = collections.Counter(self.notes)
        return [note if n == 1 else f"{note} x{n}" for note, n in counted.items()]


class Load:
    """One rollout and one command burst against the private platform."""

    def __init__(self, platform: Any, case: str, commands: int) -> None:
        self.platform = platform
        self.counts = Counts(case)
        self.commands = commands
        self.accepted: dict[str, str] = {}  # command id -> device id
        self.rollout_id: str | None = None
        self.version: str | None = None
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
        self._futures: list[concurrent.futures.Future[None]] = []
        self._acks_from = _size(platform.acks_file)
        self._gateway_log = platform.stack.log_dir / "gateway.log"
        self._gateway_log_from = _size(self._gateway_log)
        self._started = time.monotonic()
        self._cpu_before = cpu_snapshot(platform.stack)

    def call(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: Any = None,
        *,
        key: str | None = None,
        deadline_s: float = 150.0,
    ) -> httpx.Response:
        """A request that a client would retry on 502/503/504 (same Idempotency-Key)."""
        deadline = time.monotonic() + deadline_s
        extra = {"Idempotency-Key": key} if key else {}
        while True:
            try:
                response = httpx.request(
                    method,
                    self.platform.api + path,
                    json=body,
                    headers=headers | extra,
                    timeout=15,
                )
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code not in RETRYABLE:
                if response.status_code >= 500:
                    with self._lock:
                        self.counts.errors_5xx += 1
                        self.counts.notes.append(f"{method} {path} -> {response.status_code}")
                    # An unexpected 5xx is counted; the client still retries it.
                else:
                    return response
            elif response is not None:
                with self._lock:
                    self.counts.unavailable += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} {path}: no answer but 5xx within {deadline_s}s")
            time.sleep(0.5)

    # --- the load ------------------------------------------------------------------------

    def start_rollout(self) -> None:
        """An Ultra WiFi release and a rollout to every simulated device (admin override)."""
        admin = self.platform.admin_headers
        version = f"9.{uuid.uuid4().int % 10_000}.{int(time.time()) % 1000}"
        self.version = version
        release = self.call(
            "POST",
            "/firmware/releases",
            admin,
            {
                "console": "ultra",
                "version": version,
                "models": ["Ultra"],
                "transport": "wifi",
                "artifact_url": f"https://fw.example/{version}.bin",
                "sha256": SHA,
                "size": 4096,
            },
            key=f"rel-{version}",
        )
        assert release.status_code == 201, release.text
        ids = [d["id"] for d in self.platform.devices]
        rollout = self.call(
            "POST",
            "/rollouts",
            admin,
            {
                "release_id": release.json()["id"],
                "scope": "my_fleet",
                "dealer_id": self.platform.dealer_id,
                "target": {"device_ids": ids},
                "strategy": {"batch_size": len(ids), "failure_threshold_pct": 100},
                "override": True,
                "override_reason": "fault suite",
            },
            key=f"rollout-{version}",
        )
        assert rollout.status_code == 201, rollout.text
        self.rollout_id = rollout.json()["id"]

    def send_commands(self, count: int) -> None:
        """Queue `count` start/stop commands spread over the devices (sent by worker threads)."""
        devices = [d["id"] for d in self.platform.devices]
        for n in range(count):
            device = devices[n % len(devices)]
            action = "start" if (n // len(devices)) % 2 == 0 else "stop"
            self._futures.append(self._pool.submit(self._command, device, action))

    def _command(self, device: str, action: str) -> None:
        response = self.call(
            "POST",
            f"/devices/{device}/commands",
            self.platform.dealer_headers,
            {"action": action},
            key=uuid.uuid4().hex,
        )
        if response.status_code == 202:
            with self._lock:
                self.accepted[response.json()["id"]] = device
        else:
            with self._lock:
                if response.status_code != 409:
                    self.counts.refused += 1
                self.counts.notes.append(f"command refused {response.status_code}")

    def wait_sent(self, timeout: float = 200.0) -> None:
        """Every queued command got its final HTTP answer."""
        done, pending = concurrent.futures.wait(self._futures, timeout=timeout)
        for future in done:
            future.result()
        assert not pending, f"{len(pending)} command requests still unanswered"
        self._pool.shutdown()

    # --- the verdict ---------------------------------------------------------------------

    def settle(self, timeout: float = 300.0) -> Counts:
        """Wait until everything is final (or the deadline), then count.

        The wait is longer than the commands' TTL (2 min for Start and Stop) so that a slow
        machine still sees each command to its end; a command not final by then is stuck.
        """
        self.wait_sent()
        self.counts.accepted = len(self.accepted)
        statuses: dict[str, str] = {}
        devices: dict[str, dict[str, Any]] = {}

        def commands_final() -> bool:
            for command_id in self.accepted:
                if statuses.get(command_id) in FINAL_COMMAND:
                    continue
                response = self.call("GET", f"/commands/{command_id}", self.platform.dealer_headers)
                statuses[command_id] = (
                    response.json()["status"] if response.status_code == 200 else "missing"
                )
            return all(s in FINAL_COMMAND for s in statuses.values())

        def rollout_final() -> bool:
            response = self.call(
                "GET",
                f"/rollouts/{self.rollout_id}/devices?limit=500",
                self.platform.admin_headers,
            )
            devices.clear()
            devices.update({d["device_id"]: d for d in response.json()["items"]})
            return len(devices) == len(self.platform.devices) and all(
                d["state"] in FINAL_DEVICE for d in devices.values()
            )

        deadline = time.monotonic() + timeout
        for what, check in (("commands final", commands_final), ("rollout final", rollout_final)):
            try:
                wait_for(what, check, max(5.0, deadline - time.monotonic()), interval=1.0)
            except TimeoutError as exc:
                self.counts.notes.append(str(exc))
        c = self.counts
        c.lost = sum(1 for s in statuses.values() if s == "missing")
        c.lost += len(self.platform.devices) - len(devices)
        c.stuck = sum(1 for s in statuses.values() if s not in FINAL_COMMAND | {"missing"})
        c.stuck += sum(1 for d in devices.values() if d["state"] not in FINAL_DEVICE)
        c.confirmed = sum(1 for d in devices.values() if d["state"] == "confirmed")
        failed = [d for d in devices.values() if d["state"] == "failed"]
        c.failed = len(failed)
        c.failed_without_reason = sum(1 for d in failed if not d.get("detail"))
        premature = self._failed_yet_updated(failed)
        if premature:
            # A deadline is a real reason only if the device did not come back with the
            # version: one that did, and was failed anyway, was failed by the platform's lag.
            c.failed_without_reason += premature
            c.notes.append(f"{premature} failed by their deadline yet run the new version")
        if failed:
            c.notes.append(f"failed e.g. {failed[0]['device_id']}: {failed[0].get('detail')}")
        expired = sum(1 for s in statuses.values() if s == "expired")
        if expired:
            c.notes.append(f"{expired} commands expired")
        never_started = [d for d in failed if "did not start" in (d.get("detail") or "")]
        c.late = expired + len(never_started)
        c.duplicated = self._sent_twice()
        c.elapsed_s = round(time.monotonic() - self._started, 1)
        c.notes.append(machine_note(self.platform.stack, self._cpu_before, c.elapsed_s))
        return c

    def _failed_yet_updated(self, failed: list[dict[str, Any]]) -> int:
        """Devices failed by a deadline that the fleet now shows on the release's version."""
        count = 0
        for d in failed:
            if "not back with the new version" not in (d.get("detail") or ""):
                continue
            response = self.call("GET", f"/devices/{d['device_id']}", self.platform.dealer_headers)
            if response.status_code == 200 and response.json()["firmware_version"] == self.version:
                count += 1
        return count

    def _sent_twice(self) -> int:
        """Commands the gateway published to their device more than once.

        The platform side of "no duplicates": a command is published once its delivery is
        recorded, and a second publish of the same id is a second run offered to the device
        (which should ignore it, but need not). Read from the gateway's `command handled`
        log lines (written after the delivery record's commit, one per publish the broker
        acknowledged). What the broker itself redelivers across its restart, and acks a
        device re-sends because their PUBACK was lost, are QoS 1's at least once: the
        observer sees those, and they are noted, not counted.
        """
        sent: collections.Counter[str] = collections.Counter()
        for record in read_jsonl(self._gateway_log, self._gateway_log_from):
            if record.get("msg") == "command handled" and record.get("outcome") == "sent":
                sent[str(record["command_id"])] += 1
        # No line at all would make this count 0 whatever happened (a log level above info).
        assert sent or not self.accepted, f"no 'command handled' line in {self._gateway_log}"
        self._note_broker_redeliveries()
        return sum(1 for n in sent.values() if n > 1)

    def _note_broker_redeliveries(self) -> None:
        """What the observer saw delivered or acked again (a note for reading a failure)."""
        accepted: collections.Counter[str] = collections.Counter()
        after_ack: set[str] = set()
        for record in read_jsonl(self.platform.acks_file, self._acks_from):
            command_id = str(record["command_id"])
            if record["kind"] == "down":
                if accepted[command_id]:
                    after_ack.add(command_id)
            elif record["status"] == "accepted":
                accepted[command_id] += 1
        twice = sum(1 for n in accepted.values() if n > 1)
        if twice:
            self.counts.notes.append(f"{twice} commands acked accepted twice (as observed)")
        if after_ack:
            self.counts.notes.append(
                f"{len(after_ack)} commands delivered again after an ack (as observed)"
            )


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def report(counts: Counts, results_file: Path) -> None:
    """Print the case's summary line and keep it for the suite's summary."""
    print(counts.line())  # noqa: T201 - the suite's output is its counts
    with results_file.open("a") as out:
        out.write(json.dumps(counts.__dict__) + "\n")
