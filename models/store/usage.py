"""Compute accounting: what each run used, in the service's own database, and the quotas that read it.

Every trial, range test and study trial that a worker ends is one row of ``convtune_usage``, keyed
by its run id, in the same database as the claims (:func:`models.store.claims.claims_url`: a sqlite
file next to the journal file, or the Postgres study database)::

    run_id  team  device_kind  queue  kind  study_id  accepted_at  ended_at  estimate  device_seconds  cpu_seconds  flops

The API writes a row when it accepts work (``ended_at`` NULL, ``estimate``: the device-seconds it
expects, :func:`estimate_trial`), before the work's message is sent; the worker that ends the run
writes the rest (:meth:`UsageStore.record`, an upsert on the run id: a redelivery that ends the run
again rewrites the same row, never a second one). A study's parent run has a row of its own, closed
at the study's end (:meth:`UsageStore.close`) with no usage: its trials' rows carry it. An open row
is work accepted and not yet ended, which the quotas count at its estimate (a study's: its estimate
less what its trials used so far).

Each queue's measured throughput, training FLOPs per device-second, is a moving average in Redis
(:func:`note_throughput`, :func:`throughputs`) that the worker moves at each end and the API reads
for its estimates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from models.store import servicedb
from models.store.claims import claims_url

if TYPE_CHECKING:
    import redis

    from models.spec.trial import TrialSpec

__all__ = [
    "DAY_S", "QuotaRefusal", "QuotaUse", "UsageRecord", "UsageStore", "UsageTotal", "check_quota",
    "estimate_trial", "note_throughput", "open_usage", "samples_per_epoch", "throughputs",
]

DAY_S = 24 * 3600
_NO_TEAM = ""  # the team None (authentication off): team names are never empty
_THROUGHPUT_KEY = "convtune:usage:throughput"  # hash: queue -> training FLOPs per device-second (moving average)
_SECONDS_KEY = "convtune:usage:seconds"  # hash: queue -> device-seconds per ended trial (moving average)
_ALPHA = 0.2  # weight of the newest run in those averages
_MIN_MEASURED_S = 0.5  # runs shorter than this (set-up dominated) do not move the throughput

_metadata = sa.MetaData()
_usage = sa.Table(
    "convtune_usage", _metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("team", sa.String(64), nullable=False, index=True),
    sa.Column("device_kind", sa.String(256), nullable=True),
    sa.Column("queue", sa.String(128), nullable=True),
    sa.Column("kind", sa.String(32), nullable=False),  # trial, lr_finder, study_trial, study (a parent: no usage of its own)
    sa.Column("study_id", sa.String(64), nullable=True, index=True),
    sa.Column("accepted_at", sa.Float, nullable=True),
    sa.Column("ended_at", sa.Float, nullable=True, index=True),  # NULL: accepted, not ended
    sa.Column("estimate", sa.Float, nullable=False, default=0.0),  # device-seconds expected at accept
    sa.Column("device_seconds", sa.Float, nullable=False, default=0.0),
    sa.Column("cpu_seconds", sa.Float, nullable=False, default=0.0),
    sa.Column("flops", sa.Float, nullable=False, default=0.0),
)


@dataclass(frozen=True)
class UsageRecord:
    """What one run used, as its worker measured it when it ended."""

    run_id: str
    team: str | None
    kind: str
    device_kind: str | None = None
    queue: str | None = None
    study_id: str | None = None
    device_seconds: float = 0.0
    cpu_seconds: float = 0.0
    flops: float = 0.0
    ended_at: float | None = None


@dataclass(frozen=True)
class UsageTotal:
    """One team's use on one device kind over a span of time."""

    team: str | None
    device_kind: str
    device_seconds: float
    cpu_seconds: float
    flops: float
    runs: int


@dataclass(frozen=True)
class QuotaUse:
    """A team's standing against its quotas: device-seconds ended in the last 24 h (with when each ended) and those accepted, not ended."""

    used: list[tuple[float, float]]  # (ended_at, device_seconds), oldest first
    queued: float

    @property
    def used_total(self) -> float:
        return sum(seconds for _, seconds in self.used)


class UsageStore:
    """The usage rows in one database (see the module's doc)."""

    def __init__(self, url: str):
        self.engine = servicedb.engine(url)
        servicedb.create_tables(self.engine, _metadata)

    def reserve(self, run_id: str, team: str | None, kind: str, queue: str | None, estimate: float, study_id: str | None = None) -> None:
        """Record accepted work (open, at ``estimate`` device-seconds); nothing when the run has a row already (ended first)."""
        row = {
            "run_id": run_id, "team": team or _NO_TEAM, "kind": kind, "queue": queue, "study_id": study_id, "accepted_at": time.time(),
            "estimate": float(estimate), "device_seconds": 0.0, "cpu_seconds": 0.0, "flops": 0.0,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(_usage.insert().values(**row))
        except IntegrityError:
            pass  # its worker ended it before this row was written: the ended row stands

    def record(self, usage: UsageRecord) -> None:
        """Write what ``usage.run_id`` used and close its row (an upsert: the same run recorded again replaces its row)."""
        values = {
            "team": usage.team or _NO_TEAM, "kind": usage.kind, "device_kind": usage.device_kind, "queue": usage.queue,
            "study_id": usage.study_id, "ended_at": usage.ended_at if usage.ended_at is not None else time.time(),
            "device_seconds": float(usage.device_seconds), "cpu_seconds": float(usage.cpu_seconds), "flops": float(usage.flops),
        }
        with self.engine.begin() as conn:
            done = conn.execute(_usage.update().where(_usage.c.run_id == usage.run_id).values(**values)).rowcount
        if done:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(_usage.insert().values(run_id=usage.run_id, estimate=0.0, **values))
        except IntegrityError:  # reserved a moment ago by a racing accept: update it
            with self.engine.begin() as conn:
                conn.execute(_usage.update().where(_usage.c.run_id == usage.run_id).values(**values))

    def close(self, run_id: str, ended_at: float | None = None) -> bool:
        """Close an open row without usage (a run ended by something other than its worker, a study's parent); whether one was open."""
        stamp = ended_at if ended_at is not None else time.time()
        with self.engine.begin() as conn:
            done = conn.execute(_usage.update().where(_usage.c.run_id == run_id, _usage.c.ended_at.is_(None)).values(ended_at=stamp)).rowcount
        return bool(done)

    def get(self, run_id: str) -> dict[str, Any] | None:
        """A run's row, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(_usage).where(_usage.c.run_id == run_id)).mappings().first()
        return None if row is None else {**row, "team": row["team"] or None}

    def totals(self, since: float, until: float, team: str | None = None, *, every_team: bool = False) -> list[UsageTotal]:
        """Use of runs that ended in [since, until), by team and device kind; one team's, or ``every_team``'s."""
        c = _usage.c
        where = [c.ended_at.is_not(None), c.ended_at >= since, c.ended_at < until, c.kind != "study"]
        if not every_team:
            where.append(c.team == (team or _NO_TEAM))
        return self._grouped(sa.and_(*where))

    def all_time(self) -> list[UsageTotal]:
        """Every team's use since the table began, by device kind (the /metrics counters)."""
        return self._grouped(sa.and_(_usage.c.ended_at.is_not(None), _usage.c.kind != "study"))

    def _grouped(self, where: Any) -> list[UsageTotal]:
        c = _usage.c
        kind = sa.func.coalesce(c.device_kind, "none")
        query = (
            sa.select(c.team, kind.label("device_kind"), sa.func.sum(c.device_seconds), sa.func.sum(c.cpu_seconds), sa.func.sum(c.flops), sa.func.count())
            .where(where).group_by(c.team, kind).order_by(c.team, kind)
        )
        with self.engine.connect() as conn:
            return [UsageTotal(t or None, k, float(d or 0), float(u or 0), float(f or 0), int(n)) for t, k, d, u, f, n in conn.execute(query)]

    def quota_use(self, team: str | None, now: float | None = None) -> QuotaUse:
        """``team``'s device-seconds ended in the last 24 h and accepted, not ended (a study's estimate less what its trials used)."""
        now = time.time() if now is None else now
        c, name = _usage.c, team or _NO_TEAM
        with self.engine.connect() as conn:
            used = conn.execute(
                sa.select(c.ended_at, c.device_seconds).where(c.team == name, c.ended_at.is_not(None), c.ended_at > now - DAY_S, c.device_seconds > 0)
                .order_by(c.ended_at)
            ).all()
            pending = conn.execute(sa.select(c.run_id, c.kind, c.estimate).where(c.team == name, c.ended_at.is_(None))).all()
            studies = [run_id for run_id, kind, _ in pending if kind == "study"]
            spent: dict[str, float] = {}
            if studies:
                spent = dict(conn.execute(
                    sa.select(c.study_id, sa.func.sum(c.device_seconds)).where(c.study_id.in_(studies), c.ended_at.is_not(None)).group_by(c.study_id)
                ).all())
        queued = sum(max(0.0, float(estimate) - float(spent.get(run_id) or 0.0)) for run_id, _, estimate in pending)
        return QuotaUse([(float(t), float(s)) for t, s in used], queued)

    def study_totals(self, study_id: str) -> tuple[dict[str, float], list[str]]:
        """What the runs of study ``study_id`` used so far ({device_seconds, cpu_seconds, train_flops}), and their device kinds."""
        c = _usage.c
        with self.engine.connect() as conn:
            d, u, f = conn.execute(
                sa.select(sa.func.sum(c.device_seconds), sa.func.sum(c.cpu_seconds), sa.func.sum(c.flops)).where(c.study_id == study_id, c.ended_at.is_not(None))
            ).one()
            kinds = sorted(k for (k,) in conn.execute(sa.select(c.device_kind).where(c.study_id == study_id, c.device_kind.is_not(None)).distinct()))
        return {"device_seconds": float(d or 0), "cpu_seconds": float(u or 0), "train_flops": float(f or 0)}, kinds

    def open_runs(self, team: str | None) -> list[str]:
        """The run ids of ``team``'s open rows (accepted, not ended)."""
        c = _usage.c
        with self.engine.connect() as conn:
            return [r for (r,) in conn.execute(sa.select(c.run_id).where(c.team == (team or _NO_TEAM), c.ended_at.is_(None)))]


@lru_cache(maxsize=8)
def open_usage(study_storage: str) -> UsageStore:
    """The usage rows of the study storage ``study_storage``' database, one store per process (its engine: :mod:`models.store.servicedb`)."""
    return UsageStore(claims_url(study_storage))


def note_throughput(client: redis.Redis, queue: str, flops: float, device_seconds: float) -> None:
    """Move ``queue``'s measured throughput and device-seconds per trial by one ended run (moving averages; races lose one sample)."""
    if device_seconds <= 0:
        return
    pipe = client.pipeline(transaction=False)
    pipe.hget(_THROUGHPUT_KEY, queue)
    pipe.hget(_SECONDS_KEY, queue)
    throughput, seconds = pipe.execute()
    pipe = client.pipeline(transaction=False)
    if flops > 0 and device_seconds >= _MIN_MEASURED_S:
        pipe.hset(_THROUGHPUT_KEY, queue, repr(_moved(throughput, flops / device_seconds)))
    pipe.hset(_SECONDS_KEY, queue, repr(_moved(seconds, device_seconds)))
    pipe.execute()


def _moved(old: bytes | str | None, value: float) -> float:
    return value if old is None else float(old) + _ALPHA * (value - float(old))


def throughputs(client: redis.Redis, queues: Iterable[str] | None = None) -> dict[str, tuple[float | None, float | None]]:
    """{queue: (training FLOPs per device-second, device-seconds per trial)}, None where nothing was measured yet."""
    pipe = client.pipeline(transaction=False)  # one round trip: the API reads it on every submit
    pipe.hgetall(_THROUGHPUT_KEY)
    pipe.hgetall(_SECONDS_KEY)
    rates, seconds = pipe.execute()

    def decoded(found: dict) -> dict[str, float]:
        return {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in found.items()}

    rates, seconds = decoded(rates), decoded(seconds)
    names = set(rates) | set(seconds) if queues is None else set(queues)
    return {q: (rates.get(q), seconds.get(q)) for q in sorted(names)}


def samples_per_epoch(spec: TrialSpec) -> int | None:
    """Training samples one epoch of ``spec`` sees (the built-in sets less their validation share); None for file data (unknown here)."""
    data = spec.data
    total = {"digits": 1797, "shapes": getattr(data, "num_samples", None)}.get(data.name)
    if total is None:
        return None
    return total - max(1, round(data.val_fraction * total))


def estimate_trial(
    spec: TrialSpec, flops_per_sample: int | None, throughput: float | None, seconds_per_trial: float | None = None,
    how: Literal["flops", "time_limit"] = "flops",
) -> tuple[float, str]:
    """The device-seconds one trial of ``spec`` is expected to use, and how it was estimated.

    ``flops``: training FLOPs (forward FLOPs per sample x samples per epoch x epochs x 3, for the
    backward pass) over the queue's measured ``throughput`` (FLOPs per device-second). ``time_limit``:
    the trial's time limit on each of its devices. Each falls back on the other when it cannot be
    computed (no throughput measured yet, file data, no time limit), then on the queue's measured
    device-seconds per trial, then on 0 (nothing known: the quota counts the work once it ran).
    """
    by_limit = spec.time_limit_s * spec.devices if spec.time_limit_s else None
    samples = samples_per_epoch(spec)
    by_flops = None
    if flops_per_sample and samples and throughput:
        by_flops = 3.0 * flops_per_sample * samples * spec.optim.epochs / throughput
    order = [("flops", by_flops), ("time_limit", by_limit)] if how == "flops" else [("time_limit", by_limit), ("flops", by_flops)]
    for name, value in order + [("measured", seconds_per_trial)]:
        if value is not None and math.isfinite(value):
            return float(value), name
    return 0.0, "unknown"


@dataclass(frozen=True)
class QuotaRefusal:
    """Why a submit is over a quota: which limit, the team's use against it, this submit's estimate, and when it frees up."""

    quota: Literal["device_seconds_per_day", "queued_device_seconds"]
    limit: float
    used: float
    estimate: float
    retry_after_s: int
    frees_at: float | None  # None: never, this submit alone is over the limit


def check_quota(
    use: QuotaUse, estimate: float, *, device_seconds_per_day: float | None, queued_device_seconds: float | None, now: float | None = None,
    wait_for_queued_s: int = 60,
) -> QuotaRefusal | None:
    """None when a submit of ``estimate`` device-seconds fits both limits, else the first it breaks.

    The daily limit counts the rolling 24 h: what ended in them plus what is queued or running plus this
    submit; it frees up when enough of what ended rolls out of the window (``frees_at``), or, when queued
    work alone fills it, once some of that ends (``wait_for_queued_s``, a guess). The queued limit counts
    what is queued or running plus this submit.
    """
    now = time.time() if now is None else now
    if queued_device_seconds is not None and use.queued + estimate > queued_device_seconds:
        never = estimate > queued_device_seconds  # this submit alone is over the limit
        return QuotaRefusal(
            "queued_device_seconds", queued_device_seconds, use.queued, estimate,
            retry_after_s=wait_for_queued_s, frees_at=None if never else now + wait_for_queued_s,
        )
    if device_seconds_per_day is not None:
        total = use.used_total + use.queued + estimate
        if total > device_seconds_per_day:
            frees_at: float | None = None
            if estimate <= device_seconds_per_day:  # else never: this submit alone is over the limit
                frees_at = now + wait_for_queued_s  # queued work fills it: some of that has to end first (a guess)
                excess, rolled = total - device_seconds_per_day, 0.0
                for ended_at, seconds in use.used:  # oldest first: the first to leave the window
                    rolled += seconds
                    if rolled >= excess:
                        frees_at = ended_at + DAY_S
                        break
            retry = math.ceil(frees_at - now) if frees_at is not None else wait_for_queued_s
            return QuotaRefusal("device_seconds_per_day", device_seconds_per_day, use.used_total + use.queued, estimate, max(1, retry), frees_at)
    return None
