"""The chart on a real Kubernetes (../shared/k8s: API server, scheduler, controller manager,
kubelet with containerd, kube-proxy, CoreDNS, Helm 4): what a new user and then an operator do,
step by step. The tests run in file order and share one cluster and one release.

`make test-cluster` runs this module alone, after the rest of the suite (it uses the Docker
engine and the host's network as a whole). With RA_TEST_KUBECONFIG it runs against that cluster
instead (CI's kind job), whose nodes already hold the app's image.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.deploy.conftest import (
    BASE_IMAGE,
    CHART,
    KIT,
    docker,
    docker_engine,
    kit_script,
    run,
    stand_in_base_image,
)
from tests.support import REPO, free_port

pytestmark = [pytest.mark.timeout(900), pytest.mark.database_agnostic]

APP_IMAGE = "reasoning-agent:0.1.0"  # the chart's default image
REDIS_IMAGE = "public.ecr.aws/docker/library/redis:7.4.2-alpine"  # the bundled Redis's default
NAMESPACE = "ra"
RELEASE = "ra"
SERVICE = f"svc/{RELEASE}-reasoning-agent"
KEYS_SECRET = f"{RELEASE}-reasoning-agent-api-keys"


@dataclass
class Cluster:
    env: dict[str, str]

    def kubectl(self, *args: str, check: bool = True, timeout: float = 180) -> str:
        return run(
            "kubectl", "-n", NAMESPACE, *args, env=self.env, check=check, timeout=timeout
        ).stdout

    def helm(
        self, *args: str, check: bool = True, timeout: float = 400
    ) -> subprocess.CompletedProcess[str]:
        return run("helm", "-n", NAMESPACE, *args, env=self.env, check=check, timeout=timeout)

    def upgrade(self, *sets: str) -> None:
        """`helm upgrade --reuse-values` with these `--set`s, waiting for the roll."""
        options = [item for value in sets for item in ("--set", value)]
        self.helm(
            "upgrade", RELEASE, str(CHART), "--reuse-values", "--wait", "--timeout", "5m", *options
        )

    def key(self) -> str:
        """The first API key, read from the Secret as the NOTES and the README do."""
        encoded = self.kubectl("get", "secret", KEYS_SECRET, "-o", "jsonpath={.data.api-keys}")
        first = base64.b64decode(encoded).decode().replace("\n", ",").split(",")[0]
        return first.split(":", 1)[1] if ":" in first else first

    def app_pod(self) -> str:
        return self.kubectl(
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/component=server",
            "--field-selector",
            "status.phase=Running",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ).strip()

    @contextlib.contextmanager
    def forwarded(self) -> Iterator[str]:
        """`kubectl port-forward` to the Service, as the README says; the base URL. It follows
        one pod, so it is made again after every roll."""
        port = free_port()
        process = subprocess.Popen(
            ["kubectl", "-n", NAMESPACE, "port-forward", SERVICE, f"{port}:8000"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base_url}/livez", timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, "the port-forward never answered"
                time.sleep(0.3)
            yield base_url
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    given = os.environ.get("RA_TEST_KUBECONFIG")
    if given:
        env = {**os.environ, "KUBECONFIG": given}
        try:
            yield Cluster(env)
        finally:
            run("kubectl", "delete", "namespace", NAMESPACE, "--wait", env=env, check=False)
        return
    up, down, load = kit_script("up.sh"), KIT / "down.sh", KIT / "load-image.sh"
    work = tmp_path_factory.mktemp("cluster")
    started = time.monotonic()
    with docker_engine():
        if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
            stand_in_base_image()
        docker("build", "--network", "host", "--tag", APP_IMAGE, str(REPO), timeout=900)
        docker("save", "-o", str(work / "app.tar"), APP_IMAGE)
    # The chart's Redis image, made by the kit without Docker.
    run(
        str(KIT / "redis" / "make-redis-image.sh"), "--output", str(work / "redis.tar"), timeout=600
    )
    state = {
        "K8S_STATE": str(work / "k8s"),
        "K8S_CACHE": str(REPO / ".tools" / "k8s-cache"),  # etcd's download, kept between runs
        "PATH": f"{REPO}/.tools/bin:{os.environ['PATH']}",  # make tools' helm and kubectl
    }
    try:
        printed = run(
            "bash",
            "-c",
            f'E=$("{up}") || exit 1; eval "$E"; env -0',
            env={**os.environ, **state},
            timeout=600,
        ).stdout
        env = dict(line.split("=", 1) for line in printed.split("\0") if "=" in line)
        for archive in ("app.tar", "redis.tar"):
            run(str(load), str(work / archive), env=env, timeout=300)
        print(f"\ncluster up with both images in {time.monotonic() - started:.0f} s")
        yield Cluster(env)
    finally:
        run(str(down), "--wipe", env={**os.environ, **state}, check=False, timeout=300)


def test_an_install_with_no_values_is_admitted_under_restricted_and_passes_helm_test(
    cluster: Cluster,
) -> None:
    run("kubectl", "create", "namespace", NAMESPACE, env=cluster.env)
    cluster.kubectl(
        "label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted"
    )
    cluster.helm("install", RELEASE, str(CHART), "--wait", "--timeout", "5m")
    assert cluster.app_pod()
    assert "Phase:          Succeeded" in cluster.helm("test", RELEASE).stdout
    unhealthy = cluster.kubectl(
        "get", "events", "--field-selector", "reason=Unhealthy", "-o", "name"
    )
    assert unhealthy.strip() == "", unhealthy  # no probe failed, the bundled Redis's included
    key = cluster.key()
    assert len(key) >= 43 and cluster.kubectl(
        "get", "secret", KEYS_SECRET, "-o", "jsonpath={.data.api-keys}"
    )


def test_the_readme_commands_reach_the_service(cluster: Cluster) -> None:
    headers = {"X-API-Key": cluster.key()}
    with cluster.forwarded() as base_url:
        assert httpx.get(f"{base_url}/query", headers=headers).status_code == 200
        answer = httpx.post(f"{base_url}/task", json={"prompt": "no provider"}, headers=headers)
        assert answer.status_code == 503  # no OpenAI key: what the NOTES warn of
        assert "not configured" in answer.json()["error"]["message"]
        assert httpx.get(f"{base_url}/query").status_code == 401


def test_an_upgrade_with_a_new_key_and_limit_rolls_the_pod(cluster: Cluster) -> None:
    old_key, old_pod = cluster.key(), cluster.app_pod()
    new_key = f"ops-{uuid.uuid4().hex}"
    cluster.upgrade(
        "config.llmProvider=mock", "config.rateLimit=2/minute", f"secrets.apiKeys=ops:{new_key}"
    )
    assert cluster.app_pod() != old_pod
    with cluster.forwarded() as base_url:
        assert httpx.get(f"{base_url}/query", headers={"X-API-Key": old_key}).status_code == 401
        headers = {"X-API-Key": new_key}
        statuses = [
            httpx.post(f"{base_url}/task", json={"prompt": f"limited {i}"}, headers=headers)
            for i in range(3)
        ]
    assert [s.status_code for s in statuses] == [200, 200, 429]
    assert int(statuses[2].headers["Retry-After"]) > 0


def test_a_key_rotated_by_hand_survives_an_upgrade_and_a_rollback(cluster: Cluster) -> None:
    """Helm 4 applies server-side: a hand edit of a Secret Helm applies would make the next
    upgrade and rollback conflict. The keys' Secret is a hook, so both succeed."""
    # Back to the chart's own key, which keeps what the Secret holds.
    cluster.upgrade("secrets.apiKeys=", "config.rateLimit=100/minute")
    rotated = f"rotated-{uuid.uuid4().hex}"
    encoded = base64.b64encode(f"default:{rotated}".encode()).decode()
    cluster.kubectl("patch", "secret", KEYS_SECRET, "-p", f'{{"data":{{"api-keys":"{encoded}"}}}}')
    cluster.upgrade("config.queryRateLimit=1000/minute")
    assert cluster.key() == rotated
    cluster.helm("rollback", RELEASE, "--wait")
    history = cluster.helm("history", RELEASE, "-o", "json").stdout
    assert '"status":"failed"' not in history.replace(" ", "")
    assert cluster.key() == rotated
    with cluster.forwarded() as base_url:
        reply = httpx.post(
            f"{base_url}/task", json={"prompt": "rotated"}, headers={"X-API-Key": rotated}
        )
    assert reply.status_code == 200, reply.text


def test_a_task_outlives_its_pod_and_the_release(cluster: Cluster) -> None:
    headers = {"X-API-Key": cluster.key()}
    with cluster.forwarded() as base_url:
        task = httpx.post(f"{base_url}/task", json={"prompt": "keep me"}, headers=headers).json()
    cluster.kubectl("delete", "pod", cluster.app_pod(), "--wait=true")
    cluster.kubectl("rollout", "status", "deployment", f"{RELEASE}-reasoning-agent", "--timeout=3m")
    with cluster.forwarded() as base_url:
        again = httpx.get(f"{base_url}/task/{task['id']}", headers=headers)
    assert again.status_code == 200 and again.json()["answer"] == task["answer"]

    cluster.helm("uninstall", RELEASE, "--wait")
    kept = cluster.kubectl("get", "pvc,secret", "-o", "name").split()
    assert f"persistentvolumeclaim/{RELEASE}-reasoning-agent" in kept
    assert f"secret/{KEYS_SECRET}" in kept
    cluster.helm("install", RELEASE, str(CHART), "--wait", "--set", "config.llmProvider=mock")
    with cluster.forwarded() as base_url:
        found = httpx.get(f"{base_url}/task/{task['id']}", headers=headers)
    assert found.status_code == 200 and found.json()["prompt"] == "keep me"
