"""Registered model names, claimed at submit: the first team to claim a name owns it.

A study's ``register_as`` name is claimed by the API before anything of the study is created, and
checked again by the worker before it registers (:mod:`workers.study.report`). The claims live in a
table of the service's own study storage, where MLflow users cannot write (MLflow tags can be set by
anyone who may edit a registered model):

    study storage                          claims table ``convtune_model_claims``
    a journal file ``.../studies.journal``  in ``.../studies.journal.claims.sqlite``, next to it
    an SQLAlchemy URL (postgresql://...)    in that same database

A claim is one INSERT on the name (the primary key): of two teams racing for one name exactly one
row is written, and the other reads it back and is refused (:class:`ClaimRefused`). The same team
claiming again (a second study, or the worker at a study's end) gets its claim back. With
authentication off (the local stack) every caller is the team ``None``: claims still hold, for that
one team.

Each claim carries a *seal*, a random value only this table knows until the worker that first
registers under the claim creates the registered model with it as the tag ``convtune.claim``. The
worker registers only into a model that carries its claim's seal: a model of that name that someone
created in MLflow after the name was claimed (squatting) lacks it, and nothing is registered there.

Names that exist in MLflow's registry without a claim (registered by hand, or before claims existed)
are refused to every team, with two exceptions (:func:`may_adopt`): an admin may claim one for its
team, and a team may claim one whose legacy owner tag (``convtune.team``, else ``convtune.owner``)
names it and which was created before this storage's claims existed (stamped the first time a process
opened them: the first submit or study end that named a model after the upgrade; a tag can be forged later; a
model's creation time is the tracking server's). Such a claim records the adopted model's creation
time, and the worker registers into that model only (:meth:`Claim.covers`), never into one made again.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from models.errors import ConvtuneError
from models.store import servicedb
from models.store.teams import team_of

if TYPE_CHECKING:
    from mlflow.entities.model_registry import RegisteredModel
    from mlflow.tracking import MlflowClient

__all__ = ["SEAL_TAG", "Claim", "ClaimRefused", "ModelClaims", "claims_url", "may_adopt", "open_claims", "registered_model"]

SEAL_TAG = "convtune.claim"  # on a registered model: the seal of the claim it was created under
_NO_TEAM = ""  # the team None (authentication off): team names are never empty (models.store.teams.TEAM_NAME)

_metadata = sa.MetaData()
_claims = sa.Table(
    "convtune_model_claims", _metadata,
    sa.Column("name", sa.String(256), primary_key=True),  # MLflow's registered model names are at most 256 characters
    sa.Column("team", sa.String(64), nullable=False),
    sa.Column("study_id", sa.String(64), nullable=True),  # the study whose submit claimed it (set once its run exists)
    sa.Column("claimed_at", sa.Float, nullable=False),
    sa.Column("seal", sa.String(64), nullable=False),
    sa.Column("adopted", sa.BigInteger, nullable=True),  # an adopted model's creation time (ms, the tracking server's)
)
# Each team's MLflow experiment, as the service created it: any MLflow user may create an experiment named
# like a team's, so the name proves nothing and only the id recorded here is the team's (models.store.teams).
_experiments = sa.Table(
    "convtune_team_experiments", _metadata,
    sa.Column("base", sa.String(256), primary_key=True),  # CONVTUNE_EXPERIMENT: the team's is named {base}/{team}
    sa.Column("team", sa.String(64), primary_key=True),
    sa.Column("experiment_id", sa.String(64), nullable=False),
    sa.Column("recorded_at", sa.Float, nullable=False),
)
_since = sa.Table(  # one row: when this storage's claims began (names registered before then may be adopted)
    "convtune_model_claims_since", _metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("since", sa.Float, nullable=False),
)


class ClaimRefused(ConvtuneError):
    """The name is claimed by another team (never said which)."""


@dataclass(frozen=True)
class Claim:
    """A claimed registered model name: its team (None: authentication off), the study that claimed it, when, and its seal."""

    name: str
    team: str | None
    study_id: str | None
    claimed_at: float
    seal: str
    adopted: int | None = None

    def covers(self, model: RegisteredModel) -> bool:
        """Whether ``model`` is the one this claim stands for: created under it (its seal), or the existing model it adopted."""
        if (model.tags or {}).get(SEAL_TAG) == self.seal:
            return True
        return self.adopted is not None and model.creation_timestamp == self.adopted


def claims_url(study_storage: str) -> str:
    """The database of the claims of a study storage: the same database, or a sqlite file next to the journal file."""
    if "://" not in study_storage:
        path = Path(study_storage).expanduser().resolve()
        return f"sqlite:///{path.with_name(path.name + '.claims.sqlite')}"
    if study_storage.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + study_storage.split("://", 1)[1]  # as models.store.search.open_storage: psycopg 3
    return study_storage


class ModelClaims:
    """The service's claims in one database: registered model names (:meth:`claim`, :meth:`holder`, :meth:`note_study`,
    :attr:`since`) and each team's experiment (:meth:`team_experiment`, :meth:`record_team_experiment`)."""

    def __init__(self, url: str):
        self.engine = servicedb.engine(url)
        servicedb.create_tables(self.engine, _metadata)
        self.since = self._since()

    def holder(self, name: str) -> Claim | None:
        """The claim on ``name``, or None when it is unclaimed."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(_claims).where(_claims.c.name == name)).mappings().first()
        return None if row is None else _claim(row)

    def claim(self, name: str, team: str | None, study_id: str | None = None, adopted: int | None = None) -> tuple[Claim, bool]:
        """Claim ``name`` for ``team``: the claim and whether this call made it; ClaimRefused when another team holds it.

        ``adopted``: the creation time of the registered model of that name that exists unclaimed and
        that ``team`` may adopt (:func:`may_adopt`); None for a name with no model yet.
        """
        row = {
            "name": name, "team": team or _NO_TEAM, "study_id": study_id, "claimed_at": time.time(), "seal": secrets.token_hex(16), "adopted": adopted,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(_claims.insert().values(**row))
            return _claim(row), True
        except IntegrityError:
            pass  # claimed already (perhaps a moment ago, by a racing caller): whose is it?
        held = self.holder(name)
        assert held is not None, "claims are never deleted"
        if held.team != team:
            raise ClaimRefused(f"the registered model name {name!r} is claimed by another team")
        return held, False

    def note_study(self, name: str, study_id: str) -> None:
        """Record the study whose submit claimed ``name``, once its run exists (the claim comes first)."""
        with self.engine.begin() as conn:
            conn.execute(_claims.update().where(_claims.c.name == name, _claims.c.study_id.is_(None)).values(study_id=study_id))

    def claimed(self) -> list[Claim]:
        """Every claimed name (for ``convtune mlflow-access sync``)."""
        with self.engine.connect() as conn:
            return [_claim(row) for row in conn.execute(sa.select(_claims)).mappings()]

    def team_experiment(self, base: str, team: str) -> str | None:
        """The id of the experiment the service made for ``team`` under ``base``, or None before the team's first run."""
        where = (_experiments.c.base == base) & (_experiments.c.team == team)
        with self.engine.connect() as conn:
            return conn.execute(sa.select(_experiments.c.experiment_id).where(where)).scalar_one_or_none()

    def record_team_experiment(self, base: str, team: str, experiment_id: str) -> str:
        """Record ``experiment_id`` as ``team``'s; the team's experiment (another process's, when it recorded one first)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(_experiments.insert().values(base=base, team=team, experiment_id=experiment_id, recorded_at=time.time()))
            return experiment_id
        except IntegrityError:
            recorded = self.team_experiment(base, team)
            assert recorded is not None, "records are never deleted"
            return recorded

    def team_experiments(self, base: str) -> dict[str, str]:
        """Every team's experiment id under ``base``, by team."""
        with self.engine.connect() as conn:
            return {row.team: row.experiment_id for row in conn.execute(sa.select(_experiments).where(_experiments.c.base == base))}

    def _since(self) -> float:
        try:
            with self.engine.begin() as conn:
                conn.execute(_since.insert().values(id=1, since=time.time()))
        except IntegrityError:
            pass  # stamped when this storage's claims began
        with self.engine.connect() as conn:
            return float(conn.execute(sa.select(_since.c.since).where(_since.c.id == 1)).scalar_one())


def _claim(row: Any) -> Claim:
    return Claim(row["name"], row["team"] or None, row["study_id"], float(row["claimed_at"]), row["seal"], row["adopted"])


@lru_cache(maxsize=8)
def open_claims(study_storage: str) -> ModelClaims:
    """The claims of the study storage ``study_storage``, one per process (its engine: :mod:`models.store.servicedb`), tables created on first use."""
    return ModelClaims(claims_url(study_storage))


def registered_model(client: MlflowClient, name: str) -> RegisteredModel | None:
    """The registered model ``name`` in MLflow's registry, or None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def may_adopt(model: RegisteredModel, team: str | None, since: float, *, admin: bool) -> bool:
    """Whether ``team`` may claim ``model``, which exists in the registry without a claim (see the module's rule)."""
    if admin:
        return True
    created_before_claims = model.creation_timestamp is not None and model.creation_timestamp / 1000 < since
    return team is not None and team_of(model.tags or {}) == team and created_before_claims
