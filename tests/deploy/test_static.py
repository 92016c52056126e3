"""Linters for what cannot run here: the Dockerfile, the workflow, skaffold.yaml, the CI scripts."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import CHART, render, run, tool
from tests.support import REPO

SKAFFOLD_SCHEMA = REPO.parent / "shared" / "schemas" / "skaffold-v4beta14.json"


def test_hadolint_passes_the_dockerfile() -> None:
    result = run(
        tool("hadolint"), "--failure-threshold", "info", str(REPO / "Dockerfile"), check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_is_multi_stage_non_root_and_configurable() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.12-slim$", text, re.MULTILINE)
    assert len(re.findall(r"^FROM \$\{PYTHON_IMAGE\}", text, re.MULTILINE)) == 2
    assert re.search(r"^USER \$\{UID\}:\$\{UID\}$", text, re.MULTILINE)
    assert "ARG UID=10001" in text
    assert 'ENTRYPOINT ["reasoning-agent"]' in text and 'CMD ["serve"]' in text
    for env in (
        "HOST=0.0.0.0",
        "PORT=8000",
        "WORKERS=1",
        "PYTHONDONTWRITEBYTECODE=1",
        "DATABASE_URL=sqlite:////data/reasoning_agent.db",
    ):
        assert env in text


def test_actionlint_passes_the_workflow() -> None:
    workflow = REPO / ".github" / "workflows" / "ci.yml"
    result = run(tool("actionlint"), "-shellcheck", tool("shellcheck"), str(workflow), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_workflow_pins_actions_and_keeps_permissions_minimal() -> None:
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "ci.yml").read_text())
    assert workflow["permissions"] == {"contents": "read"}
    uses = [
        step["uses"]
        for job in workflow["jobs"].values()
        for step in job.get("steps", [])
        if "uses" in step
    ]
    assert uses and all(re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", u) for u in uses), uses
    assert {"lint", "test", "chart", "image", "e2e-kind"} <= set(workflow["jobs"])
    services = workflow["jobs"]["test"]["services"]
    assert {"postgres", "redis"} <= set(services)
    e2e = json.dumps(workflow["jobs"]["e2e-kind"])
    for step in (
        "kind load docker-image",
        "helm install",
        "rollout status",
        "port-forward",
        "/task",
        "/query",
        "helm test",
    ):
        assert step in e2e


def test_shellcheck_passes_the_ci_scripts() -> None:
    scripts = [str(p) for p in (REPO / ".ci").iterdir() if p.is_file()]
    result = run(tool("shellcheck"), *scripts, check=False)
    assert result.returncode == 0, result.stdout


def test_skaffold_yaml_matches_the_schema_and_names_what_exists() -> None:
    if not SKAFFOLD_SCHEMA.exists():
        pytest.skip(f"{SKAFFOLD_SCHEMA} is not here (it exists only inside this workplace)")
    config = yaml.safe_load((REPO / "skaffold.yaml").read_text())
    jsonschema.validate(config, json.loads(SKAFFOLD_SCHEMA.read_text()))
    assert re.fullmatch(r"skaffold/v4beta\d+", config["apiVersion"]) and config["kind"] == "Config"

    artifact = config["build"]["artifacts"][0]
    assert (REPO / artifact["context"] / artifact["docker"]["dockerfile"]).is_file()
    release = config["deploy"]["helm"]["releases"][0]
    assert (REPO / release["chartPath"] / "Chart.yaml").is_file()
    for values in release["valuesFiles"]:
        assert (REPO / values).is_file()
    key = artifact["image"].replace("-", "_")
    assert release["setValueTemplates"] == {
        "image.repository": f"{{{{.IMAGE_REPO_{key}}}}}",
        "image.tag": f"{{{{.IMAGE_TAG_{key}}}}}",
    }

    docs = render(*(REPO / v for v in release["valuesFiles"]), release=release["name"])
    service = next(
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == release["name"]
    )
    forward = config["portForward"][0]
    assert forward["resourceType"] == "service" and forward["resourceName"] == release["name"]
    assert forward["port"] == service["spec"]["ports"][0]["port"] and forward["localPort"] == 8000

    dev = next(p for p in config["profiles"] if p["name"] == "dev")
    sync = next(p["value"] for p in dev["patches"] if p["path"].endswith("/sync"))
    assert sync["manual"][0]["src"].startswith("service/") and sync["manual"][0]["dest"] == "/app"
    assert any(p["path"].endswith("config.reload") and p["value"] is True for p in dev["patches"])
    assert "PYTHONPATH=/app/service" in (REPO / "Dockerfile").read_text()
    reload_docs = render(
        *(REPO / v for v in release["valuesFiles"]), sets={"config.reload": "true"}
    )
    container = next(
        d
        for d in reload_docs
        if d["kind"] == "Deployment" and "reasoning-agent" in d["metadata"]["name"]
    )["spec"]["template"]["spec"]["containers"][0]
    assert "--reload" in container["args"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is False
    assert (CHART / "values.yaml").is_file()


@pytest.mark.parametrize("profile", ["", "postgres"], ids=["default", "postgres profile"])
def test_the_compose_file_is_valid_and_hardened_in_every_profile(profile: str, tmp_path) -> None:
    """docker-compose resolves it with the .env a user makes from .env.example; every
    service is read-only, drops every capability, runs as a non-root user and is checked."""
    env = (REPO / ".env.example").read_text()
    if profile:  # the three lines .env.example says to uncomment
        env = re.sub(
            r"^# (COMPOSE_PROFILES|POSTGRES_PASSWORD|DATABASE_URL)=", r"\1=", env, flags=re.M
        )
    (tmp_path / ".env").write_text(env)
    (tmp_path / "docker-compose.yml").write_text((REPO / "docker-compose.yml").read_text())
    compose = tool("docker-compose")
    resolved = yaml.safe_load(run(compose, "config", cwd=tmp_path).stdout)
    services = resolved["services"]
    assert set(services) == {"agent", "worker", "redis", "postgres"}
    assert services["postgres"]["profiles"] == ["postgres"]  # only with COMPOSE_PROFILES
    for name, service in services.items():
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert not service.get("cap_add") and service["user"].split(":")[0] not in ("", "0"), name
        assert "healthcheck" in service, name
    for name in ("agent", "worker"):
        database = services[name]["environment"]["DATABASE_URL"]
        assert database.startswith("postgresql://" if profile else "sqlite:////data/"), name
    assert str(services["agent"]["ports"][0]).startswith("127.0.0.1:")  # never all interfaces
