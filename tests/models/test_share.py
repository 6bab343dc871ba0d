"""The fair share between teams (models.store.share) on a real Redis, with kombu publishing as the API does.

No worker runs here: a test takes messages off the device queue as a worker's consumer would (the
right end of the list, then held in kombu's ``unacked`` hash until acknowledged), so the order in
which the dispatcher feeds the queue is seen exactly.
"""

from __future__ import annotations

import json

import pytest
import redis
from celery import Celery

from models.compat.kombu_redis import UNACKED_KEY, queue_lists
from models.messages import TrialMessage, celery_config, give_back
from models.store import fleet
from models.store.share import Route, Share, team_of_queue, virtual_times, waiting_by_team, waiting_lists, waiting_queue

SHARE_REDIS_DB = 10  # a database of its own: no worker of the session consumes its queues
QUEUE = "cpu"


@pytest.fixture()
def client(redis_url: str):
    url = redis_url.rsplit("/", 1)[0] + f"/{SHARE_REDIS_DB}"
    r = redis.Redis.from_url(url)
    r.flushdb()
    celery = Celery("test-share", set_as_current=False)
    celery.conf.update(celery_config(url, 3600, sender=True))
    r.celery = celery  # type: ignore[attr-defined]
    yield r
    r.flushdb()


def _share(client: redis.Redis, slots: int, weights: dict[str, float] | None = None, enabled: bool = True) -> Share:
    if slots:  # else no worker serves the queue yet
        fleet.beat(client, "w@test", [QUEUE], [], served_ttl_s=60, slots=slots)
    return Share(client, client.celery, enabled=enabled, weights=weights or {})  # type: ignore[attr-defined]


def _submit(share: Share, team: str | None, n: int, priority: str = "normal", prefix: str = "") -> list[str]:
    ids = [f"{prefix or team}-{i}" for i in range(n)]
    for trial_id in ids:
        share.send(TrialMessage(trial_id=trial_id, spec={}), Route(QUEUE, team, priority))  # type: ignore[arg-type]
    return ids


def _take(client: redis.Redis) -> str | None:
    """What a worker's consumer does: take the oldest message off the device queue, hold it unacked; its task id."""
    raw = client.rpop(QUEUE)
    if raw is None:
        return None
    message = json.loads(raw)
    info = message["properties"]["delivery_info"]
    tag = message["properties"]["delivery_tag"]
    client.hset(UNACKED_KEY, tag, json.dumps([message, info["exchange"], info["routing_key"]]))
    return message["headers"]["id"]


def _ack(client: redis.Redis, task_id: str) -> None:
    for tag, raw in client.hgetall(UNACKED_KEY).items():
        if json.loads(raw)[0]["headers"]["id"] == task_id:
            client.hdel(UNACKED_KEY, tag)


def _held(client: redis.Redis) -> list[str]:
    return [json.loads(raw)[0]["headers"]["id"] for raw in client.hvals(UNACKED_KEY)]


def _run_one(share: Share, client: redis.Redis, seconds: float = 1.0) -> str | None:
    """A slot's next task: the oldest one held ends (charged ``seconds``, as a worker's pool process does) and the slot takes the next.

    With nothing held, the slot takes one first. Returns the task id that ended.
    """
    held = _held(client)
    if not held:
        if _take(client) is None:
            return None
        held = _held(client)
    task_id = held[0]
    share.settle(task_id, seconds)
    share.dispatch(QUEUE, ending=task_id)
    _ack(client, task_id)
    _take(client)
    return task_id


# --- names ----------------------------------------------------------------------------------------


def test_a_waiting_queue_names_its_device_queue_and_team():
    assert waiting_queue("gpu", "vision") == "gpu.share.vision"
    assert team_of_queue("gpu.share.vision") == ("gpu", "vision")
    assert team_of_queue("gpu.share.a.b@c") == ("gpu", "a.b@c")
    assert team_of_queue(waiting_queue("cpu", None)) == ("cpu", None)
    assert team_of_queue("gpu") is None
    assert team_of_queue("callbacks") is None
    assert team_of_queue("other.share.x") is None


# --- dispatch -------------------------------------------------------------------------------------


def test_the_device_queue_holds_no_more_than_the_free_slots(client):
    share = _share(client, slots=2)
    _submit(share, "a", 10)
    assert client.llen(QUEUE) == 2
    assert sum(client.llen(name) for name in queue_lists(waiting_queue(QUEUE, "a"))) == 8
    _take(client)
    _take(client)
    assert share.dispatch(QUEUE) == 0  # both slots busy (held unacked)


def test_a_team_behind_another_teams_thousand_goes_next(client):
    share = _share(client, slots=2)
    _submit(share, "a", 30)
    _take(client), _take(client)
    _submit(share, "b", 1)
    _run_one(share, client)  # the first slot to free takes b's
    assert "b-0" in _held(client)


def test_a_team_alone_gets_every_slot(client):
    share = _share(client, slots=3)
    _submit(share, "a", 5)
    assert client.llen(QUEUE) == 3


def test_equal_weights_alternate_and_weights_are_honoured(client):
    share = _share(client, slots=1, weights={"a": 2.0})
    _submit(share, "a", 40)
    _submit(share, "b", 40)
    order = [_run_one(share, client) for _ in range(30)]
    teams = [task_id.split("-")[0] for task_id in order if task_id]
    assert teams.count("a") == pytest.approx(20, abs=1), teams
    assert teams.count("b") == pytest.approx(10, abs=1), teams


def test_the_share_is_of_device_seconds_not_of_messages(client):
    share = _share(client, slots=1)
    _submit(share, "long", 30)
    _submit(share, "short", 30)
    seconds = {"long": 3.0, "short": 1.0}
    used = {"long": 0.0, "short": 0.0}
    for _ in range(40):
        team = _held(client)[0].split("-")[0] if _held(client) else (_take(client) or "").split("-")[0]
        used[team] += seconds[team]
        _run_one(share, client, seconds[team])
    assert used["long"] / used["short"] == pytest.approx(1.0, abs=0.15), used


def test_an_idle_team_banks_no_credit(client):
    share = _share(client, slots=1)
    _submit(share, "a", 20)
    for _ in range(10):
        _run_one(share, client)
    _submit(share, "b", 20)  # b submitted nothing while a ran 10: it does not get the next 10 in a row
    order = [_run_one(share, client) for _ in range(10)]
    assert sum(1 for t in order if t.startswith("a-")) >= 4, order


def test_priority_orders_a_teams_own_work_only(client):
    share = _share(client, slots=0)
    _submit(share, "a", 2, "low", prefix="a_low")
    _submit(share, "a", 2, "normal", prefix="a_normal")
    _submit(share, "a", 2, "high", prefix="a_high")
    _submit(share, "b", 3, "low", prefix="b_low")
    fleet.beat(client, "w@test", [QUEUE], [], served_ttl_s=60, slots=1)
    share._slots.clear()
    share.dispatch(QUEUE)
    order = [_run_one(share, client) for _ in range(9)]
    mine = [t for t in order if t.startswith("a_")]
    assert mine == ["a_high-0", "a_high-1", "a_normal-0", "a_normal-1", "a_low-0", "a_low-1"], order
    # high priority never overtakes another team's share: b's low work alternates with a's
    assert order[1].startswith("b_low"), order


def test_a_message_given_back_waits_in_its_teams_queue_and_is_charged_once(client):
    share = _share(client, slots=1)
    _submit(share, "a", 2)
    task_id = _take(client)
    before = virtual_times(client, QUEUE)["a"]
    tag, raw = next(iter(client.hgetall(UNACKED_KEY).items()))
    assert give_back(client, tag, raw)  # its worker died: back to where it came from
    assert task_id.encode() in b"".join(m for name in queue_lists(waiting_queue(QUEUE, "a")) for m in client.lrange(name, 0, -1))
    assert share.dispatch(QUEUE) == 1
    assert _take(client) == task_id  # the oldest first again
    assert virtual_times(client, QUEUE)["a"] == before


def test_a_task_ending_frees_its_slot_before_its_ack(client):
    share = _share(client, slots=1)
    _submit(share, "a", 2)
    running = _take(client)
    assert share.dispatch(QUEUE) == 0
    assert share.dispatch(QUEUE, ending=running) == 1


def test_the_waiting_lists_name_every_teams_queue(client):
    share = _share(client, slots=0)
    _submit(share, "a", 1)
    _submit(share, None, 1)
    names = waiting_lists(client, [QUEUE])
    assert set(queue_lists(QUEUE)) <= set(names)
    assert set(queue_lists(waiting_queue(QUEUE, "a"))) <= set(names)
    assert set(queue_lists(waiting_queue(QUEUE, None))) <= set(names)


def test_with_fair_share_off_messages_go_straight_to_the_device_queue(client):
    share = _share(client, slots=0, enabled=False)
    _submit(share, "a", 3)
    assert sum(client.llen(name) for name in queue_lists(QUEUE)) == 3
    assert client.keys("convtune:share:*") == []


def test_the_waiting_counts_are_per_team_and_queue(client):
    share = _share(client, slots=1)
    _submit(share, "a", 3)
    _submit(share, "b", 2, "high")
    _submit(share, None, 1)
    assert waiting_by_team(client, [QUEUE]) == {QUEUE: {"a": 2, "b": 2, None: 1}}  # a's first went to the free slot


def test_a_team_whose_message_waits_on_the_device_queue_is_not_idle(client):
    """Its charge stands while its message is on its way to a worker: only a team with nothing anywhere starts afresh."""
    share = _share(client, slots=1)
    _submit(share, "c", 1)  # dispatched at once: on the device queue, not yet taken
    charged = virtual_times(client, QUEUE)["c"]
    share.dispatch(QUEUE)
    assert virtual_times(client, QUEUE)["c"] == charged
