"""The accept sequence (service.api.accept.accept_run): the run recorded, its work sent, and a send that fails ending the run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import redis

from service.api.accept import accept_run
from service.api.auth import Principal
from service.api.errors import ServiceUnavailable

PRINCIPAL = Principal(name="ci", scopes=frozenset({"submit"}), team="vision")


class FakeRuns:
    """A RunStore that records what accepting asked of MLflow."""

    def __init__(self) -> None:
        self.created: list[tuple[str, dict[str, str], dict[str, str], Principal]] = []
        self.ended: dict[str, str] = {}

    def create(self, name: str, tags: dict[str, str], params: dict[str, str], principal: Principal) -> str:
        self.created.append((name, tags, params, principal))
        return f"run-{len(self.created)}"

    def end_undispatched(self, run_id: str, detail: str) -> None:
        self.ended[run_id] = detail


class FakeRedis:
    def __init__(self) -> None:
        self.sets: dict[str, set[str]] = {}

    def sadd(self, key: str, member: str) -> int:
        self.sets.setdefault(key, set()).add(member)
        return 1


def queued(s: SimpleNamespace) -> set[str]:
    return {member for members in s.redis.sets.values() for member in members}


@pytest.fixture()
def s() -> SimpleNamespace:
    return SimpleNamespace(runs=FakeRuns(), redis=FakeRedis())


def test_the_run_is_created_before_its_work_is_sent_then_counted_queued(s: SimpleNamespace):
    sent: list[tuple[str, int]] = []
    run_id = accept_run(s, PRINCIPAL, "trial", "a trial", {"t": "1"}, {"p": "2"}, lambda rid: sent.append((rid, len(s.runs.created))))
    assert run_id == "run-1" and sent == [("run-1", 1)]  # sent with the run's id, once the run existed
    assert s.runs.created == [("a trial", {"t": "1"}, {"p": "2"}, PRINCIPAL)]
    assert s.runs.ended == {} and queued(s) == {"run-1"}


def refuse(exc: Exception):
    def start(run_id: str) -> None:
        raise exc

    return start


def test_a_message_the_broker_refuses_ends_the_run_failed_and_answers_503(s: SimpleNamespace):
    with pytest.raises(ServiceUnavailable) as raised:
        accept_run(s, PRINCIPAL, "trial", "a trial", {}, {}, refuse(ServiceUnavailable("the broker refused it")))
    assert raised.value.detail == "the broker refused it"
    assert s.runs.ended == {"run-1": "the broker refused it"} and queued(s) == set()


def test_a_redis_error_is_a_503_naming_the_broker(s: SimpleNamespace):
    with pytest.raises(ServiceUnavailable) as raised:
        accept_run(s, PRINCIPAL, "study", "a study", {}, {}, refuse(redis.ConnectionError("connection refused")))
    assert "the broker (Redis) is unreachable: connection refused" == raised.value.detail == s.runs.ended["run-1"]
    assert queued(s) == set()


def test_any_other_failure_ends_the_run_too_and_propagates_as_it_is(s: SimpleNamespace):
    with pytest.raises(KeyError):
        accept_run(s, PRINCIPAL, "study", "a study", {}, {}, refuse(KeyError("optuna")))
    assert list(s.runs.ended) == ["run-1"] and "optuna" in s.runs.ended["run-1"] and queued(s) == set()
