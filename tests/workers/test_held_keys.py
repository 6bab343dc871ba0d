"""workers.trial.lease.renew_held / release_held: a key held with a token is renewed and deleted only by its holder."""

from __future__ import annotations

import uuid

import pytest
import redis

from workers.trial.lease import release_held, renew_held


@pytest.fixture()
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture()
def key(client: redis.Redis):
    name = f"test:held:{uuid.uuid4().hex}"
    yield name
    client.delete(name)


def test_the_holder_renews_its_key(client: redis.Redis, key: str):
    client.set(key, "mine", px=1000)
    assert renew_held(client, key, "mine", 60_000) is True
    assert client.pttl(key) > 1000


def test_another_token_neither_renews_nor_deletes_the_key(client: redis.Redis, key: str):
    client.set(key, "theirs", px=1000)
    assert renew_held(client, key, "mine", 60_000) is False
    assert 0 < client.pttl(key) <= 1000
    assert release_held(client, key, "mine") is False
    assert client.get(key) == b"theirs"


def test_the_holder_releases_its_key(client: redis.Redis, key: str):
    client.set(key, "mine", px=60_000)
    assert release_held(client, key, "mine") is True
    assert client.exists(key) == 0


def test_a_key_that_lapsed_is_not_renewed(client: redis.Redis, key: str):
    assert renew_held(client, key, "mine", 60_000) is False
    assert client.exists(key) == 0
