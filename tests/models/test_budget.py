"""A study's trial slots in a real Redis: parallelism kept, budget never passed, releases idempotent."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis

from models.store.budget import StudyBudget


@pytest.fixture()
def budget(redis_url: str) -> StudyBudget:
    return StudyBudget(redis.Redis.from_url(redis_url), uuid.uuid4().hex)


def test_opening_claims_parallelism_slots_then_each_release_claims_one_more(budget: StudyBudget) -> None:
    budget.open(budget=5, parallelism=2)
    first = budget.top_up()
    assert first.slots == [1, 2] and first.in_flight == 2
    assert budget.top_up().slots == []  # already at parallelism
    assert budget.top_up(release_slot=1).slots == [3]
    assert budget.top_up(release_slot=2).slots == [4]
    assert budget.top_up(release_slot=3).slots == [5]
    last = budget.top_up(release_slot=4)
    assert last.slots == [] and last.in_flight == 1 and not last.idle
    end = budget.top_up(release_slot=5)
    assert end.idle and end.released and end.claimed == 5


def test_a_redelivered_step_releases_its_slot_once(budget: StudyBudget) -> None:
    budget.open(budget=3, parallelism=2)
    budget.top_up()
    assert budget.top_up(release_slot=1).released
    again = budget.top_up(release_slot=1)
    assert not again.released and again.in_flight == 2 and again.slots == []


def test_stop_starts_nothing_more_and_extending_resumes(budget: StudyBudget) -> None:
    budget.open(budget=4, parallelism=2)
    budget.top_up()
    budget.stop("target")
    assert budget.stopped() == "target"
    assert budget.top_up(release_slot=1).slots == []
    done = budget.top_up(release_slot=2)
    assert done.idle
    assert budget.add(3) == 7 and budget.stopped() == ""
    assert budget.top_up().slots == [3, 4]


def test_concurrent_releases_never_pass_the_budget_or_parallelism(budget: StudyBudget) -> None:
    budget.open(budget=200, parallelism=4)
    queue = list(budget.top_up().slots)
    lock = threading.Lock()
    started: list[int] = list(queue)
    peak = [0]

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                slot = queue.pop()
            top = budget.top_up(release_slot=slot)
            with lock:
                queue.extend(top.slots)
                started.extend(top.slots)
                peak[0] = max(peak[0], top.in_flight)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(started) == list(range(1, 201)) and peak[0] <= 4


def test_missing_counters_say_so(budget: StudyBudget) -> None:
    top = budget.top_up(release_slot=1)
    assert top.in_flight == -1 and top.slots == []
    budget.open(budget=2, parallelism=1, claimed=1)
    assert budget.top_up().slots == [2]
    budget.record_slot(2, "abc", 7)
    assert budget.slot_record(2) == ("abc", 7) and budget.slot_record(3) is None


def test_lost_counters_are_restored_once_with_the_running_slots_in_flight_and_the_rest_released(budget: StudyBudget) -> None:
    assert budget.restore(budget=6, parallelism=2, claimed=4, running={3: ("trial-c", 2)}, stopped="")
    assert not budget.restore(budget=6, parallelism=2, claimed=1, running={}, stopped="")  # the first restore wins
    assert budget.in_flight(4) == [3]
    assert budget.slot_record(3) == ("trial-c", 2)
    top = budget.top_up(release_slot=1)
    assert not top.released  # a step that ended before the loss counts for nothing
    assert top.slots == [5] and top.in_flight == 2  # new slots never reuse a claimed number
    assert budget.top_up(release_slot=3).released and budget.top_up(release_slot=3).released is False


@pytest.mark.parametrize("late_write", ["stop", "add"])
def test_a_stop_or_extension_after_redis_lost_the_counters_leaves_them_lost_and_restorable(budget: StudyBudget, late_write: str) -> None:
    # A trial reaches its target (or the study is cancelled, or extended) just after Redis lost the counters.
    budget.open(budget=4, parallelism=2)
    budget.top_up()
    budget.client.delete(budget.key, budget.released_key)
    if late_write == "stop":
        assert budget.stop("target") is False
    else:
        assert budget.add(3) == -1
    assert not budget.client.exists(budget.key)  # no partial hash that looks present
    assert budget.top_up(release_slot=1).in_flight == -1  # lost, as before the write
    # Whoever rebuilds them (a step, the reconciler) does, with the stop the Optuna storage recorded.
    assert budget.restore(budget=4, parallelism=2, claimed=2, running={2: ("t2", 1)}, stopped="target")
    end = budget.top_up(release_slot=2)
    assert end.idle and budget.stopped() == "target"


def test_a_partial_hash_left_by_an_earlier_version_counts_as_lost(budget: StudyBudget) -> None:
    budget.client.hset(budget.key, "stopped", "cancelled")  # what a late HSET on lost counters used to leave
    assert not budget.exists() and budget.top_up().in_flight == -1
    assert budget.restore(budget=2, parallelism=1, claimed=1, running={}, stopped="cancelled")
    assert budget.state() == {"budget": "2", "parallelism": "1", "claimed": "1", "inflight": "0", "stopped": "cancelled"}
    assert budget.top_up().idle
