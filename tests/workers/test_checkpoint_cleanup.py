"""The reconciler's checkpoint sweep: what no delivery reads again goes, an open run's checkpoint never does."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from workers.reconciler.checkpoints import sweep_checkpoints

NOW = 1_800_000_000.0
HOUR = 3600.0


class Runs:
    """MLflow's answer about each run (a status, 'deleted', 'missing' or 'down'), every lookup counted."""

    def __init__(self, **statuses: str) -> None:
        self.statuses = statuses
        self.lookups: list[str] = []

    def get_run(self, run_id: str) -> Any:
        self.lookups.append(run_id)
        status = self.statuses.get(run_id, "missing")
        if status == "missing":
            raise MlflowException(f"Run '{run_id}' not found", error_code=RESOURCE_DOES_NOT_EXIST)
        if status == "down":
            raise MlflowException("connection refused")
        stage = "deleted" if status == "deleted" else "active"
        return SimpleNamespace(info=SimpleNamespace(status="RUNNING" if status == "deleted" else status, lifecycle_stage=stage))


def file(folder: Path, name: str, age_s: float) -> Path:
    path = folder / name
    path.write_bytes(b"checkpoint")
    os.utime(path, (NOW - age_s, NOW - age_s))
    return path


def names(paths: list[Path]) -> list[str]:
    return sorted(p.name for p in paths)


def test_checkpoints_of_ended_deleted_and_unknown_runs_go_and_open_runs_keep_theirs(tmp_path: Path):
    for run in ("finished", "failed", "killed", "deleted", "gone", "queued", "running"):
        file(tmp_path, f"{run}.f2.pt", 2 * HOUR)
    file(tmp_path, "finished.f1.pt", 2 * HOUR)  # a stale holder's late write
    file(tmp_path, "running.f1.pt", 2 * HOUR)  # left to the holder, whose first write removes it
    file(tmp_path, "killed.pt", 2 * HOUR)  # from before fences
    runs = Runs(finished="FINISHED", failed="FAILED", killed="KILLED", deleted="deleted", queued="SCHEDULED", running="RUNNING")
    deleted = sweep_checkpoints(tmp_path, runs, NOW, min_age_s=HOUR)  # type: ignore[arg-type]
    assert names(deleted) == [
        "deleted.f2.pt", "failed.f2.pt", "finished.f1.pt", "finished.f2.pt", "gone.f2.pt", "killed.f2.pt", "killed.pt",
    ]
    assert names(list(tmp_path.iterdir())) == ["queued.f2.pt", "running.f1.pt", "running.f2.pt"]
    assert sorted(runs.lookups) == ["deleted", "failed", "finished", "gone", "killed", "queued", "running"], "one lookup per run"


def test_a_killed_writers_temporary_file_goes_with_its_ended_run_and_an_open_runs_stays(tmp_path: Path):
    died, writing = f"ended.f2.pt.{'a' * 32}.tmp", f"running.f2.pt.{'b' * 32}.tmp"
    file(tmp_path, died, 2 * HOUR)  # a write that died before its rename
    file(tmp_path, writing, 2 * HOUR)  # a long write going on now, or one that died: its run resumes either way
    file(tmp_path, "someone.pt.xyz.tmp", 2 * HOUR)  # not a checkpoint's
    runs = Runs(ended="FAILED", running="RUNNING")
    assert names(sweep_checkpoints(tmp_path, runs, NOW, min_age_s=HOUR)) == [died]  # type: ignore[arg-type]
    assert names(list(tmp_path.iterdir())) == [writing, "someone.pt.xyz.tmp"]


def test_young_files_and_other_files_are_left_without_asking_mlflow(tmp_path: Path):
    file(tmp_path, "finished.f3.pt", 60)
    file(tmp_path, "notes.txt", 2 * HOUR)
    runs = Runs(finished="FINISHED")
    assert sweep_checkpoints(tmp_path, runs, NOW, min_age_s=HOUR) == []  # type: ignore[arg-type]
    assert runs.lookups == [] and names(list(tmp_path.iterdir())) == ["finished.f3.pt", "notes.txt"]


def test_a_sweep_asks_about_a_bounded_number_of_runs_and_a_later_one_goes_on(tmp_path: Path):
    for i in range(5):
        file(tmp_path, f"ended{i}.f1.pt", 2 * HOUR)
    runs = Runs(**{f"ended{i}": "FINISHED" for i in range(5)})
    first = sweep_checkpoints(tmp_path, runs, NOW, min_age_s=HOUR, max_lookups=2)  # type: ignore[arg-type]
    assert len(first) == 2 and len(runs.lookups) == 2
    while list(tmp_path.iterdir()):
        sweep_checkpoints(tmp_path, runs, NOW, min_age_s=HOUR, max_lookups=2)  # type: ignore[arg-type]
    assert len(runs.lookups) == 5


def test_mlflow_down_deletes_nothing_on_a_guess(tmp_path: Path):
    file(tmp_path, "a.f1.pt", 2 * HOUR)
    runs = Runs(a="down")
    assert sweep_checkpoints(tmp_path, runs, NOW, min_age_s=HOUR) == []  # type: ignore[arg-type]
    assert (tmp_path / "a.f1.pt").exists()


@pytest.mark.parametrize("missing", ["never made", "a file"])
def test_no_checkpoint_folder_is_nothing_to_sweep(tmp_path: Path, missing: str):
    folder = tmp_path / "checkpoints"
    if missing == "a file":
        folder.write_text("not a folder")
    assert sweep_checkpoints(folder, Runs(), NOW, min_age_s=HOUR) == []  # type: ignore[arg-type]
