"""A process forked after the worker's main process used its lazily made pools and storages works on its own.

Celery's prefork pool forks a replacement training process (after an OOM kill, a crash) from the
worker's main process at any time, and that process has used the upload threads and the study
storage (its reconciler finishes studies). Each test uses one of them here, forks, and has the
child use it again within a bound: a child that inherited a pool without its threads would block.
"""

from __future__ import annotations

import os
import time

import pytest

from models.store.search import open_storage
from workers.training.train import CheckpointWriter
from workers.trial.tracking import Uploads

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="a platform without fork")


def _in_child(check) -> int:
    """Run ``check`` in a forked child; its exit status (0: it passed, 3: it raised, 9: it hung)."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 3
        try:
            check()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return 9


def test_a_forked_child_uploads_on_threads_of_its_own():
    assert Uploads.pool().submit(lambda: 1).result(timeout=5) == 1  # the parent made the pool and its threads
    assert _in_child(lambda: Uploads.pool().submit(lambda: 2).result(timeout=2)) == 0
    assert Uploads.pool().submit(lambda: 3).result(timeout=5) == 3  # the parent's is untouched


def test_a_forked_child_writes_checkpoints_on_a_thread_of_its_own():
    from concurrent.futures import ThreadPoolExecutor

    if CheckpointWriter._pool is None:
        CheckpointWriter._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
    assert CheckpointWriter._pool.submit(lambda: 1).result(timeout=5) == 1

    def child() -> None:
        assert CheckpointWriter._pool is None  # made again on the child's first save
    assert _in_child(child) == 0


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_forked_child_opens_its_own_study_storage(tmp_path, kind):
    import optuna

    url = str(tmp_path / "studies.journal") if kind == "journal" else f"sqlite:///{tmp_path / 'studies.db'}"
    parent = open_storage(url)
    optuna.create_study(storage=parent, study_name="s")
    pool = getattr(getattr(parent, "engine", None), "pool", None)

    def child() -> None:
        mine = open_storage(url)
        assert mine is not parent and (pool is None or mine.engine.pool is not pool)
        optuna.load_study(study_name="s", storage=mine).ask()
    assert _in_child(child) == 0
    assert open_storage(url) is parent and len(optuna.load_study(study_name="s", storage=parent).trials) == 1
