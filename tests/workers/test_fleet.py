"""Heartbeats (models.store.fleet, workers.fleet) on the tests' real Redis, what they read of Celery's worker
state, and the reconciler's ending of work on a queue that lost its last worker (workers.reconciler.unserved)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from types import SimpleNamespace

import pytest
import redis
from celery import Celery
from celery.worker import state

from models.store import fleet
from models.store.budget import StudyBudget
from models.store.keys import cancel_key, lease_key
from models.store.runs import KIND, TAG
from workers.fleet import Heart
from workers.reconciler.unserved import end_unserved, stranded_on, unserved_queues
from workers.settings import WorkerSettings


@pytest.fixture()
def client(redis_url: str, monkeypatch: pytest.MonkeyPatch):
    """The tests' Redis, every fleet key under a prefix of this test's own (a session's workers may beat here too)."""
    prefix = f"test:{uuid.uuid4().hex}:"
    monkeypatch.setattr(fleet, "_PREFIX", prefix + "worker:")
    monkeypatch.setattr(fleet, "_SERVED_PREFIX", prefix + "queue:")
    monkeypatch.setattr(fleet, "_LAST_SERVED_KEY", prefix + "last_served")
    r = redis.Redis.from_url(redis_url)
    yield r
    keys = list(r.scan_iter(match=f"{prefix}*"))
    if keys:
        r.delete(*keys)


# --- the beat -------------------------------------------------------------------------------------


def test_a_beat_names_the_worker_its_queues_and_every_task_it_holds(client):
    fleet.beat(client, "cpu0@host", ["cpu", "cpu"], ["t1", "t2"], served_ttl_s=900)
    fleet.beat(client, "gpu0@host", ["gpu"], ["t3"], served_ttl_s=900)
    (cpu0,) = [w for w in fleet.live_workers(client) if w.name == "cpu0@host"]
    assert cpu0.queues == {"cpu"} and cpu0.held == {"t1", "t2"} and time.time() - cpu0.at < 5
    assert fleet.held_task_ids(client) == {"t1", "t2", "t3"}
    assert fleet.served_queues(client, ["cpu", "gpu", "other"]) == {"cpu", "gpu"}
    assert 0 < client.ttl(f"{fleet._PREFIX}cpu0@host") <= fleet.BEAT_TTL_S
    assert fleet.BEAT_TTL_S < client.ttl(fleet.queue_served_key("cpu")) <= 900  # outlives the beat: a rolling restart keeps it served


def test_a_worker_that_leaves_holds_nothing_but_its_queue_stays_served(client):
    fleet.beat(client, "cpu0@host", ["cpu"], ["t1"], served_ttl_s=900)
    fleet.leave(client, "cpu0@host")
    assert fleet.live_workers(client) == [] and fleet.held_task_ids(client) == set()
    assert fleet.served_queues(client, ["cpu"]) == {"cpu"}


def test_with_no_served_ttl_a_queue_counts_as_served_as_long_as_a_beat(client):
    fleet.beat(client, "cpu0@host", ["cpu"], [], served_ttl_s=0)
    assert 0 < client.ttl(fleet.queue_served_key("cpu")) <= fleet.BEAT_TTL_S


def test_the_last_beat_of_each_queue_is_kept_and_a_queue_never_served_starts_its_clock_when_first_asked(client):
    assert not fleet.has_record(client, ["cpu", "gpu"])
    fleet.beat(client, "callbacks@host", ["callbacks"], [], served_ttl_s=900)  # the light callback worker, up first
    assert not fleet.has_record(client, ["cpu", "gpu"])
    before = time.time()
    fleet.beat(client, "cpu0@host", ["cpu"], [], served_ttl_s=900)
    assert fleet.has_record(client, ["cpu", "gpu"]) and not fleet.has_record(client, ["gpu"])
    seen = fleet.last_served(client, ["cpu", "gpu"], now=before + 100)
    assert before <= seen["cpu"] <= time.time() and seen["gpu"] == before + 100
    assert fleet.last_served(client, ["gpu"], now=before + 500) == {"gpu": before + 100}  # its clock runs from the first time


# --- what the heart reads of Celery ---------------------------------------------------------------


class _Request:
    """What celery.worker.state's bookkeeping reads of a request."""

    def __init__(self, name: str = "convtune.run_trial"):
        self.id = uuid.uuid4().hex
        self.name = name


def test_a_heart_beats_its_node_name_queues_and_held_requests(client):
    app = Celery("fleet-test", set_as_current=False)
    app.amqp.queues.select(["cpu"])
    heart = Heart(client, SimpleNamespace(app=app, hostname="cpu7@host", controller=SimpleNamespace(concurrency=1)), served_ttl_s=900)
    request = _Request()
    state.task_scheduled(request)
    try:
        assert heart.beat()
    finally:
        state.task_ready(request)
    (beat,) = [w for w in fleet.live_workers(client) if w.name == "cpu7@host"]
    assert beat.queues == {"cpu"} and request.id in beat.held


def test_a_heart_whose_redis_fails_says_so_once_a_minute_and_beats_again_when_it_answers(client, caplog):
    app = Celery("fleet-test", set_as_current=False)
    app.amqp.queues.select(["cpu"])
    heart = Heart(redis.Redis(port=1, socket_connect_timeout=0.2), SimpleNamespace(app=app, hostname="cpu8@host", controller=SimpleNamespace(concurrency=1)), served_ttl_s=900)
    with caplog.at_level(logging.INFO, logger="workers.fleet"):
        assert not heart.beat() and not heart.beat()
        heart.client = client
        assert heart.beat()
    said = [r.getMessage() for r in caplog.records]
    assert sum("could not beat" in m for m in said) == 1 and any("beats again" in m for m in said), said


def test_a_heart_stops_when_told_and_removes_its_beat(client):
    import threading

    app = Celery("fleet-test", set_as_current=False)
    app.amqp.queues.select(["cpu"])
    heart, stop = Heart(client, SimpleNamespace(app=app, hostname="cpu9@host", controller=SimpleNamespace(concurrency=1)), served_ttl_s=900), threading.Event()
    thread = threading.Thread(target=heart.run, args=(stop,), daemon=True)
    thread.start()
    assert _wait(lambda: any(w.name == "cpu9@host" for w in fleet.live_workers(client)), 5)  # beats at once
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and not any(w.name == "cpu9@host" for w in fleet.live_workers(client))


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- the reconciler: work on a queue that lost its last worker -------------------------------------

LIMIT_S = 900


def _run(status: str = "SCHEDULED", **tags: str) -> SimpleNamespace:
    if status == "RUNNING":
        tags.setdefault(TAG.STARTED_AT, "2026-01-01T00:00:00+00:00")
    return SimpleNamespace(info=SimpleNamespace(run_id=uuid.uuid4().hex, status=status), data=SimpleNamespace(tags=dict(tags)))


class FakeSweep:
    """What end_unserved uses of a sweep (workers.reconciler.unserved.Sweeper): runs in a dict, endings recorded."""

    def __init__(self, client: redis.Redis, runs: list[SimpleNamespace], now: float, limit_s: int = LIMIT_S):
        self.redis, self.now = client, now
        self.settings = WorkerSettings(unserved_queue_s=limit_s)
        self.runs = {r.info.run_id: r for r in runs}
        self.ended: list[tuple[str, str, str, str]] = []

    def still(self, run_id: str, status: str | None, lease: str | None = None) -> bool:
        from workers.reconciler.judge import run_status

        return not (lease and self.redis.exists(lease)) and run_status(self.runs[run_id]) == status

    def end(self, run, status: str, outcome: str, reason: str, why: str, *, action: str) -> None:
        self.ended.append((run.info.run_id, status, outcome, f"{reason} (ended by the reconciler: {why})"))
        run.info.status = status


@pytest.fixture()
def queue() -> str:
    return f"q-{uuid.uuid4().hex[:8]}"  # a queue of this test's own: no session worker serves it


def test_a_queue_is_unserved_once_its_last_beat_is_older_than_the_limit(client, queue):
    fleet.beat(client, "w@host", [queue], [], served_ttl_s=LIMIT_S)
    now = time.time()
    assert unserved_queues(client, [queue], now, LIMIT_S) == {}
    (late,) = unserved_queues(client, [queue], now + LIMIT_S + 60, LIMIT_S).values()
    assert late == pytest.approx(LIMIT_S + 60, abs=5)


def test_only_standalone_work_and_studies_on_an_unserved_queue_are_stranded(queue):
    study = _run("RUNNING", **{TAG.KIND: KIND.STUDY, TAG.QUEUE: queue})
    study_trial = _run("RUNNING", **{TAG.KIND: KIND.TRIAL, TAG.QUEUE: queue, TAG.STUDY_ID: study.info.run_id})
    trial = _run(**{TAG.KIND: KIND.TRIAL, TAG.QUEUE: queue})
    test = _run(**{TAG.KIND: KIND.LR_FINDER, TAG.QUEUE: queue})
    elsewhere = _run(**{TAG.KIND: KIND.TRIAL, TAG.QUEUE: "served"})
    found = stranded_on([study, study_trial, trial, test, elsewhere], {queue: 1000.0})
    assert [(f.run, f.children) for f in found] == [(study, [study_trial]), (trial, []), (test, [])]


def test_queued_work_on_a_queue_without_a_worker_for_the_limit_is_ended_error_naming_the_queue(client, queue):
    fleet.beat(client, "w@host", [queue], [], served_ttl_s=LIMIT_S)
    trial = _run(**{TAG.KIND: KIND.TRIAL, TAG.QUEUE: queue})
    orphan = _run("RUNNING", **{TAG.KIND: KIND.LR_FINDER, TAG.QUEUE: queue})  # its worker died with the queue's last
    held = _run("RUNNING", **{TAG.KIND: KIND.TRIAL, TAG.QUEUE: queue})
    cancelled = _run(**{TAG.KIND: KIND.TRIAL, TAG.QUEUE: queue})
    client.set(lease_key(held.info.run_id), "a worker", px=60_000)
    client.set(cancel_key(cancelled.info.run_id), "1", px=60_000)
    runs = [trial, orphan, held, cancelled]
    try:
        assert end_unserved(FakeSweep(client, runs, time.time() + LIMIT_S - 30), runs) == set()  # not yet
        sweep = FakeSweep(client, runs, time.time() + LIMIT_S + 120)
        assert end_unserved(sweep, runs) == {trial.info.run_id, orphan.info.run_id}
    finally:
        client.delete(lease_key(held.info.run_id), cancel_key(cancelled.info.run_id))
    for _, status, outcome, reason in sweep.ended:
        assert (status, outcome) == ("FAILED", "error")
        assert f"no worker serves its queue '{queue}'" in reason and f"queue '{queue}' has had no worker for 17 min" in reason, reason


def test_a_queue_never_served_is_given_the_whole_limit_from_the_first_sweep_that_sees_it(client, queue):
    trial = _run(**{TAG.KIND: KIND.TRIAL, TAG.QUEUE: queue})
    now = time.time()
    assert end_unserved(FakeSweep(client, [trial], now), [trial]) == set()  # Redis restarted empty, or a new deployment
    assert end_unserved(FakeSweep(client, [trial], now + LIMIT_S - 1), [trial]) == set()
    assert end_unserved(FakeSweep(client, [trial], now + LIMIT_S), [trial]) == {trial.info.run_id}


def test_a_study_with_nothing_running_ends_error_with_its_open_trials_and_stops_its_slots(client, queue):
    study = _run("RUNNING", **{TAG.KIND: KIND.STUDY, TAG.QUEUE: queue})
    lost = _run("RUNNING", **{TAG.KIND: KIND.TRIAL, TAG.QUEUE: queue, TAG.STUDY_ID: study.info.run_id})
    budget = StudyBudget(client, study.info.run_id)
    budget.open(4, 2)
    try:
        sweep = FakeSweep(client, [study, lost], time.time() + 2 * LIMIT_S)
        fleet.last_served(client, [queue], time.time())  # first seen unserved now
        assert end_unserved(sweep, [study, lost]) == {study.info.run_id, lost.info.run_id}
        assert budget.stopped() == "error"
        assert [(run_id, outcome) for run_id, _, outcome, _ in sweep.ended] == [(lost.info.run_id, "error"), (study.info.run_id, "error")]
    finally:
        client.delete(*client.keys(f"*{study.info.run_id}*"))


def test_a_study_whose_trial_holds_a_lease_is_left_alone(client, queue):
    study = _run("RUNNING", **{TAG.KIND: KIND.STUDY, TAG.QUEUE: queue})
    running = _run("RUNNING", **{TAG.KIND: KIND.TRIAL, TAG.QUEUE: queue, TAG.STUDY_ID: study.info.run_id})
    client.set(lease_key(running.info.run_id), "a worker", px=60_000)
    try:
        fleet.last_served(client, [queue], time.time())
        assert end_unserved(FakeSweep(client, [study, running], time.time() + 2 * LIMIT_S), [study, running]) == set()
    finally:
        client.delete(lease_key(running.info.run_id))


def test_a_limit_of_zero_ends_nothing(client, queue):
    trial = _run(**{TAG.KIND: KIND.TRIAL, TAG.QUEUE: queue})
    fleet.last_served(client, [queue], 0.0)
    assert end_unserved(FakeSweep(client, [trial], time.time(), limit_s=0), [trial]) == set()


def test_a_real_sweep_offers_what_end_unserved_needs(client, queue, monkeypatch: pytest.MonkeyPatch, tmp_path):
    """end_unserved against the reconciler's own sweep (its end and still), over a fake MLflow."""
    from workers.reconciler import Reconciler
    from workers.reconciler.sweep import Clients, _Sweep

    for name in ("RECONCILER_LOCK_KEY", "RECONCILER_SUSPECTS_KEY", "RECONCILER_COUNTS_KEY"):
        monkeypatch.setattr(f"workers.reconciler.sweep.{name}", f"{fleet._LAST_SERVED_KEY}:{name}")  # under the test's prefix
    spec = {"model": {"channels": [8]}, "optim": {"epochs": 1}, "data": {"name": "digits"}, "queue": "cpu"}
    trial = _run(**{TAG.KIND: KIND.LR_FINDER, TAG.QUEUE: queue, TAG.SPEC: json.dumps({"trial": spec})})
    mlflow = SimpleNamespace(
        get_run=lambda run_id: trial, set_terminated=lambda run_id, status: setattr(trial.info, "status", status),
        log_batch=lambda run_id, metrics=(), params=(), tags=(): trial.data.tags.update({t.key: t.value for t in tags}),
    )
    settings = WorkerSettings(unserved_queue_s=LIMIT_S, study_storage=str(tmp_path / "studies.journal"))
    reconciler = Reconciler(Clients(settings, mlflow, client), lambda message, queue: None)
    assert reconciler.lock.acquire()
    fleet.last_served(client, [queue], 0.0)  # its last worker beat long ago
    sweep = _Sweep(reconciler)
    assert end_unserved(sweep, [trial]) == {trial.info.run_id}
    assert trial.info.status == "FAILED" and trial.data.tags[TAG.OUTCOME] == "error"
    assert trial.data.tags[TAG.REASON].startswith(f"no worker serves its queue '{queue}'") and "ended by the reconciler" in trial.data.tags[TAG.REASON]
    assert [(a.kind, a.action) for a in sweep.actions] == [("lr_finder", "ended")]
