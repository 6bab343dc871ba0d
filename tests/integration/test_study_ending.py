"""A study extended while its last step is ending it: reopened for its new trials, never left ended while they run.

The step that leaves nothing in flight records the study's results and ends its parent run
(:func:`workers.study.report.finish_study`); ``POST /studies/{id}/extend`` raises the budget and
reopens an ended run. An extension landing while the step was recording (about 1 s of figures
before issue 10's SVGs, a few ms now) found the run still open, left it as it was, and the step then
ended it: the study read ``succeeded`` while the added trials ran, and ``convtune study wait`` (or
a test) returned early. Both sides now write before they read (the extension its budget, the step
the run's end) and act on what the other wrote. These tests replay the step's ending in this process
against a real Redis and a real MLflow server, with the extension's budget landing at each moment.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import optuna
import pytest
import redis as redis_lib
from mlflow.tracking import MlflowClient

from models.spec.study import StudySpec
from models.store import runs
from models.store.budget import StudyBudget
from models.store.search import distribution
from workers.settings import WorkerSettings
from workers.study import report

BASE = {"model": {"channels": [4, 8], "convs_per_stage": 1}, "optim": {"epochs": 1}, "data": {"name": "digits"}}


@pytest.fixture()
def ending(redis_url: str, mlflow_uri: str):
    """A study whose one trial completed and whose last step is about to end it: its parent RUNNING, nothing in flight."""
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment(f"study-ending-{uuid.uuid4().hex[:8]}")
    parent = client.create_run(experiment).info.run_id
    spec = StudySpec.model_validate({"base": BASE, "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}, "n_trials": 1})
    stored = optuna.create_study(direction="maximize")
    trial = stored.ask({"optim.lr": distribution(spec.search_space["optim.lr"])})
    stored.tell(trial, 0.9)
    r = redis_lib.Redis.from_url(redis_url)
    budget = StudyBudget(r, parent)
    budget.open(1, 1, claimed=1)  # its one slot claimed and released: idle
    rt = SimpleNamespace(mlflow=client, redis=r, settings=WorkerSettings(redis_url=redis_url, mlflow_tracking_uri=mlflow_uri))
    yield SimpleNamespace(rt=rt, parent=parent, spec=spec, stored=stored, budget=budget, client=client)
    r.delete(budget.key, budget.released_key)


def finish(e: SimpleNamespace) -> str:
    report.finish_study(e.parent, e.rt, e.stored, e.spec, "")
    return e.client.get_run(e.parent).info.status


def test_without_an_extension_the_last_step_ends_the_study(ending) -> None:
    assert finish(ending) == "FINISHED"
    assert ending.client.get_run(ending.parent).data.tags["convtune.outcome"] == "succeeded"


def test_an_extension_before_the_ending_keeps_the_study_open(ending) -> None:
    ending.budget.add(2)  # the extension's budget landed while the step recorded the results
    assert finish(ending) == "RUNNING"
    assert "convtune.outcome" not in ending.client.get_run(ending.parent).data.tags


def test_an_extension_as_the_run_ends_reopens_it(ending, monkeypatch: pytest.MonkeyPatch) -> None:
    real_end_run = runs.end_run

    def end_run_as_the_extension_lands(*args, **kwargs):
        ending.budget.add(2)  # after the step's check, before its end: the extension read the run still open
        real_end_run(*args, **kwargs)

    monkeypatch.setattr(report.runs, "end_run", end_run_as_the_extension_lands)
    assert finish(ending) == "RUNNING"


def test_an_extension_that_claimed_its_slots_already_keeps_the_study_open(ending) -> None:
    ending.budget.add(1)
    assert ending.budget.top_up().slots == [2]  # its step is in flight
    assert finish(ending) == "RUNNING"


def test_a_stopped_study_ends_whatever_its_budget_says(ending) -> None:
    ending.budget.add(2)
    ending.budget.stop("target")
    assert finish(ending) == "FINISHED"


def test_a_study_another_process_is_finishing_is_left_to_it(ending) -> None:
    key = f"{ending.budget.key}:finishing"
    ending.rt.redis.set(key, "another-process", ex=60)
    assert finish(ending) == "RUNNING"  # the reconciler, say, while a slow step records it
    assert "convtune.outcome" not in ending.client.get_run(ending.parent).data.tags
    assert ending.rt.redis.get(key) == b"another-process"  # not taken from its holder
    ending.rt.redis.delete(key)  # the holder died before ending it: its key expires, and the next one finishes it
    assert finish(ending) == "FINISHED" and not ending.rt.redis.exists(key)


def test_two_processes_finishing_a_study_at_once_record_it_once(ending, monkeypatch) -> None:
    import threading
    import time

    recorded: list[str] = []
    real = report._log_artifacts

    def slow(*args, **kwargs):  # figures and tables of a large study: seconds, long enough for a second finisher to come
        recorded.append(threading.current_thread().name)
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "_log_artifacts", slow)
    finishers = [threading.Thread(target=finish, args=(ending,), name=f"finisher-{i}") for i in range(2)]
    for t in finishers:
        t.start()
    for t in finishers:
        t.join(60)
    assert len(recorded) == 1, recorded
    assert ending.client.get_run(ending.parent).info.status == "FINISHED"
