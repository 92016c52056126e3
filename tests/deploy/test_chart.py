"""The Helm chart, rendered offline for every ci/*-values.yaml and checked object by object."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import (
    CHART,
    KUBE_VERSION,
    app_deployment,
    ci_values,
    env_of,
    find,
    helm,
    render,
    render_error,
    render_text,
)
from tests.support import REPO

DEFAULT = CHART / "ci" / "default-values.yaml"
EXISTING = CHART / "ci" / "existing-secret-values.yaml"
EXTERNAL = CHART / "ci" / "external-values.yaml"
CI_KEY = "ci-key-0123456789abcdef"
CI_OPENAI = "sk-ci-not-a-real-key-0000"


@pytest.mark.parametrize("values", ci_values(), ids=lambda p: p.name)
def test_lint_and_every_object_is_valid_kubernetes(values: Path) -> None:
    helm("lint", "--strict", str(CHART), "-f", str(values), "--kube-version", KUBE_VERSION)
    docs = render(values)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:  # an unknown kind must not pass quietly
            if doc["kind"] != "ServiceMonitor":  # a CRD: checked in its own test
                pytest.fail(f"no schema for {doc['apiVersion']} {doc['kind']}")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {exc.path}")


def test_with_no_values_at_all_one_strong_key_is_made_in_a_secret_upgrades_never_apply() -> None:
    """`helm install` with no values works: a key named `default` is generated (kept across
    upgrades by reading the live Secret back, which `helm template` cannot show). The Secret
    is a hook, so a hand rotation never conflicts with an upgrade's or a rollback's apply."""
    docs = render()
    keys = find(docs, "Secret", "ra-reasoning-agent-api-keys")
    name, _, key = base64.b64decode(keys["data"]["api-keys"]).decode().partition(":")
    assert name == "default" and len(key) >= 43 and key.isalnum()
    annotations = keys["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    again = find(render(), "Secret", "ra-reasoning-agent-api-keys")["data"]["api-keys"]
    assert again != keys["data"]["api-keys"]  # random where no Secret can be looked up
    pod = app_deployment(docs)["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == "ra-reasoning-agent-api-keys"
    notes = helm("install", "ra", str(CHART), "--dry-run=client").stdout
    assert "one was generated for you, named `default`" in notes
    assert not [d for d in render(EXISTING) if d["metadata"]["name"].endswith("-api-keys")]


def test_the_bundled_redis_is_not_probed_before_it_can_listen() -> None:
    redis = next(
        d for d in render(DEFAULT) if d["kind"] == "Deployment" and "redis" in d["metadata"]["name"]
    )
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["initialDelaySeconds"] >= 2
    assert (
        container["livenessProbe"]["initialDelaySeconds"]
        >= container["readinessProbe"]["initialDelaySeconds"]
    )


def test_the_ci_cases_cover_the_contract() -> None:
    names = {p.name for p in ci_values()}
    assert {"default-values.yaml", "existing-secret-values.yaml", "external-values.yaml"} <= names
    external = app_deployment(render(EXTERNAL))
    assert external["spec"]["replicas"] == 3


def test_api_keys_are_mounted_from_the_secret_and_never_appear_in_clear_elsewhere() -> None:
    text = render_text(DEFAULT)
    docs = [d for d in yaml.safe_load_all(text) if d]
    keys = find(docs, "Secret", "ra-reasoning-agent-api-keys")
    assert base64.b64decode(keys["data"]["api-keys"]).decode() == f"ci:{CI_KEY}"
    secret = find(docs, "Secret", "ra-reasoning-agent")
    assert base64.b64decode(secret["data"]["openai-api-key"]).decode() == CI_OPENAI
    assert "api-keys" not in secret["data"]

    pod = app_deployment(docs)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = env_of(container)
    assert env["API_KEYS_FILE"]["value"] == "/etc/reasoning-agent/keys/api-keys"
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "ra-reasoning-agent",
        "key": "openai-api-key",
        "optional": True,
    }
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"] == {
        "secretName": "ra-reasoning-agent-api-keys",
        "items": [{"key": "api-keys", "path": "api-keys"}],
    }
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    assert mount == {"name": "api-keys", "mountPath": "/etc/reasoning-agent/keys", "readOnly": True}
    assert "subPath" not in mount  # a subPath mount would never see a rotated key

    others = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for secret_text in (CI_KEY, CI_OPENAI):
        assert secret_text not in others
        assert base64.b64encode(secret_text.encode()).decode() not in others
    configmap = find(docs, "ConfigMap", "ra-reasoning-agent")
    assert not {"API_KEYS", "OPENAI_API_KEY", "DATABASE_URL", "REDIS_URL"} & set(configmap["data"])


def test_database_and_redis_urls_with_passwords_stay_in_secrets() -> None:
    docs = render(EXTERNAL)
    others = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for password in ("db-password-ci", "redis-password-ci"):
        assert password not in others
    env = env_of(app_deployment(docs)["spec"]["template"]["spec"]["containers"][0])
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "ra-reasoning-agent",
        "key": "database-url",
    }
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "ra-reasoning-agent",
        "key": "redis-url",
    }


def test_the_sqlite_file_lives_on_the_pvc_at_data_and_one_pod_is_replaced_whole() -> None:
    docs = render(DEFAULT)
    deployment = app_deployment(docs)
    pod = deployment["spec"]["template"]["spec"]
    pvc = find(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    container = pod["containers"][0]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert env_of(container)["DATABASE_URL"]["value"] == "sqlite:////data/reasoning_agent.db"
    assert pod["securityContext"]["fsGroup"] == 10001
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_an_existing_claim_is_used_instead_of_a_new_one() -> None:
    docs = render(EXISTING)
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    pod = app_deployment(docs)["spec"]["template"]["spec"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == "reasoning-agent-data"


@pytest.mark.parametrize(
    "sets",
    [{"replicaCount": "2"}, {"autoscaling.enabled": "true"}],
    ids=["two replicas", "autoscaling"],
)
def test_more_than_one_pod_on_sqlite_fails_the_render(sets: dict[str, str]) -> None:
    error = render_error(DEFAULT, sets=sets)
    assert "needs an external database" in error and "database.url" in error


def test_other_impossible_settings_fail_the_render() -> None:
    assert (
        "REDIS"
        in render_error(DEFAULT, sets={"redis.enabled": "false", "config.workers": "2"}).upper()
    )
    assert "redis.enabled=false" in render_error(
        DEFAULT, sets={"externalRedis.url": "redis://r:6379/0"}
    )


def test_an_external_database_allows_replicas_rollouts_hpa_pdb_and_runs_a_migration_hook() -> None:
    docs = render(EXTERNAL, sets={"autoscaling.enabled": "true"})
    deployment = app_deployment(docs)
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    assert (
        find(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"]
        == (deployment["metadata"]["name"])
    )
    assert find(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["serve", "--no-migrate"]

    job = find(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    migrate = job["spec"]["template"]["spec"]["containers"][0]
    assert migrate["args"][:2] == ["migrate", "--wait"]
    ref = env_of(migrate)["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    hook_secret = find(docs, "Secret", ref["name"])
    assert hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"] == "-10"
    assert int(job["metadata"]["annotations"]["helm.sh/hook-weight"]) > -10
    assert job["spec"]["backoffLimit"] >= 0 and job["spec"]["activeDeadlineSeconds"] > 0


def test_the_checksum_annotation_rolls_the_pods_when_a_key_changes() -> None:
    def checksums(**sets: str) -> dict[str, str]:
        annotations = app_deployment(render(DEFAULT, sets=sets))["spec"]["template"]["metadata"]
        return annotations["annotations"]

    before = checksums()
    rotated = checksums(**{"secrets.apiKeys": "ci:another-key-0123456789abcd"})
    reconfigured = checksums(**{"config.rateLimit": "10/minute"})
    assert before["checksum/secret"] != rotated["checksum/secret"]
    assert before["checksum/config"] == rotated["checksum/config"]
    assert before["checksum/config"] != reconfigured["checksum/config"]
    assert re.fullmatch(r"[0-9a-f]{64}", before["checksum/secret"])


def test_key_policies_are_a_configmap_the_server_re_reads_without_a_restart(
    tmp_path: Path,
) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text(
        "config:\n"
        "  tokenBudget: 2000000/day\n"
        "keyPolicies:\n"
        "  team-a:\n"
        "    token_budget: 10000000/day;200000000/month\n"
        "    models: [gpt-4o-mini, o4-mini]\n"
    )
    docs = render(DEFAULT, policies)
    config = find(docs, "ConfigMap", "ra-reasoning-agent")["data"]
    assert config["TOKEN_BUDGET"] == "2000000/day" and "TOKEN_RATE_LIMIT" not in config
    assert config["DEFAULT_MAX_TOKENS"] == "1024"
    file = find(docs, "ConfigMap", "ra-reasoning-agent-key-policies")["data"]["key-policies.yaml"]
    assert yaml.safe_load(file) == {
        "keys": {
            "team-a": {
                "token_budget": "10000000/day;200000000/month",
                "models": ["gpt-4o-mini", "o4-mini"],
            }
        }
    }
    server = app_deployment(docs)["spec"]["template"]["spec"]
    (container,) = server["containers"]
    policies_file = env_of(container)["KEY_POLICIES_FILE"]["value"]
    assert policies_file == "/etc/reasoning-agent/policies/key-policies.yaml"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "key-policies"]
    assert mount == {  # a directory, no subPath: the kubelet's updates reach it
        "name": "key-policies",
        "mountPath": "/etc/reasoning-agent/policies",
        "readOnly": True,
    }
    assert {"name": "key-policies", "configMap": {"name": "ra-reasoning-agent-key-policies"}} in (
        server["volumes"]
    )
    # Only the server reads it; a change to it alone rolls no pod.
    worker = render(EXTERNAL, policies)
    assert "KEY_POLICIES_FILE" not in env_of(
        find(worker, "Deployment", "ra-reasoning-agent-worker")["spec"]["template"]["spec"][
            "containers"
        ][0]
    )
    changed = tmp_path / "changed.yaml"
    changed.write_text(policies.read_text().replace("10000000/day", "20000000/day"))
    annotations = [
        app_deployment(render(DEFAULT, values))["spec"]["template"]["metadata"]["annotations"]
        for values in (policies, changed)
    ]
    assert annotations[0] == annotations[1]
    assert "KEY_POLICIES_FILE" not in env_of(
        app_deployment(render(DEFAULT))["spec"]["template"]["spec"]["containers"][0]
    )
    refused = render_error(DEFAULT, sets={"keyPolicies.team-a.token_budget": "bad"})
    assert "/keyPolicies/team-a/token_budget" in refused


def test_oidc_kubernetes_mode_mounts_the_servers_token_and_binds_issuer_discovery_only() -> None:
    docs = render(EXTERNAL, sets={"oidc.enabled": "true", "oidc.kubernetes": "true"})
    config = find(docs, "ConfigMap", "ra-reasoning-agent")["data"]
    assert config["OIDC_ISSUER"] == "https://kubernetes.default.svc.cluster.local"
    assert config["OIDC_AUDIENCE"] == "ra-reasoning-agent"  # the release's full name
    assert config["OIDC_JWKS_URL"] == "https://kubernetes.default.svc/openid/v1/jwks"
    assert config["OIDC_FETCH_TOKEN_FILE"] == "/var/run/secrets/reasoning-agent/issuer/token"
    binding = find(docs, "ClusterRoleBinding")
    assert binding["metadata"]["name"] == "ra-reasoning-agent-default-issuer-discovery"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "system:service-account-issuer-discovery",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ra-reasoning-agent", "namespace": "default"}
    ]
    server = app_deployment(docs)["spec"]["template"]["spec"]
    assert server["automountServiceAccountToken"] is False  # the projected volume alone
    (access,) = [v for v in server["volumes"] if v["name"] == "issuer-access"]
    sources = access["projected"]["sources"]
    assert sources[0] == {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}
    assert sources[1]["configMap"]["name"] == "kube-root-ca.crt"
    worker = find(docs, "Deployment", "ra-reasoning-agent-worker")["spec"]["template"]["spec"]
    assert all(v["name"] != "issuer-access" for v in worker["volumes"])

    plain = render(
        DEFAULT,
        sets={"oidc.enabled": "true", "oidc.issuer": "https://login.example.com"},
    )
    config = find(plain, "ConfigMap", "ra-reasoning-agent")["data"]
    assert config["OIDC_ISSUER"] == "https://login.example.com" and "OIDC_JWKS_URL" not in config
    assert not [d for d in plain if d["kind"] == "ClusterRoleBinding"]
    assert all(
        v["name"] != "issuer-access"
        for v in app_deployment(plain)["spec"]["template"]["spec"]["volumes"]
    )
    assert not [
        k
        for k in find(render(DEFAULT), "ConfigMap", "ra-reasoning-agent")["data"]
        if k.startswith("OIDC")
    ]
    assert "needs oidc.issuer, or oidc.kubernetes" in render_error(
        DEFAULT, sets={"oidc.enabled": "true"}
    )


@pytest.mark.parametrize("values", ci_values(), ids=lambda p: p.name)
def test_every_pod_runs_hardened(values: Path) -> None:
    docs = render(values, sets={"autoscaling.enabled": "false"})
    text = helm("template", "ra", str(CHART), "-f", str(values)).stdout
    hooks = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "Pod"]
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")]
    pods += [d["spec"] for d in hooks]
    assert pods
    for pod in pods:
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]


def test_the_app_pod_has_probes_resources_and_a_grace_period_past_the_llm_deadline() -> None:
    docs = render(DEFAULT, sets={"config.llmTimeoutS": "90"})
    pod = app_deployment(docs)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert pod["terminationGracePeriodSeconds"] > 90 + 5  # the delay, then the deadline
    configmap = find(docs, "ConfigMap", "ra-reasoning-agent")
    assert configmap["data"]["LLM_TIMEOUT_S"] == "90"
    assert configmap["data"]["STREAM_HEARTBEAT_S"] == "15"  # under the usual 60 s idle timeouts
    assert configmap["data"]["STREAM_ON_DISCONNECT"] == "continue"
    assert container["envFrom"] == [{"configMapRef": {"name": "ra-reasoning-agent"}}]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    service = find(docs, "Service", "ra-reasoning-agent")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0] == {
        "name": "http",
        "port": 8000,
        "targetPort": "http",
        "protocol": "TCP",
    }
    account = find(docs, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False


def test_redis_url_points_at_the_bundled_redis_service_with_its_password() -> None:
    for release in ("ra", "my-redis-release"):
        docs = render(DEFAULT, release=release)
        redis_service = next(
            d
            for d in docs
            if d["kind"] == "Service"
            and d["metadata"]["labels"]["app.kubernetes.io/name"] == "redis"
        )
        redis_pod = next(
            d
            for d in docs
            if d["kind"] == "Deployment"
            and d["metadata"]["name"] == redis_service["metadata"]["name"]
        )["spec"]["template"]["spec"]
        redis_image = redis_pod["containers"][0]["image"]
        assert redis_image.startswith("public.ecr.aws/docker/library/redis:")

        env = env_of(app_deployment(docs)["spec"]["template"]["spec"]["containers"][0])
        url = env["REDIS_URL"]["value"]
        assert url == f"redis://:$(REDIS_PASSWORD)@{redis_service['metadata']['name']}:6379/0"
        password_ref = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        redis_env = env_of(redis_pod["containers"][0])
        assert redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == password_ref
        secret = find(docs, "Secret", password_ref["name"])
        assert len(base64.b64decode(secret["data"][password_ref["key"]])) >= 16
        assert redis_service["spec"]["ports"][0]["port"] == 6379
        selector = redis_service["spec"]["selector"]
        assert all(redis_pod_labels(docs, redis_service)[k] == v for k, v in selector.items())


def redis_pod_labels(docs: list[dict], service: dict) -> dict:
    deployment = next(
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"] == service["metadata"]["name"]
    )
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_redis_disabled_renders_no_redis() -> None:
    docs = render(EXTERNAL)
    assert not [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/name") == "redis"]


def test_an_existing_secret_replaces_the_chart_secret_with_its_own_key_names() -> None:
    docs = render(EXISTING)
    assert not [d for d in docs if d["kind"] == "Secret" and "api-keys" in d.get("data", {})]
    pod = app_deployment(docs)["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"] == {
        "secretName": "reasoning-agent-keys",
        "items": [{"key": "keys.txt", "path": "api-keys"}],
    }
    env = env_of(pod["containers"][0])
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "reasoning-agent-keys"
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "openai"


@pytest.mark.parametrize(
    ("sets", "complaint"),
    [
        ({"replicaCount": "two"}, "replicaCount"),
        ({"replicaCont": "2"}, "replicaCont"),
        ({"persistence.enabled": "maybe"}, "persistence"),
        ({"config.workers": "0"}, "workers"),
        ({"config.logLevel": "LOUD"}, "logLevel"),
        ({"service.port": "http"}, "port"),
        ({"database.url": "mysql://x/y"}, "url"),
    ],
)
def test_the_values_schema_rejects_wrong_types_and_misspelled_keys(
    sets: dict[str, str], complaint: str
) -> None:
    error = render_error(DEFAULT, sets=sets)
    assert "schema" in error.lower() or "want" in error or "not allowed" in error
    assert complaint in error


def undocumented_values(lines: list[str]) -> list[str]:
    """Keys with no `# --` comment above them, except parents of other keys and the keys
    inside a documented structured value (such as `resources.requests.cpu`)."""
    missing = []
    ancestors: list[tuple[int, bool]] = []  # (indent, documented)
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1))
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        if any(documented for _, documented in ancestors):
            continue
        comments = []
        for above in reversed(lines[:number]):
            if not above.strip().startswith("#"):
                break
            comments.append(above.strip())
        documented = any(c.startswith("# --") for c in comments)
        following = next(
            (n for n in lines[number + 1 :] if n.strip() and not n.strip().startswith("#")), ""
        )
        is_parent = (
            match.group(3).strip() == "" and len(following) - len(following.lstrip()) > indent
        )
        if documented or is_parent:
            ancestors.append((indent, documented))
        else:
            missing.append(line.strip())
    return missing


@pytest.mark.parametrize("chart", [CHART, CHART / "charts" / "redis"], ids=["app", "redis"])
def test_every_value_has_a_doc_comment(chart: Path) -> None:
    assert undocumented_values((chart / "values.yaml").read_text().splitlines()) == []
    assert undocumented_values(["a:", "  b: 1"]) == ["b: 1"]  # the check itself can fail


CONTRACT = [
    "replicaCount",
    "image.repository",
    "image.tag",
    "secrets.apiKeys",
    "secrets.openaiApiKey",
    "existingSecret",
    "persistence.enabled",
    "persistence.size",
    "persistence.existingClaim",
    "redis.enabled",
    "externalRedis.url",
    "database.url",
    "config.rateLimit",
    "config.llmProvider",
    "config.openaiModel",
    "config.openaiBaseUrl",
]


@pytest.mark.parametrize("dotted", CONTRACT)
def test_the_contract_value_names_exist(dotted: str) -> None:
    node = yaml.safe_load((CHART / "values.yaml").read_text())
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, dotted
        node = node[part]


def test_notes_print_working_port_forward_and_curl_commands() -> None:
    result = helm("install", "ra", str(CHART), "--dry-run=client", "-f", str(DEFAULT))
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl port-forward --namespace default svc/ra-reasoning-agent 8000:8000" in notes
    assert 'curl -s localhost:8000/task -H "X-API-Key: $API_KEY"' in notes
    assert "helm test --namespace default ra" in notes

    # Run the key-reading pipeline from the notes on the Secret's real data, as kubectl would give it.
    pipeline = re.search(r"jsonpath='\{\.data\.([^}]+)\}' \| (.+)\)$", notes, re.MULTILINE)
    assert pipeline, notes
    secret = find(
        render(DEFAULT, sets={"secrets.apiKeys": f"first:{CI_KEY}\\,second:x" + "y" * 20}),
        "Secret",
        "ra-reasoning-agent-api-keys",
    )
    encoded = secret["data"][pipeline.group(1).replace("\\.", ".")]
    key = subprocess.run(
        ["bash", "-c", pipeline.group(2)], input=encoded, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert key == CI_KEY


def test_helm_test_pod_calls_healthz_with_a_key_from_the_secret() -> None:
    text = helm("template", "ra", str(CHART), "-f", str(DEFAULT)).stdout
    pod = next(d for d in yaml.safe_load_all(text) if d and d["kind"] == "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert "http://ra-reasoning-agent:8000/healthz" in script
    assert "sys.exit(0 if response.status == 200 else 1)" in script
    assert pod["spec"]["volumes"][0]["secret"]["secretName"] == "ra-reasoning-agent-api-keys"
    compile(script, "helm-test", "exec")  # the script is valid Python


def test_k8s_manifests_are_the_chart_rendered_with_the_kind_values() -> None:
    rendered = helm(
        "template",
        "reasoning-agent",
        str(CHART),
        "-f",
        str(REPO / "k8s" / "kind-values.yaml"),
        "--kube-version",
        KUBE_VERSION,
        "--skip-tests",
    ).stdout
    committed = (REPO / "k8s" / "reasoning-agent.yaml").read_text()
    header, _, body = committed.partition("\n---\n")
    assert header.startswith("# Generated by `make manifests`")
    assert body.strip() == rendered.split("---\n", 1)[1].strip(), "run `make manifests`"
    json.dumps([d for d in yaml.safe_load_all(body) if d])  # parses


def test_metrics_port_service_monitor_and_dashboard() -> None:
    docs = render(
        DEFAULT,
        sets={"metrics.serviceMonitor.enabled": "true", "metrics.dashboard.enabled": "true"},
    )
    configmap = find(docs, "ConfigMap", "ra-reasoning-agent")
    assert configmap["data"]["METRICS_PORT"] == "9100"
    container = app_deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container["ports"]
    service = find(docs, "Service", "ra-reasoning-agent")
    assert {"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"} in service[
        "spec"
    ]["ports"]

    monitor = find(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    labels = service["metadata"]["labels"]
    assert all(labels[k] == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())

    board = find(docs, "ConfigMap", "ra-reasoning-agent-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(board["data"]["reasoning-agent.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "reasoning-agent.json").read_text())

    # Every metric a panel queries is one the service exports and the README documents.
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"`(reasoning_agent_\w+)`", readme))
    queried = {
        re.sub(r"_bucket$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"reasoning_agent_\w+", target["expr"])
    }
    assert queried and queried <= documented, queried - documented
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {
        "Errors and 429s",
        "LLM retries / s",
        "Tokens / s by key",
        "Time added over the LLM (/task)",
    } <= titles
    assert (CHART / "dashboards" / "reasoning-agent.png").stat().st_size > 10_000

    off = render(DEFAULT, sets={"metrics.port": "0"})
    assert "METRICS_PORT" not in find(off, "ConfigMap", "ra-reasoning-agent")["data"]
    assert [p["name"] for p in find(off, "Service", "ra-reasoning-agent")["spec"]["ports"]] == [
        "http"
    ]


def test_worker_pods_run_only_where_they_can_share_the_database_and_the_queue() -> None:
    sqlite = render(DEFAULT)
    assert find(sqlite, "ConfigMap", "ra-reasoning-agent")["data"]["TASK_RUNNER"] == "local"
    assert not [d for d in sqlite if d["metadata"]["name"] == "ra-reasoning-agent-worker"]

    docs = render(EXTERNAL, sets={"worker.replicaCount": "4"})
    assert find(docs, "ConfigMap", "ra-reasoning-agent")["data"]["TASK_RUNNER"] == "arq"
    worker = find(docs, "Deployment", "ra-reasoning-agent-worker")
    assert worker["spec"]["replicas"] == 4
    pod = worker["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["worker"]
    env = env_of(container)
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "database-url"
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "redis-url"
    worker_labels = worker["spec"]["template"]["metadata"]["labels"]
    job_labels = find(docs, "Job")["spec"]["template"]["metadata"]["labels"]
    selectors = [
        app_deployment(docs)["spec"]["selector"]["matchLabels"],
        find(docs, "Service", "ra-reasoning-agent")["spec"]["selector"],
        find(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:  # the HTTP pods' selectors pick neither workers nor hook pods
        for labels in (worker_labels, job_labels):
            assert not all(labels.get(k) == v for k, v in selector.items()), selector

    off = render(EXTERNAL, sets={"worker.enabled": "false"})
    assert find(off, "ConfigMap", "ra-reasoning-agent")["data"]["TASK_RUNNER"] == "local"


POD_WIDE = {
    "podAnnotations.team": "ml",
    "podLabels.cost-centre": "cc-42",
    "nodeSelector.pool": "llm",
    "tolerations[0].key": "dedicated",
    "tolerations[0].operator": "Exists",
    "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    ".nodeSelectorTerms[0].matchExpressions[0].key": "zone",
    "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    ".nodeSelectorTerms[0].matchExpressions[0].operator": "Exists",
    "extraEnv[0].name": "HTTPS_PROXY",
    "extraEnv[0].value": "http://proxy:3128",
    "extraVolumes[0].name": "ca",
    "extraVolumes[0].configMap.name": "company-ca",
    "extraVolumeMounts[0].name": "ca",
    "extraVolumeMounts[0].mountPath": "/etc/ssl/company",
}


def test_pod_wide_values_reach_the_server_the_worker_and_the_migration_job_alike() -> None:
    docs = render(EXTERNAL, sets=POD_WIDE)
    templates = {
        "server": app_deployment(docs)["spec"]["template"],
        "worker": find(docs, "Deployment", "ra-reasoning-agent-worker")["spec"]["template"],
        "migrate": find(docs, "Job")["spec"]["template"],
    }
    for component, template in templates.items():
        metadata, pod = template["metadata"], template["spec"]
        assert metadata["labels"]["app.kubernetes.io/component"] == component
        assert metadata["labels"]["cost-centre"] == "cc-42", component
        assert metadata["annotations"]["team"] == "ml", component
        assert pod["nodeSelector"] == {"pool": "llm"}, component
        assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}], component
        assert "nodeAffinity" in pod["affinity"], component
        assert {"name": "ca", "configMap": {"name": "company-ca"}} in pod["volumes"], component
        container = pod["containers"][0]
        assert env_of(container)["HTTPS_PROXY"]["value"] == "http://proxy:3128", component
        assert {"name": "ca", "mountPath": "/etc/ssl/company"} in container["volumeMounts"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, component
    # a hook runs before the chart's ServiceAccount exists: the Job's pod names none
    assert "serviceAccountName" not in templates["migrate"]["spec"]
    assert templates["worker"]["spec"]["serviceAccountName"] == "ra-reasoning-agent"


def test_every_object_names_its_component_and_selectors_pick_only_their_own() -> None:
    docs = render(EXTERNAL, sets={"podDisruptionBudget.enabled": "true"})
    ours = [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/name") != "redis"]
    server = [d for d in ours if d["kind"] in ("Deployment", "Service", "PodDisruptionBudget")]
    for doc in server:
        if doc["metadata"]["name"].endswith("-worker"):
            assert doc["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
            continue
        assert doc["metadata"]["labels"]["app.kubernetes.io/component"] == "server", doc["kind"]
        selector = doc["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector["app.kubernetes.io/component"] == "server", doc["kind"]
    for doc in ours:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "reasoning-agent"
    assert find(docs, "Job")["metadata"]["labels"]["app.kubernetes.io/component"] == "migrate"


def test_every_impossible_combination_is_refused_in_one_place() -> None:
    assert "podDisruptionBudget needs an external database" in render_error(
        DEFAULT, sets={"podDisruptionBudget.enabled": "true"}
    )
    templates = CHART / "templates"
    failing = sorted(
        path.name
        for path in [*templates.glob("*.yaml"), *templates.glob("*.tpl")]
        if "fail " in path.read_text()
    )
    assert failing == ["_helpers.tpl"]


def test_the_migration_hooks_secret_is_deleted_with_the_hook() -> None:
    """It holds the database URL and its password; nothing needs it after the migration."""
    docs = render(EXTERNAL)
    hook_objects = [
        d
        for d in docs
        if "helm.sh/hook" in d["metadata"].get("annotations", {})
        and not d["metadata"]["name"].endswith("-api-keys")  # kept, for the pods to mount
    ]
    kinds = sorted(
        d["kind"]
        for d in hook_objects
        if "pre-install" in d["metadata"]["annotations"]["helm.sh/hook"]
    )
    assert kinds == ["Job", "Secret"]
    for doc in hook_objects:
        policy = doc["metadata"]["annotations"].get("helm.sh/hook-delete-policy", "")
        assert {"before-hook-creation", "hook-succeeded"} <= set(policy.split(",")), doc["kind"]


def test_worker_pods_have_a_liveness_probe_that_checks_their_heartbeat() -> None:
    worker = find(render(EXTERNAL), "Deployment", "ra-reasoning-agent-worker")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["reasoning-agent", "worker", "--check"]


@pytest.mark.parametrize(
    ("sets", "named"),
    [
        ({"config.otel.OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer abc"}, "secrets.otel"),
        ({"config.otel.OTEL_RESOURCE_ATTRIBUTES": "api_key=abc"}, "secrets.otel"),
        ({"config.openaiBaseUrl": "https://user:pass@llm.example/v1"}, "secrets.openaiBaseUrl"),
    ],
)
def test_a_credential_is_refused_a_place_in_the_configmap(sets: dict, named: str) -> None:
    assert named in render_error(DEFAULT, sets=sets)


def test_credential_values_go_to_the_secret_and_reach_every_container_from_there() -> None:
    headers, url = "authorization=Bearer otel-token-1", "https://u:llm-pass-1@llm.example/v1"
    docs = render(
        EXISTING,
        sets={
            "secrets.otel.OTEL_EXPORTER_OTLP_HEADERS": headers,
            "secrets.openaiBaseUrl": url,
            "config.otel.OTEL_SERVICE_NAME": "ra",
        },
    )
    secret = find(docs, "Secret", "ra-reasoning-agent")
    assert base64.b64decode(secret["data"]["OTEL_EXPORTER_OTLP_HEADERS"]).decode() == headers
    assert base64.b64decode(secret["data"]["openai-base-url"]).decode() == url
    text = yaml.safe_dump([d for d in docs if d["kind"] != "Secret"])
    assert "otel-token-1" not in text and "llm-pass-1" not in text
    assert find(docs, "ConfigMap", "ra-reasoning-agent")["data"]["OTEL_SERVICE_NAME"] == "ra"
    env = env_of(app_deployment(docs)["spec"]["template"]["spec"]["containers"][0])
    for name, key in (
        ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"),
        ("OPENAI_BASE_URL", "openai-base-url"),
    ):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "ra-reasoning-agent", "key": key}


def policies(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}


def test_redis_admits_only_the_server_and_worker_pods_by_default() -> None:
    docs = render(DEFAULT)
    redis = policies(docs)["ra-redis"]
    redis_pod = find(docs, "Deployment", "ra-redis")["spec"]["template"]["metadata"]["labels"]
    assert all(redis_pod[k] == v for k, v in redis["podSelector"]["matchLabels"].items())
    (rule,) = redis["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    (peer,) = rule["from"]
    selector = peer["podSelector"]

    def admitted(labels: dict) -> bool:
        if not all(labels.get(k) == v for k, v in selector["matchLabels"].items()):
            return False
        return all(labels.get(e["key"]) in e["values"] for e in selector["matchExpressions"])

    external = render(EXTERNAL)
    pods = {
        "server": app_deployment(external)["spec"]["template"]["metadata"]["labels"],
        "worker": find(external, "Deployment", "ra-reasoning-agent-worker")["spec"]["template"][
            "metadata"
        ]["labels"],
        "migrate": find(external, "Job")["spec"]["template"]["metadata"]["labels"],
        "test": find(external, "Pod")["metadata"]["labels"],
    }
    assert {name for name, labels in pods.items() if admitted(labels)} == {"server", "worker"}


def test_the_shutdown_delay_is_the_servers_alone_and_can_be_turned_off() -> None:
    docs = render(EXTERNAL, sets={"shutdownDelaySeconds": "12"})
    server = app_deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    assert server["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "12"]
    worker = find(docs, "Deployment", "ra-reasoning-agent-worker")["spec"]["template"]["spec"]
    assert "lifecycle" not in worker["containers"][0]  # no Service sends it connections
    off = render(EXTERNAL, sets={"shutdownDelaySeconds": "0"})
    assert "lifecycle" not in app_deployment(off)["spec"]["template"]["spec"]["containers"][0]


def test_the_metrics_port_has_its_own_peers_so_a_scraper_is_not_held_to_the_apis() -> None:
    docs = render(EXTERNAL)  # its ingressFrom admits one namespace to the API
    app = policies(docs)["ra-reasoning-agent"]
    by_port = {rule["ports"][0]["port"]: rule.get("from") for rule in app["ingress"]}
    ingress_nginx = {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}
    test_pod = find(docs, "Pod")["metadata"]["labels"]
    ingress, own_test = by_port["http"]
    assert ingress == {"namespaceSelector": ingress_nginx}
    assert own_test["podSelector"]["matchLabels"].items() <= test_pod.items()  # helm test
    server_pod = app_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert not own_test["podSelector"]["matchLabels"].items() <= server_pod.items()
    assert by_port["metrics"] == [{"podSelector": {}}]  # any pod of the namespace, by default
    assert by_port["metrics"] != by_port["http"]
