"""A per-trial lease in Redis, so a message delivered twice is executed once.

Redis redelivers a trial's message when its worker dies, and also when a trial outlives the
visibility timeout. The worker that holds the lease trains; any other delivery finds it held and
steps aside. The holder renews the lease from a heartbeat thread while it trains, so a lease
whose worker died expires after ``ttl_s`` and the next delivery resumes the trial.

A lease is lost when a renewal finds another token or no key (the process was paused past the
TTL, Redis lost the key): :meth:`Lease.held` says so, and the holder then stops writing. Two
kinds of asking: the cheap one (the per-step cancel and ownership checks inside training) trusts
a renewal younger than half the TTL; the strict one (``held(strict=True)``, before every write:
an epoch's metrics, a checkpoint, the ending) asks Redis there and then, since a paused process
wakes up before its heartbeat does, and the reconciler may have handed the trial to another
worker the moment Redis lost the key.

Each acquisition also takes a **fence**: a per-trial counter, incremented in the same script that
takes the lease, so a later holder always has a higher one. Every write carries it and the stores
that can check it do (:mod:`workers.trial.tracking`, :class:`workers.training.train.CheckpointWriter`):
a holder that lost the lease and wakes up late cannot replace what a later holder wrote. The
counter outlives any one lease (``FENCE_TTL_S``, renewed at each acquisition); should Redis forget
it anyway (a restart without persistence), the caller passes a floor (the fence the run and the
checkpoints on disk carry), and the new fence is above it.

:func:`renew_held` and :func:`release_held` are the compare-and-set on a token that every key a
worker holds uses (this lease, the reconciler's sweep lock, a study's finishing key).
"""

from __future__ import annotations

import threading
import time
import uuid
from types import TracebackType

import redis

from models.store.keys import fence_key, lease_key

__all__ = ["FENCE_TTL_S", "Lease", "release_held", "renew_held"]

# How long a trial's fence counter lives after its last acquisition: longer than any redelivery of its message.
FENCE_TTL_S = 7 * 24 * 3600

# Take the lease if it is free and, in the same step, the next fence (above ARGV[3], the floor the stores carry); 0 if held.
_ACQUIRE = """
if not redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local fence = redis.call('incr', KEYS[2])
if fence <= tonumber(ARGV[3]) then
  fence = tonumber(ARGV[3]) + 1
  redis.call('set', KEYS[2], fence)
end
redis.call('pexpire', KEYS[2], ARGV[4])
return fence
"""

# Renew or release a key only while it still holds our token (compare-and-set): never another holder's.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


def renew_held(client: redis.Redis, key: str, token: str, ttl_ms: int) -> bool:
    """Give ``key`` ``ttl_ms`` more if it still holds ``token``; False when it expired or another holder's token is there.

    Every key a worker holds with a token (a trial's lease, the reconciler's sweep lock, a study's
    finishing key) is renewed and released through these two, so none ever extends or deletes a
    key another process took after it lapsed. Raises redis.RedisError.
    """
    return bool(client.eval(_RENEW, 1, key, token, ttl_ms))


def release_held(client: redis.Redis, key: str, token: str) -> bool:
    """Delete ``key`` if it still holds ``token``; whether it did (another holder's key is left alone). Raises redis.RedisError."""
    return bool(client.eval(_RELEASE, 1, key, token))


class Lease:
    """Exclusive, expiring right to execute one trial."""

    def __init__(self, client: redis.Redis, trial_id: str, ttl_s: int):
        self.client = client
        self.key = lease_key(trial_id)
        self.fence_key = fence_key(trial_id)
        self.ttl_ms = ttl_s * 1000
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self.fence = 0  # taken with the lease (acquire); higher than every earlier holder's
        self._renewed_at = time.monotonic()  # when the key was last known to be ours for ttl_s more

    def acquire(self, floor: int = 0) -> bool:
        """Take the lease if it is free, with a fence above every earlier holder's and above ``floor``; whether we hold it now.

        ``floor``: the highest fence the trial's stores carry (its run's tag, its checkpoints), for a Redis that forgot the counter.
        """
        asked = time.monotonic()
        fence = int(self.client.eval(_ACQUIRE, 2, self.key, self.fence_key, self.token, self.ttl_ms, floor, FENCE_TTL_S * 1000))
        self._renewed_at = asked
        self.fence = fence
        return fence > 0

    def renew(self) -> bool:
        """Extend the lease; False means it expired and someone else may hold it (lost for good)."""
        asked = time.monotonic()
        held = renew_held(self.client, self.key, self.token, self.ttl_ms)
        if held and not self.lost:
            self._renewed_at = asked
        self.lost = self.lost or not held
        return not self.lost

    def held(self, strict: bool = False) -> bool:
        """Whether this worker may still write as the holder; False once the lease is lost, for good.

        Cheap while the heartbeat keeps up; a lease not renewed for half its TTL (the process was
        paused, or Redis is slow) is renewed here first. ``strict`` (before a write) renews it here
        in any case: Redis may have lost the key a moment ago, and another worker taken the trial.
        While Redis does not answer, it counts as held until the TTL of its last renewal runs out.
        """
        if self.lost:
            return False
        since = time.monotonic() - self._renewed_at
        if not strict and since < self.ttl_ms / 2000:
            return True
        try:
            return self.renew()
        except redis.RedisError:
            if since >= self.ttl_ms / 1000:
                self.lost = True
            return not self.lost

    def release(self) -> None:
        release_held(self.client, self.key, self.token)

    def __enter__(self) -> Lease:
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.key}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.release()
        except redis.RedisError:
            pass  # it expires by itself

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                self.renew()
            except redis.RedisError:
                continue  # Redis blinked: try again at the next beat, before the TTL runs out
