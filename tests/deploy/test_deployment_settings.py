"""The rule that keeps studies from splitting: with CONVTUNE_DEPLOYMENT=distributed (the images' default)
the API and the workers refuse a study storage that is a local file, naming the settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.api.settings import ApiSettings
from workers.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = [ApiSettings, WorkerSettings]
POSTGRES = "postgresql://convtune:secret@postgres:5432/convtune"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("CONVTUNE_")]:
        monkeypatch.delenv(key)


@pytest.mark.parametrize("settings", SETTINGS)
def test_single_host_is_the_default_and_keeps_the_journal_file(settings):
    s = settings()
    assert s.deployment == "single-host" and s.study_storage == ".convtune/studies.journal"


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("storage", [".convtune/studies.journal", "/var/lib/convtune/studies.journal", "sqlite:///studies.db", "file:///x"])
def test_distributed_refuses_a_local_file_and_names_the_settings(settings, storage, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CONVTUNE_DEPLOYMENT", "distributed")
    monkeypatch.setenv("CONVTUNE_STUDY_STORAGE", storage)
    with pytest.raises(ValidationError) as refused:
        settings()
    message = str(refused.value)
    assert "CONVTUNE_STUDY_STORAGE" in message and "CONVTUNE_DEPLOYMENT=distributed" in message and storage in message


@pytest.mark.parametrize("settings", SETTINGS)
def test_distributed_refuses_the_default_storage_too(settings, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CONVTUNE_DEPLOYMENT", "distributed")
    with pytest.raises(ValidationError, match="CONVTUNE_STUDY_STORAGE"):
        settings()


@pytest.mark.parametrize("settings", SETTINGS)
def test_distributed_accepts_a_database_every_host_reaches(settings, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CONVTUNE_DEPLOYMENT", "distributed")
    monkeypatch.setenv("CONVTUNE_STUDY_STORAGE", POSTGRES)
    assert settings().study_storage == POSTGRES


@pytest.mark.parametrize("settings", SETTINGS)
def test_a_refusal_does_not_print_the_other_settings_secrets(settings, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CONVTUNE_DEPLOYMENT", "distributed")
    monkeypatch.setenv("CONVTUNE_REDIS_URL", "redis://:hunter2-redis@redis:6379/0")
    with pytest.raises(ValidationError) as refused:
        settings()
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize("settings", SETTINGS)
def test_an_unknown_deployment_is_refused(settings, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CONVTUNE_DEPLOYMENT", "cluster")
    with pytest.raises(ValidationError, match="deployment"):
        settings()


def _start(argv: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVTUNE_")}
    env["TMPDIR"] = str(tmp)  # gunicorn's config makes its metrics folder there
    env.update(CONVTUNE_DEPLOYMENT="distributed", CONVTUNE_STUDY_STORAGE="/srv/studies.journal", CONVTUNE_AUTH_DISABLED="true",
               CONVTUNE_REDIS_URL="redis://127.0.0.1:9/0", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT, check=False)


@pytest.mark.integration  # starts the process
def test_the_api_process_refuses_to_start(tmp_path: Path):
    started = _start([sys.executable, "-m", "gunicorn", "-c", "python:service.api.gunicorn_conf", "--workers", "1", "--bind", "127.0.0.1:0",
                      "service.api:create_app()"], tmp_path)
    assert started.returncode != 0
    assert "CONVTUNE_STUDY_STORAGE='/srv/studies.journal' is a local file, but CONVTUNE_DEPLOYMENT=distributed" in started.stdout + started.stderr


@pytest.mark.integration  # starts the process
def test_a_worker_process_refuses_to_start(tmp_path: Path):
    started = _start([sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-P", "solo", "-Q", "cpu"], tmp_path)
    assert started.returncode != 0
    assert "CONVTUNE_STUDY_STORAGE='/srv/studies.journal' is a local file, but CONVTUNE_DEPLOYMENT=distributed" in started.stdout + started.stderr
