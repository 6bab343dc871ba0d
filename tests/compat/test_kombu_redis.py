"""kombu's Redis layout that models.compat.kombu_redis relies on, against the installed kombu and a real Redis.

A message published with a priority waits in the priority list the adapter names; taken without
an ack it sits in the ``unacked`` hash (``[message, exchange, routing key]``) and its index; put
back by the adapter it is delivered again, marked redelivered, and is no longer unacked.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Exchange, Queue

from models.compat import CompatError, kombu_redis


@pytest.fixture()
def queue(redis_url: str) -> Iterator[tuple[Queue, redis.Redis]]:
    """A queue of this test's own (no worker consumes it) on a kombu connection, and a plain client of the same Redis."""
    name = f"compat-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    with Connection(redis_url, transport_options={"visibility_timeout": 3600}) as conn:
        bound = Queue(name, Exchange(name), routing_key=name)(conn.default_channel)
        bound.declare()
        yield bound, client
        bound.delete()
    client.delete(*kombu_redis.queue_lists(name))


def test_the_installed_kombu_uses_the_assumed_key_names_and_priority_steps():
    kombu_redis.check_layout.cache_clear()
    kombu_redis.check_layout()


def test_a_message_taken_unacked_is_held_as_assumed_and_given_back_once(queue: tuple[Queue, redis.Redis]):
    bound, client = queue
    name = bound.name
    bound.channel.basic_publish(bound.channel.prepare_message('{"n": 1}', priority=5, headers={"id": "m1"}), exchange=name, routing_key=name)
    lists = kombu_redis.queue_lists(name)
    assert [client.llen(key) for key in lists] == [0, 1, 0, 0]  # priority 5 waits with step 3

    first = bound.get(no_ack=False)  # as a worker that then died
    tag = first.delivery_tag
    raw = client.hget(kombu_redis.UNACKED_KEY, tag)
    assert raw is not None and client.zscore(kombu_redis.UNACKED_INDEX_KEY, tag) is not None
    message, exchange, routing_key = kombu_redis.unacked_value(raw)
    assert (message["headers"]["id"], exchange, routing_key) == ("m1", name, name)

    assert kombu_redis.restore_unacked(client, tag, raw)
    assert client.hget(kombu_redis.UNACKED_KEY, tag) is None and client.zscore(kombu_redis.UNACKED_INDEX_KEY, tag) is None
    assert [client.llen(key) for key in lists] == [0, 1, 0, 0]
    again = bound.get(no_ack=False)
    assert again.headers["id"] == "m1" and again.body == first.body and again.delivery_info["redelivered"]
    again.ack()
    assert not kombu_redis.restore_unacked(client, again.delivery_tag, raw)  # acked meanwhile: nothing put back
    assert bound.get(no_ack=True) is None


def test_a_kombu_that_renamed_its_unacked_hash_is_named_in_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    from kombu.transport.redis import Channel

    monkeypatch.setattr(Channel, "unacked_key", "unacked_v2")
    kombu_redis.check_layout.cache_clear()
    try:
        with pytest.raises(CompatError, match=r"kombu .* models\.compat\.kombu_redis .*unacked_key is 'unacked_v2', not 'unacked'"):
            kombu_redis.check_layout()
    finally:
        kombu_redis.check_layout.cache_clear()


@pytest.mark.parametrize("raw", [b'{"message": {}}', b"not json", b'["a", "x", "gpu"]'])
def test_an_unacked_value_of_another_shape_is_named_in_a_clear_error(raw: bytes):
    with pytest.raises(CompatError, match=r"an unacked message is held as JSON \[message, exchange, routing key\]"):
        kombu_redis.unacked_value(raw)
