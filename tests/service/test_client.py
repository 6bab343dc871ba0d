"""The Python client: retries on 429/503 honouring Retry-After, idempotency keys, problems as exceptions."""

from __future__ import annotations

import httpx
import pytest

from service.client import ApiProblem, ConvtuneClient, Unreachable


def scripted(answers: list[httpx.Response | Exception], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handle)


def client_with(answers, seen, **kwargs) -> tuple[ConvtuneClient, list[float]]:
    client = ConvtuneClient("http://api", token="s3cret", transport=scripted(answers, seen), **kwargs)
    slept: list[float] = []
    client.sleep = slept.append
    return client, slept


def problem(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"type": "x", "title": "t", "status": status, "detail": f"detail {status}"}, headers=headers)


def test_429_and_503_are_retried_after_retry_after_with_the_same_idempotency_key():
    seen: list[httpx.Request] = []
    client, slept = client_with([problem(429, **{"Retry-After": "7"}), problem(503, **{"Retry-After": "2"}), httpx.Response(202, json={"id": "t1"})], seen)
    assert client.submit_trial({"optim": {"lr": 0.1}}) == {"id": "t1"}
    assert slept == [7.0, 2.0]
    keys = {r.headers["Idempotency-Key"] for r in seen}
    assert len(seen) == 3 and len(keys) == 1 and len(keys.pop()) >= 16
    assert all(r.headers["Authorization"] == "Bearer s3cret" for r in seen)


def test_retry_wait_is_capped_and_retries_run_out():
    seen: list[httpx.Request] = []
    client, slept = client_with([problem(503, **{"Retry-After": "3600"})] * 3, seen, retries=2, max_retry_wait_s=30)
    with pytest.raises(ApiProblem) as raised:
        client.get_trial("abc")
    assert raised.value.status == 503 and slept == [30.0, 30.0] and len(seen) == 3


def test_other_errors_are_not_retried_and_carry_the_problem():
    seen: list[httpx.Request] = []
    body = {"type": "x/invalid-spec", "title": "Invalid spec", "status": 422, "detail": "1 invalid field(s)", "errors": [{"field": "optim.lr", "message": "must be > 0"}]}
    client, slept = client_with([httpx.Response(422, json=body)], seen)
    with pytest.raises(ApiProblem) as raised:
        client.submit_trial({})
    assert raised.value.status == 422 and "optim.lr: must be > 0" in str(raised.value) and slept == []


def test_connection_failures_are_retried_then_unreachable():
    seen: list[httpx.Request] = []
    refused = httpx.ConnectError("refused")
    client, slept = client_with([refused, httpx.Response(200, json={"status": "ok"})], seen)
    assert client.ready() == {"status": "ok"} and slept == [0.5]
    client, slept = client_with([refused] * 4, [], retries=3)
    with pytest.raises(Unreachable) as raised:
        client.ready()
    assert slept == [0.5, 1.0, 2.0] and isinstance(raised.value.__cause__, httpx.ConnectError)


def test_without_retry_after_busy_answers_back_off_exponentially_and_zero_retries_means_one_call():
    seen: list[httpx.Request] = []
    client, slept = client_with([problem(503), problem(429, **{"Retry-After": "soon"}), httpx.Response(200, json={"id": "t1"})], seen)
    assert client.get_trial("t1") == {"id": "t1"} and slept == [1.0, 2.0]
    client, slept = client_with([problem(503)], seen, retries=0)
    with pytest.raises(ApiProblem):
        client.get_trial("t1")
    assert slept == []


def test_a_given_idempotency_key_is_sent_as_is():
    seen: list[httpx.Request] = []
    client, _ = client_with([httpx.Response(202, json={"id": "s1"})], seen)
    client.create_study({"search_space": {}}, idempotency_key="ci-run-42")
    assert seen[0].headers["Idempotency-Key"] == "ci-run-42" and seen[0].url.path == "/studies"
