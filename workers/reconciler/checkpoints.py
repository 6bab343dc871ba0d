"""Checkpoints no delivery will read again, deleted: a shared volume must not fill up with them.

A worker deletes its trial's checkpoints when it ends the run (:mod:`workers.trial.execution`).
Every other ending leaves them: the reconciler's, the API's cancel of a trial no worker held, a
study step's recovery, a worker killed between ending the run and deleting the file; so do a
stale holder's late write (a lower fence's file) and the temporary file of a write that died
before its rename. :func:`sweep_checkpoints` finds them by name (``<run>.pt``, ``<run>.f<fence>.pt``,
``*.tmp``: :mod:`workers.training.train`) and asks MLflow about the run.

It never deletes a file of an open run: a queued or running trial resumes from its checkpoint, and
its temporary file may be a write going on now (a large state on a slow volume can outlast any age
chosen here; a rename that finds its file gone would fail the trial). A killed writer's temporary
file therefore goes with its run's other files, once the run has ended. Anything younger than
``min_age_s`` is left alone, whatever its run says. Each call asks MLflow about ``max_lookups``
runs at most, drawn at random among those with old files, so that a sweep costs a bounded number
of requests and open runs' files cannot starve the rest; what a call leaves, a later one finds.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from models.store.runs import TERMINAL_STATUSES
from workers.training.train import checkpoint_run

__all__ = ["TEMPORARY_SUFFIX", "sweep_checkpoints"]

log = logging.getLogger("workers.reconciler")
TEMPORARY_SUFFIX = ".tmp"  # a write's file before its rename (workers.training.train._write_checkpoint)


def sweep_checkpoints(checkpoint_dir: Path, mlflow: MlflowClient, now: float, min_age_s: float, max_lookups: int = 20) -> list[Path]:
    """Delete the checkpoints and temporary files, older than ``min_age_s``, of runs that ended or do not exist; the files deleted.

    ``now``: wall-clock seconds, as the files' modification times are. MLflow failing stops the call
    where it is (logged): the next sweep goes on, and nothing is deleted on a guess.
    """
    by_run: dict[str, list[Path]] = defaultdict(list)
    for path in _files(checkpoint_dir):
        parsed = checkpoint_run(path.name, temporary=path.name.endswith(TEMPORARY_SUFFIX))
        if parsed is not None and now - _mtime(path, now) >= min_age_s:
            by_run[parsed[0]].append(path)
    deleted: list[Path] = []
    for run_id in random.sample(sorted(by_run), min(max_lookups, len(by_run))):
        try:
            ended = _run_ended(mlflow, run_id)
        except MlflowException as exc:
            log.warning("reconciler: checkpoint sweep stopped: MLflow did not answer about run %s (%s)", run_id, exc)
            break
        if ended:
            deleted += [p for p in by_run[run_id] if _delete(p)]
    if deleted:
        log.info("reconciler: deleted %d checkpoint files of ended runs in %s", len(deleted), checkpoint_dir)
    return deleted


def _run_ended(mlflow: MlflowClient, run_id: str) -> bool:
    """Whether no delivery of ``run_id`` will read its checkpoint again: the run has ended, was deleted, or never existed."""
    try:
        run = mlflow.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return True
        raise
    return run.info.status in TERMINAL_STATUSES or run.info.lifecycle_stage == "deleted"


def _files(checkpoint_dir: Path) -> list[Path]:
    try:
        return [p for p in checkpoint_dir.iterdir() if p.is_file()]
    except OSError:
        return []  # not made yet (no trial trained here), or the volume is away: nothing to sweep


def _mtime(path: Path, now: float) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return now  # gone meanwhile (its run ended, its write renamed it): young, left alone


def _delete(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False  # a worker's ending deleted it first
    except OSError as exc:
        log.warning("reconciler: could not delete checkpoint file %s (%s)", path, exc)
        return False
    return True
