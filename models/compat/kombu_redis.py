"""kombu's Redis transport: the keys and values in which it keeps waiting and unacknowledged messages.

The reconciler and the API read Redis directly where kombu has no API for it (what waits in a
queue, what a worker holds unacked and since when) and put back a message a dead worker held. That
rests on the layout of ``kombu.transport.redis``:

- a queue's messages wait in a list named after it, its prioritised ones in sibling lists named
  ``<queue><Channel.sep><step>`` for each of ``Channel.priority_steps`` but 0 (a message of
  priority p waits in the list of the highest step <= p);
- a message delivered but not acknowledged is in the hash ``Channel.unacked_key`` (delivery tag ->
  JSON ``[message, exchange, routing key]``), its delivery time in the sorted set
  ``Channel.unacked_index_key``;
- ``QoS.restore_by_tag`` puts one back by removing it from both and pushing the message, marked
  redelivered, on the right end of its queue's list (the end workers take first);
- no ``global_keyprefix`` (convtune sets none).

Checked on kombu 5.7.0 with redis-py 8.2 (``tests/compat/test_kombu_redis.py``). Imports no kombu
but in :func:`check_layout`: the API reads queue lengths with these names alone.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from models.compat._base import CompatError

__all__ = ["PRIORITY_SEP", "UNACKED_INDEX_KEY", "UNACKED_KEY", "check_layout", "queue_lists", "restore_unacked", "unacked_value"]

_LIBRARY = "kombu"
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
_SEP = "\x06\x16"
PRIORITY_SEP = _SEP  # between a queue's name and its priority step, in its priority lists' names
_PRIORITY_STEPS = (0, 3, 6, 9)
# KEYS[1] unacked, KEYS[2] unacked_index, KEYS[3] the queue's list; ARGV[1] the delivery tag, ARGV[2] its value as read,
# ARGV[3] the message to put back. Only while the tag still holds that value (its worker did not ack it meanwhile).
_RESTORE = """
if redis.call('hget', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('rpush', KEYS[3], ARGV[3])
redis.call('hdel', KEYS[1], ARGV[1])
redis.call('zrem', KEYS[2], ARGV[1])
return 1
"""


@functools.cache
def check_layout() -> None:
    """Raise CompatError unless the installed kombu's Redis channel uses the names and priority steps above."""
    try:
        from kombu.transport.redis import Channel
    except ImportError as exc:
        raise CompatError(_LIBRARY, "kombu.transport.redis.Channel is the Redis transport's channel", __name__, str(exc)) from exc
    assumed = {"unacked_key": UNACKED_KEY, "unacked_index_key": UNACKED_INDEX_KEY, "sep": _SEP, "priority_steps": list(_PRIORITY_STEPS)}
    found = {name: getattr(Channel, name, None) for name in assumed}
    found["priority_steps"] = list(found["priority_steps"] or [])
    if found != assumed:
        changed = ", ".join(f"{name} is {found[name]!r}, not {value!r}" for name, value in assumed.items() if found[name] != value)
        raise CompatError(_LIBRARY, "the Redis channel keeps unacked messages and priority lists under the names assumed", __name__, changed)


def queue_lists(queue: str) -> list[str]:
    """The Redis lists in which kombu keeps the messages waiting in ``queue``, one per priority step (step 0 first)."""
    return [queue + (f"{_SEP}{step}" if step else "") for step in _PRIORITY_STEPS]


def unacked_value(raw: bytes | str) -> tuple[dict[str, Any], str, str]:
    """An ``unacked`` hash value as (message, exchange, routing key); CompatError when it is not of that shape."""
    try:
        message, exchange, routing_key = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise CompatError(_LIBRARY, "an unacked message is held as JSON [message, exchange, routing key]", __name__, str(exc)) from exc
    if not isinstance(message, dict) or not isinstance(routing_key, str):
        raise CompatError(_LIBRARY, "an unacked message is held as JSON [message, exchange, routing key]", __name__,
                          f"got [{type(message).__name__}, {type(exchange).__name__}, {type(routing_key).__name__}]")
    return message, exchange, routing_key


def restore_unacked(client: Any, tag: bytes | str, raw: bytes) -> bool:
    """Put the message held unacked under ``tag`` back on its queue, as ``QoS.restore_by_tag`` does; whether it was.

    ``raw`` is the hash's value for ``tag`` as read; only while the tag still holds it (a worker
    that acked it meanwhile keeps it acked). CompatError when ``raw`` is not of kombu's shape.
    """
    check_layout()
    message, _exchange, routing_key = unacked_value(raw)
    properties = message.get("properties") or {}
    try:
        priority = max(0, min(int(properties.get("priority") or 0), 9))
    except (ValueError, TypeError, AttributeError) as exc:
        raise CompatError(_LIBRARY, "a message's priority is an int in its properties", __name__, str(exc)) from exc
    for part in (message.get("headers"), properties.get("delivery_info")):
        if isinstance(part, dict):
            part["redelivered"] = True
    step = max(s for s in _PRIORITY_STEPS if s <= priority)
    queue_list = queue_lists(routing_key)[_PRIORITY_STEPS.index(step)]
    return bool(client.eval(_RESTORE, 3, UNACKED_KEY, UNACKED_INDEX_KEY, queue_list, tag, raw, json.dumps(message)))
