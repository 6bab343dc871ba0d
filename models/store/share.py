"""Fair share between teams: each team's work waits in queues of its own, and a dispatcher feeds the
device queues (``gpu``, ``cpu``) from them, by weight, only as fast as workers free up.

::

    POST (team a) ──> gpu.share.a ─┐                          ┌─> worker 1
    POST (team b) ──> gpu.share.b ─┼── dispatch (one script) ──> gpu ──┤
    study step (c) ─> gpu.share.c ─┘   when a slot is free     └─> worker 2

Every message of a team (a trial, a range test, a study's step) is published by kombu on the team's
*waiting queue* of its device queue, ``<queue>.share.<team>`` (:func:`waiting_queue`), with its
priority (high, normal, low: kombu's priority lists of that queue). No worker consumes a waiting queue.
:func:`dispatch` (one Lua script, so the API and every worker may call it at once) counts what the
device queue already carries (messages waiting in it, and messages its workers hold unacked) against
the slots of the live workers that serve it, and moves as many messages as there are free slots from
the waiting queues onto it, the right end of a waiting list (its oldest, highest priority message) to
the left end of the device queue: within a team, priority then FIFO.

Which team goes next is start-time fair queueing over device-seconds: each team has a *virtual
time*, the device-seconds it was given divided by its weight; the team with work waiting and the
smallest virtual time goes next, and a team that was idle (nothing waiting, nothing running) starts
at the virtual time of the last message dispatched: it banks no credit for the time it submitted
nothing, and no debt from its last busy period. A message is charged
at dispatch with its team's mean device-seconds per message (a moving average of what ended), and
corrected when it ends with the seconds it took (:func:`settle`): over a busy period each team gets
the device-seconds of its weight, whatever the length of its trials or the order and volume in which
they were submitted, and a team alone gets every slot.

The device queue is never longer than the free slots, so a team that submits one trial behind
another's thousand waits only for the next slot to free. Callers of :func:`dispatch`: the API after
each send, a worker's pool process as its task ends (counting its own slot free before the ack), and
every worker's main process once a second (:mod:`workers.fleet`), which also covers a worker that
joins. A message in a waiting queue is in Redis like any queued message: a worker that dies holding
one gives it back to the waiting queue (kombu's restore follows the routing key), and the reconciler
reads the waiting queues with the device queues (:func:`waiting_lists`).

With ``CONVTUNE_FAIR_SHARE=false`` messages go straight to the device queue, first come first served.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.compat.kombu_redis import PRIORITY_SEP, UNACKED_KEY, queue_lists
from models.messages import QUEUES, SHARE_INFIX, Message, NotSent, send
from models.spec.trial import Priority
from models.store import fleet

if TYPE_CHECKING:
    import redis
    from celery import Celery

__all__ = [
    "PRIORITIES", "Priority", "Route", "Share", "TeamPolicy", "dispatch", "settle", "team_of_queue", "waiting_by_team", "waiting_lists",
    "waiting_queue",
]

log = logging.getLogger(__name__)

# kombu's Redis priority lists: 0 is taken first (models.compat.kombu_redis); one step per priority.
PRIORITIES: dict[str, int] = {"high": 0, "normal": 3, "low": 6}
_SHARE = SHARE_INFIX
_NO_TEAM = ""  # work without a team (authentication off); team names are never empty
_KEY = "convtune:share:"
_CHARGES_KEY = f"{_KEY}charges"  # hash: task id -> JSON [team, device queue, charge in device-seconds]
_MEAN_ALPHA = 0.2  # weight of the newest ended message in a team's mean device-seconds per message


class TeamPolicy(BaseModel):
    """What a team is allowed: its weight in the fair share, and its optional compute quotas."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(default=1.0, gt=0, le=1000, description="Its share of the workers against other teams with work waiting (equal by default).")
    device_seconds_per_day: float | None = Field(
        default=None, gt=0,
        description="Device-seconds it may use in any rolling 24 hours, counting what it has queued or running; a submit over it is a 429.",
    )
    queued_device_seconds: float | None = Field(
        default=None, gt=0, description="Device-seconds of work it may have accepted and not yet ended; a submit over it is a 429.",
    )
    estimate: Literal["flops", "time_limit"] = Field(
        default="flops",
        description=(
            "How a submit's cost is estimated for its quotas: 'flops' (training FLOPs over the device kind's measured throughput) or "
            "'time_limit' (the trial's max_seconds, its upper bound)."
        ),
    )


@dataclass(frozen=True)
class Route:
    """Where a message goes: its device queue, its team (None: no teams) and its priority within the team."""

    queue: str
    team: str | None = None
    priority: Priority = "normal"


def waiting_queue(queue: str, team: str | None) -> str:
    """The kombu queue in which ``team``'s work for the device queue ``queue`` waits."""
    return f"{queue}{_SHARE}{team or _NO_TEAM}"


def team_of_queue(name: str) -> tuple[str, str | None] | None:
    """(device queue, team) of a waiting queue's name; None for any other name."""
    queue, sep, team = name.partition(_SHARE)
    if not sep or queue not in QUEUES:
        return None
    return queue, team or None


def _teams_key(queue: str) -> str:
    return f"{_KEY}{queue}:teams"  # set: the teams that ever queued work here (their waiting queues)


def _vtime_key(queue: str) -> str:
    return f"{_KEY}{queue}:vtime"  # hash: team -> virtual time (device-seconds given / weight)


def _now_key(queue: str) -> str:
    return f"{_KEY}{queue}:now"  # the virtual time of the last message dispatched


def _mean_key(queue: str) -> str:
    return f"{_KEY}{queue}:mean"  # hash: team -> mean device-seconds per message; "" -> every team's


def waiting_lists(client: redis.Redis, queues: Iterable[str] = QUEUES) -> list[str]:
    """Every Redis list in which work waits for ``queues``: theirs and their teams' waiting queues (each priority)."""
    queues = list(queues)
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.smembers(_teams_key(queue))
    names = []
    for queue, teams in zip(queues, pipe.execute(), strict=True):
        names += queue_lists(queue)
        for team in sorted(t.decode() if isinstance(t, bytes) else t for t in teams):
            names += queue_lists(f"{queue}{_SHARE}{team}")
    return names


def waiting_by_team(client: redis.Redis, queues: Iterable[str] = QUEUES) -> dict[str, dict[str | None, int]]:
    """{queue: {team: messages waiting in the team's waiting queue}} (every priority), for /metrics."""
    queues = list(queues)
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.smembers(_teams_key(queue))
    teams = {q: sorted(t.decode() for t in found) for q, found in zip(queues, pipe.execute(), strict=True)}
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for team in teams[queue]:
            for name in queue_lists(f"{queue}{_SHARE}{team}"):
                pipe.llen(name)
    counts, at, step = pipe.execute(), 0, len(queue_lists(""))  # one list per priority step
    found: dict[str, dict[str | None, int]] = {}
    for queue in queues:
        found[queue] = {}
        for team in teams[queue]:
            found[queue][team or None] = sum(counts[at : at + step])
            at += step
    return found


# KEYS: 1 the device queue's list, 2 kombu's unacked hash, 3 the teams set, 4 the virtual times, 5 the
# virtual now, 6 the means, 7 the charges. ARGV: 1 the slots of the live workers serving the queue,
# 2 the waiting queues' prefix, 3 kombu's priority separator, 4 JSON {team: weight}, 5 the task id of a
# message whose task just ended (its slot counts free before its ack), 6 the most messages to move.
# Returns the number of messages moved.
_DISPATCH = """
local q, prefix, sep = KEYS[1], ARGV[2], ARGV[3]
local weights = cjson.decode(ARGV[4])
local steps = {'', sep .. '3', sep .. '6', sep .. '9'}
local busy = 0
local running = {}  -- teams with a message on the device queue or held by a worker
for _, s in ipairs(steps) do
  for _, raw in ipairs(redis.call('lrange', q .. s, 0, -1)) do
    busy = busy + 1
    local ok, message = pcall(cjson.decode, raw)
    if ok and type(message) == 'table' and type(message.properties) == 'table' and type(message.properties.delivery_info) == 'table' then
      local rk = message.properties.delivery_info.routing_key
      if type(rk) == 'string' and string.sub(rk, 1, #prefix) == prefix then running[string.sub(rk, #prefix + 1)] = true end
    end
  end
end
for _, raw in ipairs(redis.call('hvals', KEYS[2])) do
  local ok, held = pcall(cjson.decode, raw)
  if ok and type(held) == 'table' and type(held[3]) == 'string' then
    local rk = held[3]
    if rk == q or string.sub(rk, 1, #prefix) == prefix then
      local id = type(held[1]) == 'table' and type(held[1].headers) == 'table' and held[1].headers.id
      if id ~= ARGV[5] then
        busy = busy + 1
        running[string.sub(rk, #prefix + 1)] = true
      end
    end
  end
end
local teams = redis.call('smembers', KEYS[3])
local now = tonumber(redis.call('get', KEYS[5]) or '0')
-- A team with nothing waiting and nothing running starts afresh at the virtual now: what its last
-- messages took beyond their charge (settled after they ended) is not held against its next busy period.
for _, team in ipairs(teams) do
  if not running[team] then
    local vt = tonumber(redis.call('hget', KEYS[4], team) or '0')
    if vt > now then
      local waiting = 0
      for _, s in ipairs(steps) do waiting = waiting + redis.call('llen', prefix .. team .. s) end
      if waiting == 0 then redis.call('hset', KEYS[4], team, tostring(now)) end
    end
  end
end
local free = math.min(tonumber(ARGV[1]) - busy, tonumber(ARGV[6]))
if free <= 0 then return 0 end
local all_mean = tonumber(redis.call('hget', KEYS[6], '') or '1')
local moved = 0
while free > 0 do
  local best, best_at, best_list = nil, nil, nil
  for _, team in ipairs(teams) do
    local list = nil
    for _, s in ipairs(steps) do
      if redis.call('llen', prefix .. team .. s) > 0 then list = prefix .. team .. s; break end
    end
    if list then
      local at = math.max(tonumber(redis.call('hget', KEYS[4], team) or '0'), now)
      if best == nil or at < best_at or (at == best_at and team < best) then best, best_at, best_list = team, at, list end
    end
  end
  if best == nil then break end
  local raw = redis.call('rpop', best_list)
  redis.call('lpush', q, raw)
  local ok, message = pcall(cjson.decode, raw)
  local id = ok and type(message) == 'table' and type(message.headers) == 'table' and message.headers.id
  local weight = tonumber(weights[best] or 1)
  local charge = tonumber(redis.call('hget', KEYS[6], best) or all_mean)
  now = best_at
  if id and redis.call('hexists', KEYS[7], id) == 1 then
    charge = 0  -- charged when first dispatched (a redelivery): corrected once, when it ends
  elseif id then
    redis.call('hset', KEYS[7], id, cjson.encode({best, q, charge}))
  end
  redis.call('hset', KEYS[4], best, tostring(best_at + charge / weight))
  free = free - 1
  moved = moved + 1
end
redis.call('set', KEYS[5], tostring(now))
return moved
"""

# KEYS: 1 the charges. ARGV: 1 the task id, 2 its device-seconds, 3 JSON {team: weight}, 4 the mean's alpha, 5 the keys' prefix.
# Corrects the team's virtual time by what the message took against what it was charged, and moves the
# team's (and everyone's) mean device-seconds per message. Returns 1 when the message had a charge.
_SETTLE = """
local raw = redis.call('hget', KEYS[1], ARGV[1])
if not raw then return 0 end
redis.call('hdel', KEYS[1], ARGV[1])
local charge = cjson.decode(raw)
local team, q, charged = charge[1], charge[2], tonumber(charge[3])
local took = tonumber(ARGV[2])
local weights = cjson.decode(ARGV[3])
local weight = tonumber(weights[team] or 1)
local prefix = ARGV[5] .. q
local vt = tonumber(redis.call('hget', prefix .. ':vtime', team) or '0')
redis.call('hset', prefix .. ':vtime', team, tostring(vt + (took - charged) / weight))
local alpha = tonumber(ARGV[4])
for _, who in ipairs({team, ''}) do
  local mean = tonumber(redis.call('hget', prefix .. ':mean', who) or tostring(took))
  redis.call('hset', prefix .. ':mean', who, tostring(mean + alpha * (took - mean)))
end
return 1
"""


def dispatch(client: redis.Redis, queue: str, slots: int, weights: dict[str, float], *, ending: str | None = None, most: int = 64) -> int:
    """Move waiting work onto ``queue`` while its ``slots`` are not all busy; how many messages moved.

    ``ending``: the task id of a message whose task has just ended in this process: its slot counts
    as free although the worker has not acknowledged it yet.
    """
    keys = [queue, UNACKED_KEY, _teams_key(queue), _vtime_key(queue), _now_key(queue), _mean_key(queue), _CHARGES_KEY]
    args = [slots, f"{queue}{_SHARE}", PRIORITY_SEP, json.dumps({t or _NO_TEAM: w for t, w in weights.items()}), ending or "", most]
    return int(client.eval(_DISPATCH, len(keys), *keys, *args))


def settle(client: redis.Redis, task_id: str, device_seconds: float, weights: dict[str, float]) -> bool:
    """Correct the charge of a dispatched message by the ``device_seconds`` it took; whether it had one."""
    return bool(client.eval(_SETTLE, 1, _CHARGES_KEY, task_id, repr(float(device_seconds)), json.dumps({t or _NO_TEAM: w for t, w in weights.items()}), _MEAN_ALPHA, _KEY))


def virtual_times(client: redis.Redis, queue: str) -> dict[str | None, float]:
    """Each team's virtual time on ``queue`` (device-seconds given over weight): where each team stands in the share."""
    found = client.hgetall(_vtime_key(queue))
    return {(k.decode() or None): float(v) for k, v in found.items()}


class Share:
    """One process's side of the fair share: sends on waiting queues and dispatches; built once per process.

    ``slots`` of a queue come from the workers' heartbeats (:mod:`models.store.fleet`), read at most
    once a second per queue.
    """

    def __init__(self, client: redis.Redis, celery: Celery, *, enabled: bool, weights: dict[str, float]):
        self.client = client
        self.celery = celery
        self.enabled = enabled
        self.weights = dict(weights)
        self._slots: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def send(self, message: Message, route: Route) -> None:
        """Publish ``message`` for ``route``; raises NotSent when the broker does not take it.

        With fair share on, on the team's waiting queue, then one dispatch (best effort: every
        worker dispatches each second anyway). A queue that is not a training queue (callbacks) is
        sent to as it is.
        """
        if route.queue not in QUEUES:
            send(self.celery, message, route.queue)
            return
        priority = PRIORITIES[route.priority]
        if not self.enabled:
            send(self.celery, message, route.queue, priority=priority)
            return
        try:
            self.client.sadd(_teams_key(route.queue), route.team or _NO_TEAM)
        except Exception as exc:  # Redis is the broker: the send would wait out the same timeout and fail
            raise NotSent(f"the broker (Redis) did not record team {route.team!r}'s waiting queue: {exc}") from exc
        send(self.celery, message, waiting_queue(route.queue, route.team), priority=priority)
        self.dispatch(route.queue)

    def dispatch(self, queue: str, *, ending: str | None = None) -> int:
        """Feed ``queue`` from the waiting queues (:func:`dispatch`); 0 and a log line when Redis fails."""
        try:
            return dispatch(self.client, queue, self.slots(queue), self.weights, ending=ending)
        except Exception as exc:  # every worker dispatches once a second: the next one moves it
            log.warning("share: could not dispatch %s: %s: %s", queue, type(exc).__name__, exc)
            return 0

    def settle(self, task_id: str, device_seconds: float) -> None:
        """Correct a dispatched message's charge (:func:`settle`); a failure is logged, never raised."""
        try:
            settle(self.client, task_id, device_seconds, self.weights)
        except Exception as exc:
            log.warning("share: could not settle %s: %s: %s", task_id, type(exc).__name__, exc)

    def slots(self, queue: str) -> int:
        """The slots of the live workers serving ``queue`` (cached for a second)."""
        now = time.monotonic()
        with self._lock:
            cached = self._slots.get(queue)
            if cached and now - cached[0] < 1.0:
                return cached[1]
        slots = sum(worker.slots for worker in fleet.live_workers(self.client) if queue in worker.queues)
        with self._lock:
            self._slots[queue] = (now, slots)
        return slots


def weights_of(teams: dict[str, Any]) -> dict[str, float]:
    """{team: weight} of the settings' ``teams`` ({team: TeamPolicy})."""
    return {team: policy.weight for team, policy in teams.items()}
