"""deploy/ci: the gate script brings up a real stack, runs a study and fails the job on an unmet bar;
the GitHub Actions and GitLab CI files validate against their vendors' schemas and call it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.integration

CI = ROOT / "deploy" / "ci"


@pytest.mark.parametrize(("file", "schema"), [("github-actions.yml", "vendor.github-workflows"), ("gitlab-ci.yml", "vendor.gitlab-ci")])
def test_ci_files_are_valid_and_run_the_gate(file, schema):
    checker = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    result = subprocess.run([checker, "--builtin-schema", schema, str(CI / file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (CI / file).read_text()
    assert "deploy/ci/convtune-gate.sh deploy/ci/study.yaml" in text and "--require 'val_accuracy>=" in text and "convtune-junit.xml" in text
    yaml.safe_load(text)


def test_the_example_study_is_a_valid_spec():
    from models.spec.study import StudySpec

    StudySpec.model_validate(yaml.safe_load((CI / "study.yaml").read_text()))


def test_gate_script_fails_the_job_when_the_requirement_is_not_met(tmp_path):
    study = {
        "name": "ci gate test", "base": {"model": {"channels": [8, 16], "convs_per_stage": 1}, "optim": {"epochs": 2, "batch_size": 64}, "data": {"name": "digits"}},
        "search_space": {"optim.lr": {"type": "categorical", "choices": [0.003, 0.01]}}, "sampler": {"name": "grid"}, "n_trials": 2, "parallelism": 1,
    }
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump(study))
    reports = tmp_path / "reports"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVTUNE_", "MLFLOW_", "PROMETHEUS_"))}
    env.update({
        # A Redis port nobody serves: `convtune up` starts its own redis-server there, as on a bare CI runner,
        # and the session's worker (on the session's Redis) cannot take this stack's messages.
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}", "CONVTUNE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "CONVTUNE_HOME": str(tmp_path / "home"),
        "CONVTUNE_API_PORT": str(free_port()), "CONVTUNE_MLFLOW_PORT": str(free_port()), "CONVTUNE_REPORTS": str(reports),
        "CONVTUNE_CPU_WORKERS": "1", "CONVTUNE_STUDY_STORAGE": str(tmp_path / "studies.journal"), "OMP_NUM_THREADS": "1",
    })
    result = subprocess.run(
        ["bash", str(CI / "convtune-gate.sh"), str(spec), "--require", "val_accuracy>=1.01", "--timeout", "300"],
        capture_output=True, text=True, env=env, timeout=540, cwd=tmp_path,
    )
    up_log = (tmp_path / "home" / "up.log").read_text(errors="replace") if (tmp_path / "home" / "up.log").exists() else ""
    assert result.returncode == 4, f"{result.stdout}\n{result.stderr}\n{up_log[-3000:]}"
    assert "requirement not met" in result.stdout and "convtune exited 4" in result.stdout
    document = json.loads((reports / "convtune-result.json").read_text())
    assert document["status"] == "succeeded" and document["passed"] is False  # it ran: only the bar was missed
    suite = ET.parse(reports / "convtune-junit.xml").getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    assert "❌" in (reports / "convtune-summary.md").read_text()
