"""The reconciler: its decisions from plain values (workers.reconciler.judge), then whole sweeps over a fake
MLflow and the tests' real Redis (workers.reconciler.sweep), messages pushed where kombu keeps them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import optuna
import pytest
import redis
from mlflow.store.entities.paged_list import PagedList

from models.messages import UNACKED_INDEX_KEY, UNACKED_KEY, StudyStepMessage, TrialMessage, celery_config, give_back, send
from models.spec.study import StudySpec
from models.store import fleet
from models.store.budget import StudyBudget
from models.store.keys import cancel_key, lease_key
from models.store.runs import KIND, TAG
from models.store.search import USER_ATTR, open_storage
from tests.conftest import start_redis
from workers.reconciler import Reconciler
from workers.reconciler.judge import Seen, judge_run, judge_slot, parse_messages, unheld
from workers.reconciler.sweep import Clients, LockLost
from workers.settings import WorkerSettings

GRACE = 30.0
STALE = 330.0


def _message(task_id: str) -> bytes:
    return json.dumps({"body": "e30=", "headers": {"id": task_id, "task": "convtune.run_trial"}, "properties": {}}).encode()


def test_messages_are_read_from_queues_and_the_unacked_hash_with_how_long_they_are_held():
    unacked = {b"tag-1": json.dumps([json.loads(_message("t1")), "", "cpu"]).encode(), b"tag-2": b"not json", b"tag-3": json.dumps([{}, "", "cpu"]).encode()}
    messages = parse_messages([_message("t2"), b"garbage"], unacked, {b"tag-1": 100.0}, now=160.0)
    assert messages.waiting == {"t2"}
    assert messages.held_for("t1") == pytest.approx(60.0)
    assert messages.held_for("t2") is None


def test_the_shortest_hold_counts_when_two_workers_hold_the_same_task():
    raw = json.dumps([json.loads(_message("t1")), "", "cpu"]).encode()
    messages = parse_messages([], {b"old": raw, b"new": raw}, {b"old": 0.0, b"new": 95.0}, now=100.0)
    assert messages.held_for("t1") == pytest.approx(5.0)


@pytest.mark.parametrize("status", ["SCHEDULED", "RUNNING"])
def test_a_live_lease_carries_a_run(status):
    assert judge_run(status, Seen(lease=True, cancel=True), STALE) is None


def test_a_running_trial_without_a_lease_is_resent_at_once_even_if_a_dead_worker_holds_its_message():
    verdict = judge_run("RUNNING", Seen(lease=False, held_s=3600.0), STALE)
    assert verdict is not None and verdict.action == "resent" and not verdict.after_grace
    assert "held unacked 3600s" in verdict.why


def test_a_running_trial_whose_resent_message_was_just_taken_or_waits_is_left_alone():
    assert judge_run("RUNNING", Seen(lease=False, held_s=2.0, resent=True), STALE) is None
    assert judge_run("RUNNING", Seen(lease=False, waiting=True), STALE) is None


def test_a_running_trial_whose_dead_worker_took_its_message_a_moment_ago_is_resent_all_the_same():
    verdict = judge_run("RUNNING", Seen(lease=False, held_s=2.0), STALE)
    assert verdict is not None and verdict.action == "resent" and not verdict.after_grace


def test_a_running_trial_without_a_lease_but_with_a_cancel_flag_is_cancelled():
    verdict = judge_run("RUNNING", Seen(lease=False, cancel=True, held_s=3600.0), STALE)
    assert verdict is not None and verdict.action == "cancelled" and not verdict.after_grace


def test_a_queued_trial_with_a_message_waiting_or_held_by_a_worker_is_carried():
    assert judge_run("SCHEDULED", Seen(lease=False, waiting=True), STALE) is None
    assert judge_run("SCHEDULED", Seen(lease=False, held_s=200.0), STALE) is None  # a worker holds it (or its ETA retry)


def test_a_queued_trial_whose_message_is_held_longer_than_any_retry_waits_is_resent():
    verdict = judge_run("SCHEDULED", Seen(lease=False, held_s=7200.0), STALE)
    assert verdict is not None and verdict.action == "resent" and verdict.after_grace


def test_a_queued_trial_with_no_message_is_resent_only_after_the_grace():
    verdict = judge_run("SCHEDULED", Seen(lease=False), STALE)
    assert verdict is not None and verdict.action == "resent" and verdict.after_grace


def test_a_queued_trial_with_no_message_and_a_cancel_flag_is_cancelled_after_the_grace():
    verdict = judge_run("SCHEDULED", Seen(lease=False, cancel=True), STALE)
    assert verdict is not None and verdict.action == "cancelled" and verdict.after_grace


def test_a_slot_whose_trial_trains_or_whose_step_waits_is_carried():
    assert judge_slot("RUNNING", Seen(lease=True, held_s=5000.0), None, GRACE, STALE) is None
    assert judge_slot(None, Seen(lease=False, waiting=True), None, GRACE, STALE) is None
    assert judge_slot(None, Seen(lease=True, held_s=5000.0), None, GRACE, STALE) is None  # its step holds the slot's lease: it starts the trial
    assert judge_slot(None, Seen(lease=False, held_s=100.0), None, GRACE, STALE) is None  # its step runs, or waits to retry
    assert judge_slot("SCHEDULED", Seen(lease=False, held_s=100.0), None, GRACE, STALE) is None
    assert judge_slot(None, Seen(lease=False), "held", GRACE, STALE) is None  # it waits on the lr_auto range test


def test_a_slot_whose_trial_runs_without_a_lease_is_resent_at_once():
    verdict = judge_slot("RUNNING", Seen(lease=False, held_s=5000.0), None, GRACE, STALE)
    assert verdict is not None and verdict.action == "resent" and not verdict.after_grace
    assert judge_slot("RUNNING", Seen(lease=False, held_s=1.0, resent=True), None, GRACE, STALE) is None  # the re-sent step was just taken


def test_a_slot_with_no_message_anywhere_is_resent_after_the_grace():
    for status in (None, "SCHEDULED", "FINISHED"):
        verdict = judge_slot(status, Seen(lease=False), None, GRACE, STALE)
        assert verdict is not None and verdict.action == "resent" and verdict.after_grace, status


def test_a_slot_whose_trial_exists_and_whose_step_is_held_too_long_is_resent():
    verdict = judge_slot("SCHEDULED", Seen(lease=False, held_s=7200.0), None, GRACE, STALE)
    assert verdict is not None and verdict.action == "resent" and "7200s" in verdict.why


def test_a_slot_stuck_behind_a_lost_lr_auto_range_test_is_resent_unless_its_message_is_fresh():
    verdict = judge_slot(None, Seen(lease=False, held_s=600.0), "lost", GRACE, STALE)
    assert verdict is not None and verdict.action == "resent" and not verdict.after_grace
    assert judge_slot(None, Seen(lease=False, held_s=3.0), "lost", GRACE, STALE) is None  # a sibling's retry, taken a moment ago


def test_a_slot_with_no_trial_whose_step_is_held_longer_than_any_retry_waits_is_resent():
    # Its worker died before the trial was recorded, or its retry sits prefetched behind another trial: the
    # slot's lease (not held) lets only one delivery start the trial, so a second copy is safe.
    verdict = judge_slot(None, Seen(lease=False, held_s=STALE + 1), None, GRACE, STALE)
    assert verdict is not None and verdict.action == "resent" and verdict.after_grace
    assert judge_slot(None, Seen(lease=True, held_s=STALE + 1), None, GRACE, STALE) is None


def test_a_message_held_by_no_live_worker_for_long_enough_is_given_back():
    raw = {tag: json.dumps([json.loads(_message(task)), "", "gpu"]).encode() for tag, task in ((b"dead", "t1"), (b"live", "t2"), (b"young", "t3"))}
    messages = parse_messages([], raw, {b"dead": 0.0, b"live": 0.0, b"young": 90.0}, now=100.0)
    lost = unheld(messages, live_held={"t2"}, min_held_s=30.0)
    assert [(h.tag, h.task_id, h.task) for h in lost] == [(b"dead", "t1", "convtune.run_trial")]
    assert unheld(messages, live_held={"t1", "t2"}, min_held_s=30.0) == []


@pytest.fixture()
def private_redis_url() -> Iterator[str]:
    """A redis-server of this test's own: the session's workers consume the session database's queues."""
    server, url = start_redis("redis-give-back")
    yield url
    server.stop()


@pytest.fixture()
def celery_on_redis(private_redis_url: str):
    """A Celery app on a Redis of its own, and a consumer that takes one message without acking it, as a worker does."""
    from celery import Celery
    from kombu import Exchange, Queue

    app = Celery("test-give-back")
    app.conf.update(celery_config(private_redis_url, 3600))
    queue_name = "cpu"
    conn = app.connection()
    queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name)(conn.default_channel)
    yield app, queue
    conn.release()


def test_a_message_given_back_is_delivered_again_and_no_longer_unacked(celery_on_redis, private_redis_url: str):
    """The kombu assumptions give_back rests on: the unacked hash's value, its index, the queue list it is taken from."""
    app, queue = celery_on_redis
    client = redis.Redis.from_url(private_redis_url)
    trial_id = uuid.uuid4().hex
    send(app, TrialMessage(trial_id=trial_id, spec={}), "cpu")
    first = queue.get(no_ack=False)  # held unacked, as by a worker that then died
    tag = first.delivery_tag
    raw = client.hget(UNACKED_KEY, tag)
    assert raw is not None and client.zscore(UNACKED_INDEX_KEY, tag) is not None
    assert give_back(client, tag, raw)
    assert client.hget(UNACKED_KEY, tag) is None and client.zscore(UNACKED_INDEX_KEY, tag) is None
    again = queue.get(no_ack=False)
    assert again is not None and again.headers["id"] == trial_id and again.delivery_info.get("redelivered") is not False
    assert again.payload == first.payload
    again.ack()
    assert not give_back(client, again.delivery_tag, raw)  # acked meanwhile: nothing put back
    assert queue.get(no_ack=True) is None


# --- whole sweeps ---------------------------------------------------------------------------------

SPEC = {"model": {"channels": [8, 16]}, "optim": {"epochs": 2}, "data": {"name": "digits"}, "queue": "gpu"}


class FakeMlflow:
    """The few MlflowClient calls a sweep makes, on runs kept in a dict."""

    def __init__(self) -> None:
        self.runs: dict[str, SimpleNamespace] = {}

    def add(self, status: str, started: bool = True, **tags: str) -> str:
        run_id = uuid.uuid4().hex
        if status != "SCHEDULED" and started:
            tags.setdefault(TAG.STARTED_AT, "2026-01-01T00:00:00+00:00")  # a worker started it
        self.runs[run_id] = SimpleNamespace(info=SimpleNamespace(run_id=run_id, status=status, experiment_id="1"), data=SimpleNamespace(tags=dict(tags)))
        return run_id

    def get_experiment_by_name(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(experiment_id="1")

    def search_runs(self, experiment_ids, filter_string="", max_results=1000, page_token=None) -> PagedList:
        return PagedList([r for r in self.runs.values() if r.info.status in ("SCHEDULED", "RUNNING")], None)

    def get_run(self, run_id: str) -> SimpleNamespace:
        return self.runs[run_id]

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        self.runs[run_id].data.tags.update({t.key: t.value for t in tags})

    def set_terminated(self, run_id: str, status: str) -> None:
        self.runs[run_id].info.status = status


@pytest.fixture()
def world(redis_url: str, tmp_path, monkeypatch):
    """A reconciler over a fake MLflow; its own lock, findings and counts keys (a session's workers may sweep this Redis too)."""
    client = redis.Redis.from_url(redis_url)
    keys = {name: f"test:{uuid.uuid4().hex}:{name}" for name in ("RECONCILER_LOCK_KEY", "RECONCILER_SUSPECTS_KEY", "RECONCILER_COUNTS_KEY")}
    for name, key in keys.items():
        monkeypatch.setattr(f"workers.reconciler.sweep.{name}", key)
    settings = WorkerSettings(
        redis_url=redis_url, reconcile_interval_s=5, reconcile_grace_s=30, study_storage=str(tmp_path / "studies.journal"),
        unserved_queue_s=0,  # its gpu trials have no worker on purpose (workers.reconciler.unserved is tested in test_fleet.py)
    )
    mlflow, sent, pushed = FakeMlflow(), [], []

    def send(message, route) -> None:  # as kombu does with fair share off: the message waits in its queue's list
        sent.append((message, route.queue))
        pushed.append((route.queue, json.dumps({"headers": {"id": message.task_id}, "body": ""})))
        client.lpush(*pushed[-1])

    reconciler = Reconciler(Clients(settings, mlflow, client), send)

    def sweep(later_s: float = 0.0) -> list:
        """One sweep, ``later_s`` after the previous one (the findings it remembers made that much older)."""
        for finding, first in client.hgetall(keys["RECONCILER_SUSPECTS_KEY"]).items():
            client.hset(keys["RECONCILER_SUSPECTS_KEY"], finding, float(first) - later_s)
        client.delete(keys["RECONCILER_LOCK_KEY"])
        assert reconciler.lock.acquire()
        return reconciler.sweep()

    cleanup: list[bytes] = []
    yield SimpleNamespace(redis=client, mlflow=mlflow, sent=sent, sweep=sweep, settings=settings, reconciler=reconciler, keys=keys, cleanup=cleanup)
    for queue, message in pushed:
        client.lrem(queue, 0, message)
    for tag in cleanup:
        client.hdel(UNACKED_KEY, tag)
        client.zrem(UNACKED_INDEX_KEY, tag)
    for item in client.lrange("gpu", 0, -1):  # what a sweep gave back
        if b'"redelivered": true' in item:
            client.lrem("gpu", 0, item)
    client.delete(*keys.values(), *client.keys("convtune:fleet:*"))


def test_a_queued_trial_with_no_message_is_resent_once_the_grace_has_passed(world):
    trial_id = world.mlflow.add("SCHEDULED", **{TAG.KIND: KIND.TRIAL, TAG.SPEC: json.dumps(SPEC), TAG.QUEUE: "gpu"})
    assert world.sweep() == [] and world.sweep(later_s=20) == []
    actions = world.sweep(later_s=15)
    assert [(a.kind, a.action, a.run_id) for a in actions] == [("trial", "resent", trial_id)]
    assert world.sent == [(TrialMessage(trial_id=trial_id, spec=SPEC), "gpu")]
    assert world.redis.hget(world.keys["RECONCILER_COUNTS_KEY"], "trial:resent") == b"1"


def test_a_finding_that_stops_being_true_starts_its_grace_again(world):
    trial_id = world.mlflow.add("SCHEDULED", **{TAG.KIND: KIND.TRIAL, TAG.SPEC: json.dumps(SPEC), TAG.QUEUE: "gpu"})
    world.sweep()
    world.redis.set(lease_key(trial_id), "a worker", px=60_000)  # a worker took it
    assert world.sweep(later_s=40) == []
    world.redis.delete(lease_key(trial_id))
    assert world.sweep(later_s=1) == []  # seen stranded again just now


def test_a_running_trial_is_left_while_its_lease_lives_and_resent_at_once_when_it_lapses(world):
    trial_id = world.mlflow.add("RUNNING", **{TAG.KIND: KIND.TRIAL, TAG.SPEC: json.dumps(SPEC), TAG.QUEUE: "gpu"})
    world.redis.set(lease_key(trial_id), "a worker", px=60_000)
    assert world.sweep() == []
    world.redis.delete(lease_key(trial_id))
    assert [a.action for a in world.sweep()] == ["resent"]
    assert world.sent == [(TrialMessage(trial_id=trial_id, spec=SPEC), "gpu")]
    assert world.sweep() == []  # its re-sent copy waits in the queue
    tag = uuid.uuid4().hex
    taken = world.redis.lindex("gpu", 0)  # a worker takes it (into kombu's unacked hash), about to take the lease
    world.redis.lrem("gpu", 0, taken)
    world.redis.hset("unacked", tag, json.dumps([json.loads(taken), "", "gpu"]))
    world.redis.zadd("unacked_index", {tag: time.time()})
    try:
        assert world.sweep() == []
        assert len(world.sent) == 1
    finally:
        world.redis.hdel("unacked", tag)
        world.redis.zrem("unacked_index", tag)


def test_a_run_mlflow_shows_running_before_any_worker_started_it_is_a_queued_one(world):
    # MLflow creates a run RUNNING, and the API makes it SCHEDULED a call later: no worker was lost.
    trial_id = world.mlflow.add("RUNNING", started=False, **{TAG.KIND: KIND.TRIAL, TAG.SPEC: json.dumps(SPEC), TAG.QUEUE: "gpu"})
    assert world.sweep() == []
    assert [(a.action, a.run_id) for a in world.sweep(later_s=31)] == [("resent", trial_id)]  # left so (its API died): queued, lost


def test_a_running_trial_with_no_lease_and_a_cancel_flag_is_ended_cancelled(world):
    trial_id = world.mlflow.add("RUNNING", **{TAG.KIND: KIND.TRIAL, TAG.SPEC: json.dumps(SPEC)})
    world.redis.set(cancel_key(trial_id), "1")
    assert [a.action for a in world.sweep()] == ["cancelled"]
    run = world.mlflow.get_run(trial_id)
    assert run.info.status == "KILLED" and run.data.tags[TAG.OUTCOME] == "cancelled" and "ended by the reconciler" in run.data.tags[TAG.REASON]
    assert world.sent == []


def test_a_study_trial_its_ended_study_left_open_is_ended_worker_lost(world):
    study_id = world.mlflow.add("FINISHED", **{TAG.KIND: KIND.STUDY})
    trial_id = world.mlflow.add("RUNNING", **{TAG.KIND: KIND.TRIAL, TAG.STUDY_ID: study_id, TAG.SPEC: json.dumps(SPEC)})
    assert world.sweep() == []
    assert [(a.action, a.run_id) for a in world.sweep(later_s=31)] == [("ended", trial_id)]
    assert world.mlflow.get_run(trial_id).data.tags[TAG.OUTCOME] == "worker_lost"


def _study(world, budget: int, claimed: int, released: list[int]) -> str:
    spec = StudySpec.model_validate({"base": SPEC, "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}, "n_trials": budget})
    study_id = world.mlflow.add("RUNNING", **{TAG.KIND: KIND.STUDY, TAG.QUEUE: "gpu", TAG.STUDY_STORAGE: "journal"})
    stored = optuna.create_study(study_name=study_id, storage=open_storage(world.settings.study_storage))
    for key, value in ((USER_ATTR.SPEC, spec.model_dump_json()), (USER_ATTR.BUDGET, budget), (USER_ATTR.QUEUE, "gpu"), (USER_ATTR.STARTED_AT, time.time())):
        stored.set_user_attr(key, value)
    slots = StudyBudget(world.redis, study_id)
    slots.open(budget, spec.parallelism)
    slots.top_up()
    world.redis.hset(slots.key, mapping={"claimed": claimed, "inflight": claimed - len(released)})
    if released:
        world.redis.sadd(slots.released_key, *released)
    return study_id


def test_a_study_slot_whose_step_message_was_lost_is_resent_after_the_grace(world):
    study_id = _study(world, budget=3, claimed=2, released=[1])
    assert world.sweep() == []
    assert [(a.kind, a.action) for a in world.sweep(later_s=31)] == [("study", "resent")]
    assert world.sent == [(StudyStepMessage(study_id=study_id, slot=2), "gpu")]


def test_a_study_with_nothing_in_flight_and_trials_left_is_topped_up(world):
    study_id = _study(world, budget=3, claimed=1, released=[1])
    world.sweep()
    assert [a.action for a in world.sweep(later_s=31)] == ["topped_up"]
    assert sorted(m.slot for m, _ in world.sent) == [2, 3] and all(m.study_id == study_id for m, _ in world.sent)


def test_a_study_whose_counters_were_lost_gets_them_back_and_its_slots_sent(world):
    study_id = _study(world, budget=3, claimed=0, released=[])
    StudyBudget(world.redis, study_id).client.delete(StudyBudget(world.redis, study_id).key)
    world.sweep()
    assert [a.action for a in world.sweep(later_s=31)] == ["restored"]
    assert StudyBudget(world.redis, study_id).state()["claimed"] == "2"  # parallelism 2
    assert sorted(m.slot for m, _ in world.sent) == [1, 2]


def _hold(world, trial_id: str, held_s: float) -> bytes:
    """A trial message held unacked for ``held_s``, as by a worker that took it; its delivery tag."""
    tag = uuid.uuid4().hex.encode()
    world.redis.hset(UNACKED_KEY, tag, json.dumps([{"headers": {"id": trial_id, "task": "convtune.run_trial"}, "properties": {}, "body": ""}, "", "gpu"]))
    world.redis.zadd(UNACKED_INDEX_KEY, {tag: time.time() - held_s})
    world.cleanup.append(tag)
    return tag


def test_a_message_no_live_worker_holds_goes_back_to_its_queue_once_some_worker_beats(world):
    trial_id = world.mlflow.add("RUNNING", **{TAG.KIND: KIND.TRIAL, TAG.SPEC: json.dumps(SPEC), TAG.QUEUE: "gpu"})
    world.redis.set(lease_key(trial_id), "a live worker", px=60_000)  # the run itself is carried: only its message is in question
    dead, young = _hold(world, trial_id, 600.0), _hold(world, "another", 5.0)
    assert [a.action for a in world.sweep()] == []  # no worker beats (an old fleet, or Redis lost everything): today's rules
    assert world.redis.hexists(UNACKED_KEY, dead)
    fleet.beat(world.redis, "survivor@host", ["gpu"], held=["another"], served_ttl_s=60)
    actions = world.sweep()
    assert [(a.kind, a.action, a.run_id) for a in actions] == [("trial", "requeued", trial_id)]
    assert not world.redis.hexists(UNACKED_KEY, dead) and world.redis.hexists(UNACKED_KEY, young)
    assert any(json.loads(m)["headers"]["id"] == trial_id for m in world.redis.lrange("gpu", 0, -1))


def test_one_sweep_at_a_time_and_a_sweeper_that_lost_the_lock_stops(world):
    other = Reconciler(world.reconciler.clients, lambda message, queue: None)
    assert world.reconciler.lock.acquire()
    assert not other.lock.acquire()
    world.redis.delete(world.keys["RECONCILER_LOCK_KEY"])
    assert other.lock.acquire()
    with pytest.raises(LockLost):
        world.reconciler.lock.hold()
