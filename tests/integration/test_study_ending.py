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

pytestmark = pytest.mark.integration  # a real mlflow server


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


@pytest.mark.parametrize("value", ["last_epoch", "best_epoch"])
def test_a_trial_that_succeeded_before_its_step_told_optuna_counts_with_its_value(ending, value) -> None:
    """Its step ended the run and died (or the storage failed) before telling Optuna: the run, the record, says how it ended."""
    from mlflow.entities import Metric

    from models.store.search import USER_ATTR

    spec = StudySpec.model_validate({
        "base": BASE, "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}, "n_trials": 2,
        "objective": {"metric": "val_accuracy", "value": value},
    })
    trial = ending.stored.ask({"optim.lr": distribution(spec.search_space["optim.lr"])})
    run_id = ending.client.create_run(ending.client.get_run(ending.parent).info.experiment_id).info.run_id
    trial.set_user_attr(USER_ATTR.TRIAL_ID, run_id)
    epochs = [Metric("val_accuracy", v, 0, step) for step, v in enumerate((0.5, 0.99, 0.95), start=1)]
    ending.client.log_batch(run_id, metrics=epochs)
    runs.end_run(ending.client, run_id, "FINISHED", "succeeded", "trained 3 epochs", tags={runs.TAG.EPOCHS_DONE: "3"})

    report.finish_study(ending.parent, ending.rt, ending.stored, spec, "")
    told = ending.stored.trials[trial.number]
    assert told.state == optuna.trial.TrialState.COMPLETE, told.user_attrs
    assert told.value == pytest.approx(0.99 if value == "best_epoch" else 0.95)
    assert told.user_attrs[USER_ATTR.OUTCOME] == "succeeded" and told.user_attrs[USER_ATTR.EPOCHS] == 3
    parent = ending.client.get_run(ending.parent).data
    assert parent.metrics["best_trial_number"] == trial.number and parent.metrics["trials_succeeded"] == 1
    assert "trials_worker_lost" not in parent.metrics
