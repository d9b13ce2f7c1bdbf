"""A private copy of the local stack for the fault suite: servers, services, simulator, observer.

The fault cases stop Kafka, PostgreSQL, Redis and Mosquitto and kill services; doing that to the
shared stack would break everyone else's work. So the suite starts its own instance of
`deploy/local/stack` (own directory, own ports) and its own service processes, and stops all of
it at the end.
"""

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "deploy" / "local" / "stack"
SERVICES = ("tokens", "fleet", "commands", "firmware", "gateway", "console")
COMPONENTS = ("kafka", "postgres", "redis", "mosquitto")
# Ports that stay clear of the shared stack (9092/9093/55432/56379/1883/8080, 8101-8106) and of
# Linux's ephemeral range (32768-60999): a client socket of the running suite once held
# 127.0.0.1:56432 when the private PostgreSQL wanted to listen there.
SERVER_PORTS = {
    "AUTOGEN_KAFKA_PORT": 19092,
    "AUTOGEN_KAFKA_CONTROLLER_PORT": 19093,
    "AUTOGEN_PG_PORT": 15432,
    "AUTOGEN_REDIS_PORT": 16379,
    "AUTOGEN_MQTT_PORT": 11883,
    "AUTOGEN_HTTP_PORT": 18080,
}
SERVICE_PORTS = {svc: 18101 + n for n, svc in enumerate(SERVICES)}
OBSERVER_USER = "faults-observer"
OBSERVER_PASSWORD = "faults-observer-dev"
DEVICES = int(os.environ.get("FAULTS_DEVICES", "200"))
COMMANDS = int(os.environ.get("FAULTS_COMMANDS", "500"))
TIME_FACTOR = float(os.environ.get("FAULTS_TIME_FACTOR", "0.1"))
# Environment prefixes of the shared stack that must not leak into the private one.
_FOREIGN_PREFIXES = ("AUTOGEN_", *(f"{svc.upper()}_" for svc in SERVICES), "GATEWAY_MQTT_")


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.2) -> float:
    """Poll `check` until it holds; raise after `timeout` seconds. Returns the time taken."""
    started = time.monotonic()
    deadline = started + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return time.monotonic() - started
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s (last error: {last!r})")


@dataclass
class ServiceProcess:
    """One service as `python -m <svc> serve` with the private stack's environment."""

    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """The service's own HTTP address (not through nginx)."""
        return f"http://127.0.0.1:{self.port}"

    def migrate(self) -> None:
        """`python -m <svc> migrate` (a no-op for the console)."""
        subprocess.run(
            [sys.executable, "-m", self.name, "migrate"],
            env=self.env,
            cwd=ROOT,
            check=True,
            timeout=120,
            stdout=subprocess.DEVNULL,
        )

    def start(self) -> None:
        """Start `serve` in its own process group; logs append to `log_path`."""
        self._log = self.log_path.open("ab")
        self._log.write(f"\n--- start {time.strftime('%H:%M:%S')} ---\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.name, "serve"],
            env=self.env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def probe(self, path: str, timeout: float = 3.0) -> int:
        """Status of `GET path` on the service itself, or 0 when it does not answer."""
        try:
            return httpx.get(self.url + path, timeout=timeout).status_code
        except httpx.HTTPError:
            return 0

    def readiness(self) -> dict[str, Any]:
        """The `/readyz` document (checks by dependency name)."""
        return httpx.get(self.url + "/readyz", timeout=5.0).json()  # type: ignore[no-any-return]

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Wait for `/readyz` 200; fail early if the process died."""

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
            return self.probe("/readyz") == 200

        return wait_for(f"{self.name} ready", ready, timeout)

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the service process itself."""
        assert self.process is not None
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to end; returns its exit code (raises after `timeout`)."""
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s; closes the log."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class PrivateStack:
    """`deploy/local/stack` in its own directory and ports, plus the services on their own."""

    local_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    simulator: subprocess.Popen[bytes] | None = None
    observer: subprocess.Popen[bytes] | None = None
    _extra_logs: list[IO[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.local_dir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
        base["AUTOGEN_LOCAL_DIR"] = str(self.local_dir)
        base.update({k: str(v) for k, v in SERVER_PORTS.items()})
        base.update({f"{svc.upper()}_HTTP_PORT": str(p) for svc, p in SERVICE_PORTS.items()})
        # High enough that the fuzzer and the load never meet nginx's limits (they are tested
        # on their own); the per-device limits of the gateway stay as they are.
        base["AUTOGEN_RATE_LIMIT_PER_ADDR"] = "100000r/s"
        base["AUTOGEN_RATE_LIMIT_PER_TOKEN"] = "100000r/s"
        base["AUTOGEN_KAFKA_HEAP"] = "-Xmx384m -Xms384m"
        base["AUTOGEN_STOP_TIMEOUT"] = "30"
        # Settings the services run with here (the rest of the environment's are stripped
        # above), to compare behaviours: FAULTS_SERVICE_ENV="COMMANDS_OUTBOX_EAGER=false".
        for setting in os.environ.get("FAULTS_SERVICE_ENV", "").split():
            name, _, value = setting.partition("=")
            base[name] = value
        self._script_env = base

    # --- servers -------------------------------------------------------------------------

    def stack(self, *args: str, timeout: float = 240) -> str:
        """Run `deploy/local/stack <args>` for the private instance; returns its output."""
        done = subprocess.run(
            [str(STACK), *args],
            env=self._script_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"stack {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def reset(self) -> None:
        """Stop the servers and delete everything they stored (logs stay), so a run starts as
        on a fresh clone (as in CI): the last run's releases, rollouts, devices and commands
        are not part of the next one."""
        with contextlib.suppress(Exception):
            self.stack("stop", timeout=180)
        for path in self.local_dir.iterdir():
            if path != self.log_dir:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    def start_servers(self) -> None:
        """Start (or keep) the servers and read the environment contract they publish."""
        self.stack("start")
        env = dict(self._script_env)
        for line in self.stack("env").splitlines():
            parts = shlex.split(line)
            if len(parts) == 2 and parts[0] == "export" and "=" in parts[1]:
                key, value = parts[1].split("=", 1)
                env[key] = value
        tokens = SERVICE_PORTS["tokens"]
        env.update(
            {
                # Every service's default points at the shared stack's tokens and gateway.
                "AUTOGEN_JWKS_URL": f"http://127.0.0.1:{tokens}/.well-known/jwks.json",
                "FLEET_GATEWAY_URL": f"http://127.0.0.1:{SERVICE_PORTS['gateway']}",
                "AUTOGEN_LOG_LEVEL": "INFO",
                # Fast enough for a test: devices return within seconds at --time-factor 0.1.
                "FIRMWARE_DEADLINE_WIFI_S": "90",
                "FIRMWARE_DEADLINE_GSM_S": "90",
                "FIRMWARE_DEADLINE_GPS_S": "90",
                "FIRMWARE_RETRY_BACKOFF_S": "2",
                "FIRMWARE_RETRY_BACKOFF_MAX_S": "5",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env = env

    def stop_component(self, component: str) -> None:
        """Stop one server (clean shutdown, as an operator restart does)."""
        self.stack("stop", component, timeout=90)

    def start_component(self, component: str) -> None:
        """Start one server again and wait until it answers."""
        self.stack("start", component, timeout=180)

    def stop_all(self) -> None:
        """Simulator, observer, services, then the servers; each step whatever the last did."""
        for proc in (self.simulator, self.observer):
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
        for svc in reversed(list(self.services.values())):
            with contextlib.suppress(Exception):
                svc.stop()
        for handle in self._extra_logs:
            handle.close()
        with contextlib.suppress(Exception):
            self.stack("stop", timeout=180)

    # --- services ------------------------------------------------------------------------

    def start_services(self) -> None:
        """Migrate and serve every service, in dependency order, until each is ready."""
        for name in SERVICES:
            svc = ServiceProcess(
                name=name,
                port=SERVICE_PORTS[name],
                env=self.env,
                log_path=self.log_dir / f"{name}.log",
            )
            self.services[name] = svc
            if name != "console":
                svc.migrate()
        # All at once: each takes seconds to import, and none needs another to become ready.
        for svc in self.services.values():
            svc.start()
        for svc in self.services.values():
            svc.wait_ready(timeout=180)

    def run_module(self, *args: str, timeout: float = 180) -> str:
        """`python -m <args>` with the private environment; returns stdout."""
        done = subprocess.run(
            [sys.executable, "-m", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"python -m {' '.join(args)}: {done.stdout}\n{done.stderr}")
        return done.stdout

    @property
    def api(self) -> str:
        """The public API base URL through the private nginx."""
        return f"http://127.0.0.1:{SERVER_PORTS['AUTOGEN_HTTP_PORT']}/api/v1"

    # --- simulator and observer ------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        self._extra_logs.append(log)
        return subprocess.Popen(
            argv,
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def start_simulator(self, devices_file: Path, time_factor: float) -> None:
        """The device simulator for `devices_file` against the private broker."""
        self.simulator = self._spawn(
            "simulator",
            [
                sys.executable,
                "-m",
                "gateway.simulator",
                "--devices",
                str(devices_file),
                "--port",
                str(SERVER_PORTS["AUTOGEN_MQTT_PORT"]),
                "--time-factor",
                str(time_factor),
                "--telemetry-interval",
                "30",
            ],
        )

    def create_observer_account(self) -> None:
        """A broker account that may read every device topic (this test broker only)."""
        port = str(SERVER_PORTS["AUTOGEN_MQTT_PORT"])
        admin = [
            "mosquitto_ctrl", "-h", "127.0.0.1", "-p", port,
            "-u", self.env["AUTOGEN_MQTT_ADMIN_USERNAME"],
            "-P", self.env["AUTOGEN_MQTT_ADMIN_PASSWORD"], "dynsec",
        ]  # fmt: skip
        steps = [
            ["createRole", "faults-observer"],
            ["addRoleACL", "faults-observer", "subscribePattern", "devices/#", "allow"],
            ["addRoleACL", "faults-observer", "publishClientReceive", "devices/#", "allow"],
            ["createClient", OBSERVER_USER, "-p", OBSERVER_PASSWORD],
            ["addClientRole", OBSERVER_USER, "faults-observer"],
        ]
        for step in steps:
            done = subprocess.run(
                [*admin, *step], capture_output=True, text=True, timeout=15, check=False
            )
            if "Error" in done.stdout and "already exists" not in done.stdout:
                raise RuntimeError(f"mosquitto_ctrl {' '.join(step)}: {done.stdout}")

    def start_observer(self, out: Path) -> None:
        """Record every command delivered to and acknowledged by a device (JSON lines)."""
        self.observer = self._spawn(
            "observer",
            [
                sys.executable,
                str(Path(__file__).with_name("observer.py")),
                "--port",
                str(SERVER_PORTS["AUTOGEN_MQTT_PORT"]),
                "--username",
                OBSERVER_USER,
                "--password",
                OBSERVER_PASSWORD,
                "--out",
                str(out),
            ],
        )


@dataclass
class Platform:
    """The private platform as the fault cases see it."""

    stack: PrivateStack
    accounts: dict[str, Any]
    dealer_id: str
    dealer_headers: dict[str, str]
    admin_headers: dict[str, str]
    devices: list[dict[str, Any]]
    acks_file: Path

    @property
    def api(self) -> str:
        """Public API base URL (through the private nginx)."""
        return self.stack.api

    def login(self, email: str, password: str) -> dict[str, str]:
        """Bearer headers for an account (logs in through nginx)."""
        response = httpx.post(
            f"{self.api}/auth/login", json={"email": email, "password": password}, timeout=15
        )
        response.raise_for_status()
        return {"Authorization": f"Bearer {response.json()['access_token']}"}

    def relogin(self) -> None:
        """Fresh session tokens (they expire; a long suite outlives the first ones)."""
        staff = self.accounts["dealers"][0]["staff"][0]
        admin = self.accounts["admin"]
        self.dealer_headers = self.login(staff["email"], staff["password"])
        self.admin_headers = self.login(admin["email"], admin["password"])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (from /proc), or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(stack: "PrivateStack") -> dict[str, tuple[int, float]]:
    """Per service and the simulator: (pid, CPU seconds so far)."""
    procs = {name: svc.process for name, svc in stack.services.items()}
    procs["simulator"] = stack.simulator
    found = {}
    for name, proc in procs.items():
        if proc is not None and (used := cpu_seconds(proc.pid)) is not None:
            found[name] = (proc.pid, used)
    return found


def machine_note(stack: "PrivateStack", before: dict[str, tuple[int, float]], took: float) -> str:
    """How busy the machine and each process were during a case (for reading a failure)."""
    after = cpu_snapshot(stack)
    used = []
    for name, (pid, cpu) in after.items():
        start = before.get(name)
        # A service restarted during the case counts from its new start.
        spent = cpu - start[1] if start is not None and start[0] == pid else cpu
        used.append(f"{name} {spent:.0f}s ({100 * spent / max(took, 1):.0f}%)")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"machine: {os.cpu_count()} CPUs, load {load}; CPU used: {', '.join(used)}"


def read_jsonl(path: Path, offset: int = 0) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (or a log) from byte `offset` on; other lines (a
    partial last one, a log's markers) are skipped."""
    if not path.exists():
        return
    with path.open("rb") as lines:
        lines.seek(offset)
        for line in lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    yield record
