"""A per-trial lease in Redis, so a message delivered twice is executed once.

Redis redelivers a trial's message when its worker dies, and also when a trial outlives the
visibility timeout. The worker that holds the lease trains; any other delivery finds it held and
steps aside. The holder renews the lease from a heartbeat thread while it trains, so a lease
whose worker died expires after ``ttl_s`` and the next delivery resumes the trial.

A lease is lost when a renewal finds another token or no key (the process was paused past the
TTL, Redis lost the key): :meth:`Lease.held` says so, and the holder then stops writing. It is
also asked before each write, since a paused process wakes up before its heartbeat does: a lease
not renewed for half its TTL is checked against Redis there and then.
"""

from __future__ import annotations

import threading
import time
import uuid
from types import TracebackType

import redis

from models.store.keys import lease_key

__all__ = ["Lease"]

# Renew or release only while we still hold the lease (compare-and-set on the token).
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class Lease:
    """Exclusive, expiring right to execute one trial."""

    def __init__(self, client: redis.Redis, trial_id: str, ttl_s: int):
        self.client = client
        self.key = lease_key(trial_id)
        self.ttl_ms = ttl_s * 1000
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self._renewed_at = time.monotonic()  # when the key was last known to be ours for ttl_s more

    def acquire(self) -> bool:
        """Take the lease if it is free; whether we hold it now."""
        asked = time.monotonic()
        taken = bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))
        self._renewed_at = asked
        return taken

    def renew(self) -> bool:
        """Extend the lease; False means it expired and someone else may hold it (lost for good)."""
        asked = time.monotonic()
        held = bool(self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms))
        if held and not self.lost:
            self._renewed_at = asked
        self.lost = self.lost or not held
        return not self.lost

    def held(self) -> bool:
        """Whether this worker may still write as the holder; False once the lease is lost, for good.

        Cheap while the heartbeat keeps up; a lease not renewed for half its TTL (the process was
        paused, or Redis is slow) is renewed here first. While Redis does not answer, it counts as
        held until the TTL of its last renewal runs out.
        """
        if self.lost:
            return False
        since = time.monotonic() - self._renewed_at
        if since < self.ttl_ms / 2000:
            return True
        try:
            return self.renew()
        except redis.RedisError:
            if since >= self.ttl_ms / 1000:
                self.lost = True
            return not self.lost

    def release(self) -> None:
        self.client.eval(_RELEASE, 1, self.key, self.token)

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
