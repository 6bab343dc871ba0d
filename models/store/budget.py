"""How many of a study's trials may start, and when: slots handed out atomically in Redis.

A study runs as a chain of step messages, one trial each. A *slot* is the right to run one of the
study's trials; it is claimed when its step message is sent (so a redelivered message reuses it)
and released when the step ends. :meth:`StudyBudget.top_up`, one Lua script, releases a slot and
claims as many new ones as keep ``parallelism`` steps in flight without passing the budget, so no
process ever waits on another and two steps ending at once cannot overshoot.

Redis only coordinates: the budget and the stop reason are also kept in the study's Optuna
storage, and :meth:`StudyBudget.restore` rebuilds the counters from it. Counters are whole or
absent: every write to a study's hash after :meth:`StudyBudget.open` changes it only where it still
holds its budget (one script each), so a write that lands after Redis lost the counters never
leaves a partial hash that looks present but cannot be topped up or restored; a partial hash left
by anything else counts as lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from models.store.keys import study_key

__all__ = ["StudyBudget", "TopUp"]

TTL_S = 90 * 24 * 3600

# KEYS[1] the study's hash, KEYS[2] its set of released slots. ARGV[1] slot to release or "".
# Returns {first new slot, how many, in flight after, budget, claimed, whether this call released the slot}.
_TOP_UP = """
local h, released, slot = KEYS[1], KEYS[2], ARGV[1]
if redis.call('hexists', h, 'budget') == 0 then return {0, 0, -1, 0, 0, 0} end
local did_release = 0
if slot ~= '' and redis.call('sadd', released, slot) == 1 then redis.call('hincrby', h, 'inflight', -1) did_release = 1 end
local budget = tonumber(redis.call('hget', h, 'budget'))
local parallelism = tonumber(redis.call('hget', h, 'parallelism'))
local claimed = tonumber(redis.call('hget', h, 'claimed'))
local inflight = tonumber(redis.call('hget', h, 'inflight'))
local n = 0
if redis.call('hget', h, 'stopped') == '' then n = math.max(0, math.min(parallelism - inflight, budget - claimed)) end
redis.call('hset', h, 'claimed', claimed + n, 'inflight', inflight + n)
redis.call('expire', h, ARGV[2]) redis.call('expire', released, ARGV[2])
return {claimed + 1, n, inflight + n, budget, claimed + n, did_release}
"""
# KEYS[1] the study's hash, ARGV[1] the stop reason. 1 when the counters were there to stop.
_STOP = """
if redis.call('hexists', KEYS[1], 'budget') == 0 then return 0 end
redis.call('hset', KEYS[1], 'stopped', ARGV[1])
return 1
"""
# KEYS[1] the study's hash, ARGV[1] more trials. The new budget, or -1 when the counters are lost.
_ADD = """
if redis.call('hexists', KEYS[1], 'budget') == 0 then return -1 end
redis.call('hset', KEYS[1], 'stopped', '')
return redis.call('hincrby', KEYS[1], 'budget', ARGV[1])
"""


@dataclass(frozen=True)
class TopUp:
    """Slots to send steps for (maybe none), and the state after."""

    slots: list[int]
    in_flight: int  # -1 when the study has no counters (Redis lost them)
    budget: int
    claimed: int
    released: bool = False  # this call released its slot (a redelivered step's second call does not)

    @property
    def idle(self) -> bool:
        """Nothing runs and nothing more will start: the study has ended."""
        return self.in_flight == 0 and not self.slots


class StudyBudget:
    """A study's trial slots in Redis."""

    def __init__(self, client: redis.Redis, study_id: str):
        self.client = client
        self.key = study_key(study_id)
        self.released_key = self.key + ":released"

    def open(self, budget: int, parallelism: int, claimed: int = 0, stopped: str = "") -> None:
        """Start (or restore) the counters; nothing is in flight yet."""
        mapping = {"budget": budget, "parallelism": parallelism, "claimed": claimed, "inflight": 0, "stopped": stopped}
        self.client.hset(self.key, mapping=mapping)
        self.client.expire(self.key, TTL_S)

    def exists(self) -> bool:
        """Whether the counters are there (whole: a hash without its budget is a lost one)."""
        return bool(self.client.hexists(self.key, "budget"))

    def restore(self, budget: int, parallelism: int, claimed: int, running: dict[int, tuple[str, int]], stopped: str = "") -> bool:
        """Rebuild lost counters, unless they exist again: whether this call rebuilt them.

        ``running`` (slot -> trial id, Optuna number) are the slots still in flight; every other slot
        up to ``claimed`` is marked released, so a step that ended before the loss counts for nothing
        and a step that comes back releases its slot once. Whoever restores first wins (a worker's
        step and the reconciler may both find the counters gone).
        """
        assert claimed >= max(running, default=0), "a running slot was claimed"
        with self.client.pipeline() as pipe:
            try:
                pipe.watch(self.key)
                if pipe.hexists(self.key, "budget"):
                    return False
                pipe.multi()
                pipe.delete(self.key, self.released_key)  # a partial hash, if anything left one
                released = [slot for slot in range(1, claimed + 1) if slot not in running]
                if released:
                    pipe.sadd(self.released_key, *released)
                    pipe.expire(self.released_key, TTL_S)
                for slot, (trial_id, number) in running.items():
                    pipe.hset(f"{self.key}:slot:{slot}", mapping={"trial_id": trial_id, "number": number})
                    pipe.expire(f"{self.key}:slot:{slot}", TTL_S)
                state = {"budget": budget, "parallelism": parallelism, "claimed": claimed, "inflight": len(running), "stopped": stopped}
                pipe.hset(self.key, mapping=state)
                pipe.expire(self.key, TTL_S)
                pipe.execute()
                return True
            except redis.WatchError:
                return False

    def in_flight(self, claimed: int) -> list[int]:
        """The slots up to ``claimed`` not released yet: their steps run, wait, or were lost."""
        released = {int(s) for s in self.client.smembers(self.released_key)}
        return [slot for slot in range(1, claimed + 1) if slot not in released]

    def top_up(self, release_slot: int | None = None) -> TopUp:
        """Release ``release_slot`` (once, however often it is called) and claim slots up to parallelism."""
        slot = "" if release_slot is None else str(release_slot)
        first, n, in_flight, budget, claimed, released = self.client.eval(_TOP_UP, 2, self.key, self.released_key, slot, TTL_S)
        return TopUp(list(range(int(first), int(first) + int(n))), int(in_flight), int(budget), int(claimed), bool(released))

    def add(self, more: int) -> int:
        """Raise the budget by ``more`` trials and clear a target or timeout stop; the new budget (-1: the counters are lost, nothing written)."""
        return int(self.client.eval(_ADD, 1, self.key, more))

    def stop(self, reason: str) -> bool:
        """Start no more slots (running steps finish or see their cancel flag); False when the counters are lost.

        Lost counters are left lost: whoever restores them reads the stop from the Optuna storage,
        where every stop is recorded too.
        """
        return bool(self.client.eval(_STOP, 1, self.key, reason))

    def state(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.client.hgetall(self.key).items()}

    def stopped(self) -> str:
        """Why no more trials start ('' while they do)."""
        value = self.client.hget(self.key, "stopped")
        return value.decode() if value else ""

    def record_slot(self, slot: int, trial_id: str, number: int) -> None:
        """Remember which trial (MLflow run, Optuna number) a slot started, for a redelivered step."""
        key = f"{self.key}:slot:{slot}"
        self.client.hset(key, mapping={"trial_id": trial_id, "number": number})
        self.client.expire(key, TTL_S)

    def slot_record(self, slot: int) -> tuple[str, int] | None:
        raw = self.client.hgetall(f"{self.key}:slot:{slot}")
        return (raw[b"trial_id"].decode(), int(raw[b"number"])) if raw else None
