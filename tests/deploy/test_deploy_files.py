"""The Dockerfile, compose file and k8s manifests are valid, checked offline by linters shipped as wheels,
and say what the deployment needs: pinned bases, nothing installed at start, one shared study storage,
authentication in front of every service, checkpoints on a volume every worker shares."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
TARGETS = ("api", "worker", "mlflow", "flower", "postgres")


def _run(argv: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None, clean_env: bool = False) -> subprocess.CompletedProcess:
    # The tools come as wheels into the virtualenv, whose bin/ need not be on PATH.
    tool = shutil.which(argv[0], path=str(Path(sys.executable).parent)) or shutil.which(argv[0])
    if tool is None:
        pytest.fail(f"{argv[0]} is not installed: it comes with the test extras (pip install -e '.[test]')")
    base = {"PATH": os.environ.get("PATH", "")} if clean_env else dict(os.environ)
    return subprocess.run([tool, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=60, env={**base, **(env or {})}, check=False)


def example_env() -> dict[str, str]:
    """deploy/.env.example as compose reads it, plus a token list (which the example leaves to the operator)."""
    env = dict(line.split("=", 1) for line in (ROOT / "deploy" / ".env.example").read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {**env, "CONVTUNE_AUTH_TOKENS": "[]"}


def compose_config(env: dict[str, str]) -> dict:
    result = _run(["docker-compose", "-f", "docker-compose.yml", "--profile", "flower", "config", "--format", "json"], cwd=ROOT / "deploy", env=env, clean_env=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def k8s_documents(folder: Path = K8S) -> list[dict]:
    return [d for p in sorted(folder.glob("*.yaml")) if p.name != "kustomization.yaml" for d in yaml.safe_load_all(p.read_text()) if d]


def stage(name: str) -> str:
    text = (ROOT / "Dockerfile").read_text()
    return text.split(f"AS {name}\n", 1)[1].split("\nFROM ", 1)[0]


def test_dockerfile_passes_hadolint():
    result = _run(["hadolint", "--failure-threshold", "info", "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_a_target_for_every_service_and_api_has_no_torch():
    text = (ROOT / "Dockerfile").read_text()
    for target in TARGETS:
        assert f" AS {target}\n" in text, target
    api_stage = text.split("AS api", 1)[1].split("FROM", 1)[0]
    assert "torch" not in api_stage and "[worker]" not in api_stage


def test_every_base_image_is_pinned_by_version():
    images = re.findall(r"^FROM (\S+)", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE))
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    images += [s["image"] for s in compose["services"].values() if "image" in s]
    images += [c["image"] for d in k8s_documents() if d["kind"] in ("Deployment", "StatefulSet") for c in d["spec"]["template"]["spec"]["containers"]
               if not c["image"].startswith("convtune-")]
    for image in images:
        if image in stages:
            continue
        # A release, not a moving major tag: python:3.11.11-..., redis:7.4.2-..., postgres:16.6-... (Postgres has two numbers).
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+(\.\d+)?(-[\w.-]+)?", image), f"{image}: pin the base to a release (x.y.z, or x.y for Postgres)"


def test_the_mlflow_and_flower_images_pin_what_they_install_and_mlflow_has_its_driver():
    mlflow = stage("mlflow")
    assert re.search(r'ARG MLFLOW_VERSION=\d+\.\d+\.\d+', mlflow) and '"mlflow[auth]==${MLFLOW_VERSION}"' in mlflow
    assert re.search(r'ARG PSYCOPG_VERSION=\d+\.\d+\.\d+', mlflow) and '"psycopg[binary]==${PSYCOPG_VERSION}"' in mlflow
    assert '"--app-name", "basic-auth"' in mlflow and "postgresql+psycopg://" in mlflow
    flower = stage("flower")
    assert re.search(r'ARG FLOWER_VERSION=\d+\.\d+\.\d+', flower) and re.search(r'ARG CELERY_VERSION=\d+\.\d+\.\d+', flower)


def test_nothing_is_installed_when_a_container_starts():
    files = [ROOT / "deploy" / "docker-compose.yml", *K8S.rglob("*.yaml")]
    for path in files:
        text = path.read_text()
        for word in ("pip install", "apt-get", "apk add", "uv pip", "curl ", "wget "):
            assert word not in text, f"{path.relative_to(ROOT)} installs or downloads at start: {word!r}"


def test_compose_file_is_valid_and_demands_every_secret():
    compose = ["docker-compose", "-f", "docker-compose.yml", "config", "-q"]
    result = _run(compose, cwd=ROOT / "deploy", env=example_env(), clean_env=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("CONVTUNE_AUTH_TOKENS", "REDIS_PASSWORD", "POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "CONVTUNE_DB_PASSWORD", "MLFLOW_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SECRET_KEY", "FLOWER_BASIC_AUTH"):
        refused = _run(compose, cwd=ROOT / "deploy", env={k: v for k, v in example_env().items() if k != name}, clean_env=True)
        assert refused.returncode != 0 and name in refused.stdout + refused.stderr, name


def test_compose_api_and_workers_share_the_postgres_study_storage_and_their_settings_accept_it(monkeypatch: pytest.MonkeyPatch):
    from service.api.settings import ApiSettings
    from workers.settings import WorkerSettings

    services = compose_config(example_env())["services"]
    for name, settings in (("api", ApiSettings), ("worker", WorkerSettings)):
        env = services[name]["environment"]
        assert env["CONVTUNE_DEPLOYMENT"] == "distributed"
        assert env["CONVTUNE_STUDY_STORAGE"].startswith("postgresql://convtune:") and env["CONVTUNE_STUDY_STORAGE"].endswith("@postgres:5432/convtune")
        assert env["CONVTUNE_REDIS_URL"].startswith("redis://:") and env["MLFLOW_TRACKING_PASSWORD"]
        for key in [k for k in os.environ if k.startswith("CONVTUNE_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert settings().deployment == "distributed"  # what the process reads at start: accepted
    assert services["worker"]["environment"]["CONVTUNE_CHECKPOINT_DIR"] == "/var/lib/convtune/checkpoints"
    assert {"type": "volume", "source": "checkpoints", "target": "/var/lib/convtune/checkpoints"}.items() <= next(
        v for v in services["worker"]["volumes"] if v["source"] == "checkpoints").items()
    assert services["flower"]["profiles"] == ["flower"]


def test_kubernetes_manifests_match_the_api_schemas():
    manifests = sorted(str(p.relative_to(ROOT)) for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
    assert manifests
    result = _run(["kubernetes-validate", "--strict", "-k", "1.30.0", *manifests])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("folder", [K8S, K8S / "flower"], ids=["base", "flower"])
def test_kustomization_lists_every_manifest_and_names_every_image(folder: Path):
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    present = {p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(kustomization["resources"]) == present
    used = {c["image"] for d in k8s_documents(folder) if d["kind"] in ("Deployment", "StatefulSet") for c in d["spec"]["template"]["spec"]["containers"]}
    ours = {u for u in used if u.startswith("convtune-")}
    assert ours == {i["name"] for i in kustomization["images"]}
    assert {u.removeprefix("convtune-") for u in ours} <= set(TARGETS)


def test_k8s_api_and_workers_share_the_postgres_study_storage_from_the_secret():
    docs = k8s_documents()
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert config["CONVTUNE_DEPLOYMENT"] == "distributed"
    for name in ("convtune-api", "convtune-worker"):
        (spec,) = next(d for d in docs if d["metadata"]["name"] == name and d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in spec["env"]}
        assert env["CONVTUNE_STUDY_STORAGE"]["value"] == "postgresql://convtune:$(CONVTUNE_DB_PASSWORD)@postgres:5432/convtune"
        assert env["CONVTUNE_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "convtune-db-password"
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "mlflow-admin-password"
        names = list(env)
        # $(NAME) only expands a variable defined before it.
        assert names.index("CONVTUNE_DB_PASSWORD") < names.index("CONVTUNE_STUDY_STORAGE")
        assert names.index("REDIS_PASSWORD") < names.index("CONVTUNE_REDIS_URL")


def test_the_api_and_workers_agree_on_how_long_a_queue_may_go_unserved(monkeypatch: pytest.MonkeyPatch):
    """One value for both: the API refuses a queue unserved this long, the workers' reconciler ends work left on it."""
    from service.api.settings import ApiSettings
    from workers.settings import WorkerSettings

    services = compose_config(example_env())["services"]
    assert services["api"]["environment"]["CONVTUNE_UNSERVED_QUEUE_S"] == services["worker"]["environment"]["CONVTUNE_UNSERVED_QUEUE_S"] == "900"
    docs = k8s_documents()
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    for name in ("convtune-api", "convtune-worker"):
        (spec,) = next(d for d in docs if d["metadata"]["name"] == name and d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"]
        assert {"configMapRef": {"name": "convtune-config"}} in spec["envFrom"] and "CONVTUNE_UNSERVED_QUEUE_S" not in {e["name"] for e in spec["env"]}
    monkeypatch.setenv("CONVTUNE_UNSERVED_QUEUE_S", config["CONVTUNE_UNSERVED_QUEUE_S"])
    assert ApiSettings().unserved_queue_s == WorkerSettings().unserved_queue_s == 900


def test_k8s_checkpoints_are_on_a_read_write_many_claim_every_worker_mounts():
    docs = k8s_documents()
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "convtune-checkpoints")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = next(d for d in docs if d["metadata"]["name"] == "convtune-worker")["spec"]["template"]["spec"]
    (spec,) = pod["containers"]
    checkpoint_dir = next(e["value"] for e in spec["env"] if e["name"] == "CONVTUNE_CHECKPOINT_DIR")
    mount = next(m for m in spec["volumeMounts"] if m["mountPath"] == checkpoint_dir)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == "convtune-checkpoints"


def _allowed_components(policy: dict) -> set[str]:
    out = set()
    for rule in policy["spec"].get("ingress", []):
        for peer in rule.get("from", []):
            for expr in peer.get("podSelector", {}).get("matchExpressions", []):
                out |= set(expr["values"])
            if "namespaceSelector" in peer:
                out.add("namespace:" + json.dumps(peer["namespaceSelector"], sort_keys=True))
    return out


def test_k8s_network_policies_let_only_the_api_and_workers_reach_redis_postgres_and_mlflow():
    docs = [*k8s_documents(), *k8s_documents(K8S / "flower")]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = next(p for p in policies if p["spec"]["podSelector"] == {})
    assert deny["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny["spec"]

    def allowed(component: str) -> set[str]:
        selected = [p for p in policies if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component") == component]
        assert selected, f"no NetworkPolicy selects {component}"
        return set().union(*(_allowed_components(p) for p in selected))

    ingress = 'namespace:{"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}'
    assert allowed("redis") == {"api", "worker", "flower"}
    assert allowed("postgres") == {"api", "worker", "mlflow"}
    assert allowed("mlflow") == {"api", "worker", ingress}  # people come through the ingress, and log in
    assert allowed("flower") == {ingress}


def test_the_mlflow_auth_config_holds_no_secret_and_lets_people_read_only_what_was_granted():
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "deploy" / "mlflow" / "basic_auth.ini")
    assert config["mlflow"]["default_permission"] == "NO_PERMISSIONS"  # each team's role is granted its own (docs/mlflow-access.md)
    assert config["mlflow"]["database_uri"] == "postgresql+psycopg:///mlflow_auth"  # host, user, password: libpq's PG* variables
    assert "admin_password" not in config["mlflow"]


def test_the_api_and_workers_grant_each_team_its_own_mlflow_work_as_mlflows_admin():
    """With NO_PERMISSIONS by default, the API and the workers grant teams READ (CONVTUNE_MLFLOW_TEAM_ACCESS), signed in as
    the MLflow admin the mlflow service creates: in compose and in the k8s manifests alike."""
    services = compose_config(example_env())["services"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["CONVTUNE_MLFLOW_TEAM_ACCESS"] == "true", name
        assert env["MLFLOW_TRACKING_USERNAME"] == services["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_USERNAME"], name
    configmap = next(d for d in k8s_documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "convtune-config")
    assert configmap["data"]["CONVTUNE_MLFLOW_TEAM_ACCESS"] == "true"
    mlflow = next(d for d in k8s_documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    admin = next(e for c in mlflow["spec"]["template"]["spec"]["containers"] for e in c["env"] if e["name"] == "MLFLOW_AUTH_ADMIN_USERNAME")
    assert admin["valueFrom"]["configMapKeyRef"] == {"name": "convtune-config", "key": "MLFLOW_TRACKING_USERNAME"}
    for name in ("convtune-api", "convtune-worker"):
        pod = next(d for d in k8s_documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == name)["spec"]["template"]["spec"]
        assert {"configMapRef": {"name": "convtune-config"}} in pod["containers"][0]["envFrom"], name
