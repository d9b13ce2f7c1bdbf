"""Rules of the codebase that a tool checks: independence, shape, declared topics."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.contracts import ALL_TOPICS

ROOT = Path(__file__).resolve().parents[1]
SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "pyproject.toml").is_file())


def test_services_and_libs_keep_their_import_boundaries() -> None:
    """No service imports another; libs never import services (import-linter contracts)."""
    lint_imports = shutil.which("lint-imports")
    assert lint_imports, "import-linter is not installed in the workspace"
    result = subprocess.run(
        [lint_imports, "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


def test_the_six_services_exist() -> None:
    assert SERVICES == ["commands", "console", "firmware", "fleet", "gateway", "tokens"]


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_has_the_same_shape(service: str) -> None:
    folder = ROOT / "services" / service
    package = folder / "src" / service
    for required in ("__main__.py", "settings.py", "app.py"):
        assert (package / required).is_file(), f"{service} lacks src/{service}/{required}"
    assert (folder / "README.md").is_file(), f"{service} lacks its README"
    assert (folder / "Dockerfile").is_file(), f"{service} lacks its Dockerfile"
    settings = (package / "settings.py").read_text()
    assert f'service_config("{service.upper()}_")' in settings, "env prefix must be SERVICE_"
    if (package / "store.py").is_file():
        assert (package / "migrations" / "env.py").is_file(), f"{service} has tables, no migrations"


def test_every_contract_topic_is_declared_for_the_cluster() -> None:
    declared = yaml.safe_load((ROOT / "deploy" / "topics.yaml").read_text())["topics"]
    names = {topic["name"] for topic in declared}
    missing = sorted(t.name for t in ALL_TOPICS if t.name not in names)
    assert not missing, f"topics with a contract but not in deploy/topics.yaml: {missing}"


def test_state_topics_are_compacted() -> None:
    declared = yaml.safe_load((ROOT / "deploy" / "topics.yaml").read_text())["topics"]
    policy = {t["name"]: t.get("config", {}).get("cleanup.policy", "delete") for t in declared}
    assert policy["fleet.device.v1"] == "compact"


def test_asyncapi_document_matches_the_contracts() -> None:
    """docs/asyncapi.yaml is regenerated whenever a contract changes."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "asyncapi.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_app_leaves_tracing_to_common_telemetry(service: str) -> None:
    """FastAPI's own OpenTelemetry layer stays off (`common.telemetry.instrument_app` traces
    each request once; both on was a second span per request and a quarter of a search)."""
    source = (ROOT / "services" / service / "src" / service / "app.py").read_text()
    assert source.count("FastAPI(") == 1
    assert "telemetry=FASTAPI_NATIVE_TELEMETRY_OFF" in source
