"""Fair share between teams on real workers: whose trial starts when, read back from MLflow's start times.

Two workers serve ``cpu`` on a Redis database of the module's own (the session's workers serve the
default one), with the product's fair share on (the default) and three teams' tokens. The tests assert
the order in which the teams' trials start, never how long anything took.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from datetime import datetime

import pytest
import redis

from models.compat.kombu_redis import queue_lists
from models.store import fleet
from models.store.runs import TAG
from models.store.share import TeamPolicy, waiting_queue
from service.api import create_app
from service.api.auth import hash_token
from service.api.settings import TokenConfig
from tests.conftest import Service, start_worker, wait_for
from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration

SHARE_REDIS_DB = 9
TEAMS = {"heavy": "secret-heavy", "light": "secret-light", "late": "secret-late"}
WEIGHTS = {"heavy": 2.0}  # light and late: 1
ONE_EPOCH = {"optim": {"epochs": 1}}


@pytest.fixture(scope="module")
def share_redis_url(redis_url: str) -> Iterator[str]:
    url = redis_url.rsplit("/", 1)[0] + f"/{SHARE_REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture(scope="module")
def share_experiment() -> str:
    return f"share-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def share_workers(worker_env: dict[str, str], share_redis_url: str, share_experiment: str) -> Iterator[list[Service]]:
    env = {
        **worker_env, "CONVTUNE_REDIS_URL": share_redis_url, "CONVTUNE_EXPERIMENT": share_experiment,
        "CONVTUNE_TEAMS": '{"heavy": {"weight": 2}}', "CONVTUNE_RECONCILE_INTERVAL_S": "2", "CONVTUNE_RECONCILE_GRACE_S": "4",
    }
    workers = [start_worker(f"share-{i}", env) for i in range(2)]
    client = redis.Redis.from_url(share_redis_url)
    assert wait_for(lambda: sum(w.slots for w in fleet.live_workers(client) if "cpu" in w.queues) == 2, 15)
    yield workers
    for w in workers:
        w.stop()


@pytest.fixture(scope="module")
def api(api_settings, worker_env: dict[str, str], share_redis_url: str, share_experiment: str, share_workers):
    tokens = [TokenConfig(name=team, sha256=hash_token(secret), scopes=["read", "submit"], team=team) for team, secret in TEAMS.items()]
    settings = api_settings.model_copy(update={
        "redis_url": share_redis_url, "experiment": share_experiment, "auth_disabled": False, "auth_tokens": tokens,
        "teams": {team: TeamPolicy(weight=w) for team, w in WEIGHTS.items()},
        # the workers': where the API records each team's experiment, which their reconciler sweeps
        "study_storage": worker_env["CONVTUNE_STUDY_STORAGE"],
    })
    return create_app(settings).test_client()


def _submit(api, team: str, n: int, **spec) -> list[str]:
    ids = []
    for _ in range(n):
        response = api.post("/trials", json=tiny_trial(**{**ONE_EPOCH, **spec}), headers={"Authorization": f"Bearer {TEAMS[team]}"})
        assert response.status_code == 202, response.get_json()
        ids.append(response.get_json()["id"])
    return ids


def _ended(api, team: str, ids: list[str], timeout_s: float = 240) -> list[dict]:
    def done() -> bool:
        return all(_get(api, team, i)["status"] not in ("queued", "running") for i in ids)

    assert wait_for(done, timeout_s, interval_s=0.5), [(_get(api, team, i)["status"]) for i in ids]
    return [_get(api, team, i) for i in ids]


def _get(api, team: str, trial_id: str) -> dict:
    return api.get(f"/trials/{trial_id}", headers={"Authorization": f"Bearer {TEAMS[team]}"}).get_json()


def _starts(mlflow_client, ids_by_team: dict[str, list[str]]) -> list[tuple[float, float, str]]:
    """(start, end, team) of every trial in the order a worker started them (its run's start time is when it was accepted)."""
    found = []
    for team, ids in ids_by_team.items():
        for trial_id in ids:
            run = mlflow_client.get_run(trial_id)
            started = datetime.fromisoformat(run.data.tags[TAG.STARTED_AT]).timestamp()
            found.append((started, run.info.end_time / 1000, team))
    return sorted(found)


def test_a_teams_one_trial_starts_at_the_next_free_slot_not_behind_another_teams_queue(api, mlflow_client):
    heavy = _submit(api, "heavy", 10)
    light = _submit(api, "light", 1)
    for trial in _ended(api, "heavy", heavy) + _ended(api, "light", light):
        assert trial["status"] == "succeeded", trial
    order = _starts(mlflow_client, {"heavy": heavy, "light": light})
    position = [team for _, _, team in order].index("light")
    assert position <= 3, order  # behind the two running when it came, and at most one more: never behind all ten
    # heavy alone at first: both workers took its trials at once (the first two overlap)
    (start1, end1, _), (start2, _, _) = order[0], order[1]
    assert start2 < end1, order


def _block(api, team: str) -> list[str]:
    """Two long trials of ``team`` running on both workers: what is submitted next waits, all of it, until they are cancelled."""
    blockers = _submit(api, team, 2, optim={"epochs": 500})
    assert wait_for(lambda: all(_get(api, team, b)["status"] == "running" for b in blockers), 60, interval_s=0.25)
    return blockers


def _unblock(api, team: str, blockers: list[str]) -> None:
    for trial_id in blockers:
        api.post(f"/trials/{trial_id}/cancel", headers={"Authorization": f"Bearer {TEAMS[team]}"})


def test_teams_share_the_workers_by_weight_whatever_the_order_they_submitted_in(api, mlflow_client):
    blockers = _block(api, "late")
    light = _submit(api, "light", 12)  # first, and as many
    heavy = _submit(api, "heavy", 12)
    metrics = api.get("/metrics").get_data(as_text=True)  # all of it waits, each team's in its own queue
    assert 'convtune_team_queue_depth{queue="cpu",team="heavy"} 12.0' in metrics, metrics
    assert 'convtune_team_queue_depth{queue="cpu",team="light"} 12.0' in metrics
    assert 'convtune_queue_depth{queue="cpu"} 24.0' in metrics
    _unblock(api, "late", blockers)
    _ended(api, "light", light), _ended(api, "heavy", heavy)
    order = [team for _, _, team in _starts(mlflow_client, {"heavy": heavy, "light": light})]
    both = order[:12]  # all of both teams' work waited when the workers freed up; stop before either ran out
    assert 6 <= both.count("heavy") <= 10, order  # weight 2 against 1: 8 of 12


def test_a_high_priority_trial_overtakes_its_own_teams_queue_only(api, mlflow_client):
    blockers = _block(api, "light")
    queued = _submit(api, "late", 6)
    urgent = _submit(api, "late", 1, priority="high")
    _unblock(api, "light", blockers)
    _ended(api, "late", queued + urgent)
    order = [kind for _, _, kind in _starts(mlflow_client, {"queued": queued, "urgent": urgent})]
    assert order[0] == "urgent", order


def test_a_trial_whose_worker_is_killed_whole_is_given_back_to_its_teams_queue_and_resumes(api, share_workers, share_redis_url, mlflow_client):
    spec = {"optim": {"epochs": 80, "batch_size": 32}, "data": {"name": "shapes", "num_samples": 600, "image_size": 16}}
    (trial_id,) = _submit(api, "late", 1, **spec)
    assert wait_for(lambda: _get(api, "late", trial_id)["epochs_done"] >= 2, 120, interval_s=0.5), _get(api, "late", trial_id)
    client = redis.Redis.from_url(share_redis_url)
    assert wait_for(lambda: any(trial_id in b.held for b in fleet.live_workers(client)), 3 * fleet.BEAT_S)
    holder = next(b.name for b in fleet.live_workers(client) if trial_id in b.held)
    victim = next(w for w in share_workers if any(part.startswith(holder.split("@")[0]) for part in w.argv))
    victim.stop(signal.SIGKILL)  # its whole process group: the main process (its beat, its unacked message) and the pool
    killed = time.monotonic()
    trial = _ended(api, "late", [trial_id], timeout_s=240)[0]
    assert trial["status"] == "succeeded", trial
    run = mlflow_client.get_run(trial_id)
    assert run.data.tags["convtune.attempts"] == "2"
    assert time.monotonic() - killed < 240
    # the survivor's reconciler put it back (the message given back, or sent again) on the team's waiting queue
    survivor_log = "".join(w.log() for w in share_workers if w is not victim)
    assert f"trial {trial_id}" in survivor_log and ("requeued" in survivor_log or "resent" in survivor_log), survivor_log[-3000:]
    assert not any(client.llen(name) for name in queue_lists(waiting_queue("cpu", "late")))
