"""The chart on a real Kubernetes (../shared/k8s: API server, scheduler, controller manager,
kubelet with containerd, kube-proxy, CoreDNS, Helm 4): what a new user and then an operator do,
step by step. The tests run in file order and share one cluster and one release.

`make test-cluster` runs this module apart from the image tests (it uses the Docker engine and
the host's network as a whole), beside the PostgreSQL pass. With RA_TEST_KUBECONFIG it runs
against that cluster instead (CI's kind job), whose nodes already hold the app's images.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

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
NEXT_IMAGE = "reasoning-agent:0.1.1"  # the image an upgrade rolls to
REDIS_IMAGE = "public.ecr.aws/docker/library/redis:7.4.2-alpine"  # the bundled Redis's default
POSTGRES_IMAGE = "postgres:17-alpine"  # the stand-in the compose test builds too
NAMESPACE = "ra"
RELEASE = "ra"
KEYS_SECRET = f"{RELEASE}-reasoning-agent-api-keys"


@dataclass(frozen=True)
class Cluster:
    env: dict[str, str]
    namespace: str = NAMESPACE
    release: str = RELEASE
    made: list[str] = field(default_factory=list)  # the namespaces to delete at the end

    def within(self, namespace: str, *, release: str = RELEASE, restricted: bool = True) -> Cluster:
        """The same cluster, in a new namespace (PodSecurity `restricted` enforced by default)."""
        run("kubectl", "create", "namespace", namespace, env=self.env)
        self.made.append(namespace)
        if restricted:
            run(
                "kubectl",
                "label",
                "namespace",
                namespace,
                "pod-security.kubernetes.io/enforce=restricted",
                env=self.env,
            )
        return replace(self, namespace=namespace, release=release)

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 180, input: str | None = None
    ) -> str:
        return run(
            "kubectl",
            "-n",
            self.namespace,
            *args,
            env=self.env,
            check=check,
            timeout=timeout,
            input=input,
        ).stdout

    def helm(
        self, *args: str, check: bool = True, timeout: float = 400
    ) -> subprocess.CompletedProcess[str]:
        return run("helm", "-n", self.namespace, *args, env=self.env, check=check, timeout=timeout)

    def install(
        self, *values: Path, sets: tuple[str, ...] = (), set_json: tuple[str, ...] = ()
    ) -> None:
        """`helm install` with these values files and `--set`s, waiting for every pod."""
        options = [f"--values={file}" for file in values]
        options += [f"--set={value}" for value in sets]
        options += [f"--set-json={value}" for value in set_json]
        self.helm("install", self.release, str(CHART), "--wait", "--timeout", "5m", *options)

    def upgrade(self, *sets: str) -> None:
        """`helm upgrade --reuse-values` with these `--set`s, waiting for the roll."""
        options = [item for value in sets for item in ("--set", value)]
        self.helm(
            "upgrade",
            self.release,
            str(CHART),
            "--reuse-values",
            "--wait",
            "--timeout",
            "5m",
            *options,
        )

    def helm_test_passes(self) -> bool:
        return "Phase:          Succeeded" in self.helm("test", self.release).stdout

    def key(self, secret: str = KEYS_SECRET, field: str = "api-keys") -> str:
        """The first API key, read from the Secret as the NOTES and the README do."""
        encoded = self.kubectl("get", "secret", secret, "-o", f"jsonpath={{.data.{field}}}")
        first = base64.b64decode(encoded).decode().replace("\n", ",").split(",")[0]
        return first.split(":", 1)[1] if ":" in first else first

    def app_pod(self) -> str:
        """The running server pods' names, space-separated."""
        return self.kubectl(
            "get",
            "pods",
            "-l",
            f"app.kubernetes.io/instance={self.release},app.kubernetes.io/component=server",
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
            [
                "kubectl",
                "-n",
                self.namespace,
                "port-forward",
                f"svc/{self.release}-reasoning-agent",
                f"{port}:8000",
            ],
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
        made: list[str] = []
        try:
            yield Cluster(env, made=made)
        finally:
            for namespace in made:
                run("kubectl", "delete", "namespace", namespace, "--wait", env=env, check=False)
        return
    up, down, load = kit_script("up.sh"), KIT / "down.sh", KIT / "load-image.sh"
    work = tmp_path_factory.mktemp("cluster")
    started = time.monotonic()
    with docker_engine():
        if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
            stand_in_base_image()
        docker("build", "--network", "host", "--tag", APP_IMAGE, str(REPO), timeout=900)
        docker("tag", APP_IMAGE, NEXT_IMAGE)
        docker("save", "-o", str(work / "app.tar"), APP_IMAGE, NEXT_IMAGE)
        # Stand-ins kept in the engine, as the compose test keeps its own.
        if docker("image", "inspect", POSTGRES_IMAGE, check=False).returncode != 0:
            run(str(REPO / ".ci" / "make-postgres-image.sh"), POSTGRES_IMAGE, timeout=600)
        docker("save", "-o", str(work / "postgres.tar"), POSTGRES_IMAGE)
        if docker("image", "inspect", REDIS_IMAGE, check=False).returncode != 0:
            run(str(KIT / "redis" / "make-redis-image.sh"), REDIS_IMAGE, timeout=600)
        docker("save", "-o", str(work / "redis.tar"), REDIS_IMAGE)
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
        for archive in ("app.tar", "redis.tar", "postgres.tar"):
            run(str(load), str(work / archive), env=env, timeout=300)
        print(f"\ncluster up with its images in {time.monotonic() - started:.0f} s")
        yield Cluster(env)
    finally:
        run(str(down), "--wipe", env={**os.environ, **state}, check=False, timeout=300)


def test_an_install_with_no_values_is_admitted_under_restricted_and_passes_helm_test(
    cluster: Cluster,
) -> None:
    cluster = cluster.within(NAMESPACE)
    cluster.install()
    assert cluster.app_pod()
    assert cluster.helm_test_passes()
    probed = cluster.kubectl(
        "get",
        "events",
        "--field-selector",
        "reason=Unhealthy",
        "-o",
        'jsonpath={range .items[*]}{.involvedObject.name}: {.message}{"\\n"}{end}',
    )
    # A startup probe exists to fail until the server listens; any other failure is a defect.
    failed = [line for line in probed.splitlines() if line and "Startup probe" not in line]
    assert failed == [], probed
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


# PostgreSQL and Redis as small Deployments, at the addresses ci/external-values.yaml names.
STAND_INS = """
apiVersion: v1
kind: Namespace
metadata: {name: db}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: postgres, namespace: db}
spec:
  selector: {matchLabels: {app: postgres}}
  template:
    metadata: {labels: {app: postgres}}
    spec:
      securityContext: {runAsUser: 70, runAsGroup: 70, fsGroup: 70}
      containers:
        - name: postgres
          image: %(postgres)s
          env:
            - {name: POSTGRES_USER, value: agent}
            - {name: POSTGRES_PASSWORD, value: db-password-ci}
            - {name: POSTGRES_DB, value: agent}
            - {name: PGDATA, value: /var/lib/postgresql/data/pgdata}
          ports: [{containerPort: 5432}]
          readinessProbe:
            exec: {command: [pg_isready, -U, agent, -d, agent, -h, 127.0.0.1]}
            periodSeconds: 2
          volumeMounts:
            - {name: data, mountPath: /var/lib/postgresql/data}
            - {name: run, mountPath: /var/run/postgresql}
      volumes: [{name: data, emptyDir: {}}, {name: run, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: postgres, namespace: db}
spec:
  selector: {app: postgres}
  ports: [{port: 5432}]
---
apiVersion: v1
kind: Namespace
metadata: {name: cache}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: redis, namespace: cache}
spec:
  selector: {matchLabels: {app: redis}}
  template:
    metadata: {labels: {app: redis}}
    spec:
      securityContext: {runAsUser: 999, runAsGroup: 1000}
      containers:
        - name: redis
          image: %(redis)s
          args: [--requirepass, redis-password-ci]
          ports: [{containerPort: 6379}]
          readinessProbe: {tcpSocket: {port: 6379}, periodSeconds: 2}
          volumeMounts: [{name: data, mountPath: /data}]
      volumes: [{name: data, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: redis, namespace: cache}
spec:
  selector: {app: redis}
  ports: [{port: 6379}]
---
# The Prometheus Operator's kind, schemaless: enough for the API server to take the chart's object.
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors,
          singular: servicemonitor}
  versions:
    - name: v1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"""

CI_VALUES = CHART / "ci"
SCALED = "scaled"  # the namespace of the PostgreSQL release
CI_KEY = "ci-key-0123456789abcdef"  # ci/external-values.yaml's first key


def test_the_existing_secret_values_install_and_pass_helm_test(cluster: Cluster) -> None:
    """ci/existing-secret-values.yaml: the keys and the volume made outside the chart."""
    cluster.helm("uninstall", RELEASE, "--wait", "--ignore-not-found")  # room for what follows
    own = cluster.within("own-secret", release="own")
    own.kubectl(
        "create",
        "secret",
        "generic",
        "reasoning-agent-keys",
        "--from-literal=keys.txt=team:team-key-0123456789abcdef",
        "--from-literal=openai=sk-unused",
    )
    own.kubectl(
        "apply",
        "-f",
        "-",
        input="""
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: reasoning-agent-data}
spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
""",
    )
    own.install(CI_VALUES / "existing-secret-values.yaml")
    assert own.helm_test_passes()
    assert own.key("reasoning-agent-keys", "keys\\.txt") == "team-key-0123456789abcdef"
    with own.forwarded() as base_url:
        reply = httpx.post(
            f"{base_url}/task",
            json={"prompt": "their own secret"},
            headers={"X-API-Key": "team-key-0123456789abcdef"},
        )
    assert reply.status_code == 200, reply.text
    own.helm("uninstall", own.release, "--wait")
    run("kubectl", "delete", "namespace", own.namespace, "--wait", env=cluster.env)
    own.made.remove(own.namespace)


@pytest.fixture(scope="module")
def scaled(cluster: Cluster) -> Cluster:
    """ci/external-values.yaml on PostgreSQL and Redis pods: 2 server pods kept by an HPA, the
    migration hook, the worker, a PDB; no limit low enough to refuse the roll test's calls."""
    stand_ins = STAND_INS % {"postgres": POSTGRES_IMAGE, "redis": REDIS_IMAGE}
    run("kubectl", "apply", "-f", "-", input=stand_ins, env=cluster.env)
    cluster.made.extend(["db", "cache"])
    for where in ("db/postgres", "cache/redis"):
        namespace, name = where.split("/")
        run(
            "kubectl", "-n", namespace, "rollout", "status", f"deployment/{name}",
            "--timeout=3m", env=cluster.env, timeout=200,
        )  # fmt: skip
    release = cluster.within(SCALED, release="scaled")
    release.install(
        CI_VALUES / "external-values.yaml",
        sets=(
            "config.llmProvider=mock",
            "config.rateLimit=1000000/minute",
            "autoscaling.enabled=true",
        ),
        # The ingress controller the file admits, and the in-cluster caller of the roll test.
        set_json=(
            "networkPolicy.ingressFrom=["
            '{"namespaceSelector": {"matchLabels": '
            '{"kubernetes.io/metadata.name": "ingress-nginx"}}},'
            '{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "caller"}}}]',
        ),
    )
    return release


def test_the_scaled_out_values_install_with_their_hook_worker_hpa_and_pdb(scaled: Cluster) -> None:
    objects = scaled.kubectl("get", "hpa,pdb,deployments,servicemonitors", "-o", "name").split()
    name = f"{scaled.release}-reasoning-agent"
    for expected in (
        f"horizontalpodautoscaler.autoscaling/{name}",
        f"poddisruptionbudget.policy/{name}",
        f"deployment.apps/{name}-worker",
        f"servicemonitor.monitoring.coreos.com/{name}",
    ):
        assert expected in objects
    assert migrations_completed(scaled), "the migration hook Job did not run"
    deadline = time.monotonic() + 120
    while len(scaled.app_pod().split()) < 2:  # the HPA's minReplicas
        assert time.monotonic() < deadline, "the HPA never scaled the server to 2 pods"
        time.sleep(2)
    scaled.kubectl("rollout", "status", f"deployment/{name}", "--timeout=3m", timeout=200)
    assert scaled.helm_test_passes()


def test_a_background_task_submitted_to_one_replica_finishes_on_the_worker(
    scaled: Cluster,
) -> None:
    headers = {"X-API-Key": CI_KEY}
    with scaled.forwarded() as base_url:
        accepted = httpx.post(
            f"{base_url}/task", json={"prompt": "later", "mode": "async"}, headers=headers
        )
        assert accepted.status_code == 202, accepted.text
        task_id = accepted.json()["id"]
        deadline = time.monotonic() + 60
        while (task := httpx.get(f"{base_url}/task/{task_id}", headers=headers).json())[
            "status"
        ] in ("queued", "running"):
            assert time.monotonic() < deadline, task
            time.sleep(0.5)
    assert task["status"] == "completed" and task["answer"], task
    worker_logs = scaled.kubectl(
        "logs", f"deployment/{scaled.release}-reasoning-agent-worker", "--tail=-1"
    )
    assert task_id in worker_logs


def migrations_completed(cluster: Cluster) -> list[str]:
    """When the migration hook's Job completed, one time per run (from the Job's events)."""
    return cluster.kubectl(
        "get",
        "events",
        "--field-selector",
        f"involvedObject.kind=Job,involvedObject.name={cluster.release}-reasoning-agent-migrate,"
        "reason=Completed",
        "-o",
        'jsonpath={range .items[*]}{.lastTimestamp}{"\\n"}{end}',
    ).split()


# Calls the Service without pause until told to stop; one line per failure, then the counts.
CALLER = """
apiVersion: v1
kind: Pod
metadata: {name: caller, labels: {app.kubernetes.io/name: caller}}
spec:
  restartPolicy: Never
  securityContext:
    runAsNonRoot: true
    runAsUser: 65534
    seccompProfile: {type: RuntimeDefault}
  containers:
    - name: caller
      image: busybox:1.37
      command: [sh, -c]
      args:
        - |
          ok=0; failed=0; n=0
          while [ ! -e /tmp/stop ] && [ $n -lt 50000 ]; do
            n=$((n + 1))
            if wget -q -T 10 -O /dev/null --header "X-API-Key: %(key)s" \\
                --header "Content-Type: application/json" --post-data '{"prompt": "roll"}' \\
                http://%(service)s:8000/task 2>/tmp/error; then
              ok=$((ok + 1)); echo $ok > /tmp/ok
            else
              failed=$((failed + 1)); echo "FAILED $(date +%%T) $(cat /tmp/error)"
            fi
          done
          echo "ok=$ok failed=$failed"
      securityContext:
        allowPrivilegeEscalation: false
        capabilities: {drop: [ALL]}
      volumeMounts: [{name: tmp, mountPath: /tmp}]
  volumes: [{name: tmp, emptyDir: {}}]
"""


def test_an_image_upgrade_migrates_first_and_fails_no_call_during_the_roll(
    scaled: Cluster,
) -> None:
    name = f"{scaled.release}-reasoning-agent"
    scaled.kubectl("apply", "-f", "-", input=CALLER % {"key": CI_KEY, "service": name})
    scaled.kubectl("wait", "--for=condition=Ready", "pod/caller", "--timeout=60s")

    def calls() -> int:
        done = scaled.kubectl("exec", "caller", "--", "cat", "/tmp/ok", check=False).strip()
        return int(done or 0)

    deadline = time.monotonic() + 60
    while calls() < 20:
        assert time.monotonic() < deadline, "the caller never got through"
        time.sleep(0.5)
    before = len(migrations_completed(scaled))
    scaled.upgrade(f"image.tag={NEXT_IMAGE.split(':')[1]}")
    scaled.kubectl("rollout", "status", f"deployment/{name}", "--timeout=3m", timeout=200)
    time.sleep(3)  # calls to the new pods only
    scaled.kubectl("exec", "caller", "--", "touch", "/tmp/stop")
    scaled.kubectl(
        "wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/caller", "--timeout=60s"
    )
    log = scaled.kubectl("logs", "caller")
    counts = dict(part.split("=") for part in log.strip().splitlines()[-1].split())
    assert int(counts["failed"]) == 0, log
    assert int(counts["ok"]) > 50, log

    pods = json.loads(
        scaled.kubectl("get", "pods", "-l", "app.kubernetes.io/component=server", "-o", "json")
    )["items"]
    images = [
        pod["spec"]["containers"][0]["image"]
        for pod in pods
        if "deletionTimestamp" not in pod["metadata"]  # the old ones may still be stopping
    ]
    assert images and all(image.endswith(NEXT_IMAGE) for image in images), images
    completed = migrations_completed(scaled)
    assert len(completed) == before + 1, "the upgrade ran no migration hook"
    new_set = scaled.kubectl(
        "get", "rs", "-l", "app.kubernetes.io/component=server", "-o",
        "jsonpath={range .items[*]}{.spec.template.spec.containers[0].image} "
        "{.metadata.creationTimestamp}{\"\\n\"}{end}",
    )  # fmt: skip
    rolled_at = next(
        line.split()[1] for line in new_set.splitlines() if line.split()[0].endswith(NEXT_IMAGE)
    )
    assert max(completed) <= rolled_at, (completed, rolled_at)  # the hook ran before the roll


# A workload with no API key: its projected service-account tokens, one minted for the
# service's audience and one for another, each used to create a task and read it back.
TOKEN_CALLER = """
apiVersion: v1
kind: Pod
metadata: {name: token-caller, labels: {app.kubernetes.io/name: caller}}
spec:
  serviceAccountName: batch
  automountServiceAccountToken: false
  restartPolicy: Never
  securityContext:
    runAsNonRoot: true
    runAsUser: 65534
    seccompProfile: {type: RuntimeDefault}
  containers:
    - name: caller
      image: busybox:1.37
      command: [sh, -c]
      args:
        - |
          for token in ra other; do
            auth="Authorization: Bearer $(cat /var/run/secrets/tokens/$token)"
            made=$(wget -q -T 10 -O - --header "$auth" --header "Content-Type: application/json" \\
              --post-data '{"prompt": "from a pod"}' http://%(service)s:8000/task 2>&1)
            echo "$token POST $made"
            id=$(echo "$made" | sed -n 's/.*"id":"\\([0-9a-f]*\\)".*/\\1/p')
            if [ -n "$id" ]; then
              echo "$token GET $(wget -q -T 10 -O - --header "$auth" http://%(service)s:8000/task/$id 2>&1)"
            fi
          done
      securityContext:
        allowPrivilegeEscalation: false
        capabilities: {drop: [ALL]}
      volumeMounts: [{name: tokens, mountPath: /var/run/secrets/tokens, readOnly: true}]
  volumes:
    - name: tokens
      projected:
        sources:
          - serviceAccountToken: {path: ra, audience: %(audience)s, expirationSeconds: 600}
          - serviceAccountToken: {path: other, audience: someone-else, expirationSeconds: 600}
"""


def test_a_pod_calls_with_its_service_account_token_and_no_key(scaled: Cluster) -> None:
    """oidc.kubernetes: the cluster's own issuer, its keys read through the API server."""
    scaled.upgrade("oidc.enabled=true", "oidc.kubernetes=true")
    name = f"{scaled.release}-reasoning-agent"
    binding = run(
        "kubectl", "get", "clusterrolebinding", f"{name}-{scaled.namespace}-issuer-discovery",
        "-o", "jsonpath={.roleRef.name}", env=scaled.env,
    ).stdout  # fmt: skip
    assert binding == "system:service-account-issuer-discovery"
    scaled.kubectl("create", "serviceaccount", "batch")
    scaled.kubectl("apply", "-f", "-", input=TOKEN_CALLER % {"service": name, "audience": name})
    scaled.kubectl(
        "wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/token-caller", "--timeout=120s",
        timeout=150,
    )  # fmt: skip
    lines = scaled.kubectl("logs", "token-caller").splitlines()
    posted = next(line for line in lines if line.startswith("ra POST ")).split(" ", 2)[2]
    if not posted.startswith("{"):
        server = scaled.kubectl(
            "logs", "-l", "app.kubernetes.io/component=server", "--tail=-1", "--prefix",
            check=False,
        )  # fmt: skip
        said = [line for line in server.splitlines() if "/task" in line or "token" in line]
        pytest.fail(f"the token was not taken: {posted}\n" + "\n".join(said[-20:]))
    made = json.loads(posted)
    principal = f"oidc:system:serviceaccount:{scaled.namespace}:batch"
    assert made["owner"] == principal and made["status"] == "completed", made
    read = json.loads(next(line for line in lines if line.startswith("ra GET ")).split(" ", 2)[2])
    assert read["id"] == made["id"] and read["owner"] == principal
    refused = next(line for line in lines if line.startswith("other POST "))
    assert "401" in refused, lines  # minted for another audience
    assert not any(line.startswith("other GET ") for line in lines)
    # The key still works beside the tokens, and sees none of the service account's tasks.
    with scaled.forwarded() as base_url:
        mine = httpx.get(f"{base_url}/task/{made['id']}", headers={"X-API-Key": CI_KEY})
    assert mine.status_code == 404
