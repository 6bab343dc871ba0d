"""deploy/k8s, run as host processes with exactly the environment the pods get.

Each workload's container (Deployment or StatefulSet, Flower's from deploy/k8s/flower) runs as in
tests/deploy/containers.py, with the environment the kubelet would give it: the ConfigMap's keys
(envFrom), then its ``env`` in order, ``$(NAME)`` expanded from what is defined before it, values from
a Secret convtune-secrets made the way deploy/README.md says, and from the ConfigMap. Service names
are the manifests' Services; a claim is one folder shared by every pod that mounts it (the workers'
ReadWriteMany checkpoints), a StatefulSet's claim template one per pod. Two worker pods, one API pod,
then a study to its end, the logins, and a trial whose pod dies resuming on the other pod.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.deploy.containers import (
    ROOT,
    Container,
    Deployment,
    check_logins,
    container,
    dockerfile_images,
    keep_logs_if_failed,
    make_token,
    public_image,
    resume_on_the_other_worker,
    run_a_study_on_two_workers,
    stack_home,
    start_stack,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]

K8S = ROOT / "deploy" / "k8s"
MANIFESTS = [*sorted(K8S.glob("*.yaml")), *sorted((K8S / "flower").glob("*.yaml"))]


def documents() -> list[dict[str, Any]]:
    return [d for path in MANIFESTS if path.name != "kustomization.yaml" for d in yaml.safe_load_all(path.read_text()) if d]


def secret_keys(docs: list[dict[str, Any]]) -> dict[str, bool]:
    """Every key of convtune-secrets a pod reads, and whether it may be absent."""
    keys: dict[str, bool] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("secretKeyRef")
            if ref and ref["name"] == "convtune-secrets":
                keys[ref["key"]] = keys.get(ref["key"], True) and bool(ref.get("optional"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(docs)
    return keys


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's $(NAME): a variable defined before it; $$(NAME) is a literal $(NAME)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def pod_env(spec: dict[str, Any], configmaps: dict[str, dict[str, str]], secret: dict[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for var in spec.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(str(var["value"]), env)
            continue
        ref = var["valueFrom"]
        if "secretKeyRef" in ref:
            key = ref["secretKeyRef"]["key"]
            if key in secret:
                env[var["name"]] = secret[key]
            else:
                assert ref["secretKeyRef"].get("optional"), f"the Secret has no {key}"
        else:
            env[var["name"]] = configmaps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
    return env


def k8s_containers(docs: list[dict[str, Any]], secret: dict[str, str], replicas: dict[str, int]) -> list[Container]:
    stages = dockerfile_images()
    configmaps = {d["metadata"]["name"]: {k: str(v) for k, v in d["data"].items()} for d in docs if d["kind"] == "ConfigMap"}
    services = [d for d in docs if d["kind"] == "Service"]
    out = []
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        pod = workload["spec"]["template"]
        labels = pod["metadata"]["labels"]
        # The address others reach it by: its Service (the workers have none).
        service = next((s["metadata"]["name"] for s in services if s["spec"]["selector"].items() <= labels.items()), workload["metadata"]["name"])
        (spec,) = pod["spec"]["containers"]
        image_name = spec["image"]
        image = stages[image_name.removeprefix("convtune-")] if image_name.startswith("convtune-") else public_image(image_name)
        ports = [p["containerPort"] for p in spec.get("ports", [])]
        assert sorted(ports) == sorted(image.expose), f"{workload['metadata']['name']}: containerPorts {ports}, image exposes {image.expose}"
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        env = pod_env(spec, configmaps, secret)
        command = [expand(a, env) for a in spec["command"]] if "command" in spec else None
        args = [expand(a, env) for a in spec["args"]] if "args" in spec else None
        for i in range(replicas.get(workload["metadata"]["name"], 1)):
            name = f"{workload['metadata']['name']}-{i}"
            mounts = {}
            for mount in spec.get("volumeMounts", []):
                if mount["name"] in templates:
                    mounts[mount["mountPath"]] = f"pvc:{mount['name']}-{name}"
                elif "persistentVolumeClaim" in volumes[mount["name"]]:
                    mounts[mount["mountPath"]] = f"pvc:{volumes[mount['name']]['persistentVolumeClaim']['claimName']}"
                else:
                    mounts[mount["mountPath"]] = f"pod:{name}:{mount['name']}"
            # k8s: command replaces the image's ENTRYPOINT, args its CMD.
            out.append(container(name, service, image, env, args, command, mounts))
    return out


@pytest.fixture(scope="module")
def k8s(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    docs = documents()
    token, entry = make_token("deploy-test")
    values = {key: secrets.token_hex(16) for key in secret_keys(docs)}
    values.update({"auth-tokens": json.dumps([json.loads(entry)]), "flower-basic-auth": f"operator:{secrets.token_hex(16)}"})
    containers = k8s_containers(docs, values, replicas={"convtune-worker": 2, "convtune-api": 1})
    started = time.monotonic()
    stack = start_stack(stack_home("k8s"), containers)
    print(f"k8s stack up in {time.monotonic() - started:.1f}s")
    yield Deployment(stack, values, token)
    stack.stop()
    keep_logs_if_failed(request, stack.home)


def test_the_readme_secret_command_creates_every_key_the_pods_read():
    readme = (ROOT / "deploy" / "README.md").read_text()
    for key in secret_keys(documents()):
        assert f"{key}=" in readme, f"deploy/README.md does not create the Secret key {key}"


def test_a_study_runs_to_the_end_on_two_worker_pods(k8s: Deployment):
    run_a_study_on_two_workers(k8s)


def test_mlflow_redis_and_flower_refuse_anyone_without_the_secret(k8s: Deployment):
    configmap = next(d for d in documents() if d["kind"] == "ConfigMap")
    check_logins(k8s, configmap["data"]["MLFLOW_TRACKING_USERNAME"], k8s.secrets["mlflow-admin-password"], k8s.secrets["redis-password"],
                 k8s.secrets["flower-basic-auth"])


def test_a_trial_whose_worker_pod_dies_resumes_on_the_other_pod_from_the_read_write_many_claim(k8s: Deployment):
    configmap = next(d for d in documents() if d["kind"] == "ConfigMap")
    resume_on_the_other_worker(k8s, configmap["data"]["MLFLOW_TRACKING_USERNAME"], k8s.secrets["mlflow-admin-password"])


def test_the_api_pod_sees_the_data_claim_and_a_teams_npz_trial_trains(k8s: Deployment):
    import numpy as np

    from tests.deploy.containers import wait_json

    # The token `convtune token deploy-test` made has no --team: its team is named as it, and reads /data/deploy-test/.
    folder = k8s.stack.net.volume("pvc:convtune-data") / "deploy-test"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.savez(folder / "blobs.npz", images=rng.normal(size=(60, 10, 10, 3)).astype(np.float32), labels=np.arange(60) % 3)
    trial = {"model": {"channels": [8], "convs_per_stage": 1}, "optim": {"lr": 3e-3, "epochs": 1, "batch_size": 32}, "queue": "cpu"}
    with k8s.api() as api:
        missing = api.post("/trials", json={**trial, "data": {"name": "npz", "path": "none.npz"}})
        assert missing.status_code == 422 and missing.json()["detail"] == "none.npz: no such file under the data root", missing.text
        response = api.post("/trials", json={**trial, "data": {"name": "npz", "path": "blobs.npz"}})
        assert response.status_code == 202, response.text
        assert response.json()["params_count"] > 0  # sized at submit: the API pod reads the claim
        ended = wait_json(api, f"/trials/{response.json()['id']}", lambda t: t["status"] not in ("queued", "running"), 180, "npz trial")
        assert ended["status"] == "succeeded", ended
