"""Registered model names claimed in the study storage (models.store.claims): first team wins, atomically."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from mlflow.entities.model_registry import RegisteredModel, RegisteredModelTag

from models.store.claims import SEAL_TAG, Claim, ClaimRefused, ModelClaims, claims_url, may_adopt, open_claims
from models.store.search import open_storage


@pytest.fixture(params=["journal", "sqlite-url"])
def storage(request, tmp_path: Path) -> str:
    """A study storage as the settings name it: a journal file path, or an SQLAlchemy URL."""
    return str(tmp_path / "studies.journal") if request.param == "journal" else f"sqlite:///{tmp_path / 'studies.db'}"


def test_the_claims_of_a_journal_live_in_a_sqlite_file_next_to_it(tmp_path: Path):
    journal = tmp_path / "deep" / "studies.journal"
    assert claims_url(str(journal)) == f"sqlite:///{journal.parent / 'studies.journal.claims.sqlite'}"
    open_claims(str(journal)).claim("digits", "alpha")
    assert (journal.parent / "studies.journal.claims.sqlite").is_file()


def test_the_claims_of_a_database_live_in_that_database_beside_its_studies(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    optuna.create_study(storage=open_storage(url), study_name="s")
    open_claims(url).claim("digits", "alpha")
    tables = set(sa.inspect(sa.create_engine(url)).get_table_names())
    assert {"convtune_model_claims", "studies"} <= tables
    assert claims_url("postgresql://u:p@db:5432/convtune") == "postgresql+psycopg://u:p@db:5432/convtune"
    assert claims_url("postgres://u:p@db/convtune") == "postgresql+psycopg://u:p@db/convtune"


def test_a_team_claims_a_name_once_and_gets_its_claim_back(storage: str):
    claims = open_claims(storage)
    first, new = claims.claim("digits", "alpha", "study-1")
    assert new and first.team == "alpha" and first.study_id == "study-1" and len(first.seal) == 32
    again, new = claims.claim("digits", "alpha", "study-2")  # a second study of the team reuses its name
    assert not new and again == first
    assert claims.holder("digits") == first and claims.holder("other") is None


def test_another_team_is_refused_without_learning_whose_name_it_is(storage: str):
    claims = open_claims(storage)
    claims.claim("digits", "alpha")
    with pytest.raises(ClaimRefused) as refused:
        claims.claim("digits", "beta")
    assert "alpha" not in str(refused.value) and "another team" in str(refused.value)
    with pytest.raises(ClaimRefused):
        claims.claim("digits", None)  # nor the team of an unauthenticated caller
    assert claims.holder("digits").team == "alpha"


def test_with_authentication_off_everyone_is_one_team(storage: str):
    claims = open_claims(storage)
    claim, new = claims.claim("digits", None)
    assert new and claim.team is None
    assert claims.claim("digits", None) == (claim, False)
    with pytest.raises(ClaimRefused):
        claims.claim("digits", "alpha")


def test_the_claiming_study_is_noted_once(storage: str):
    claims = open_claims(storage)
    claims.claim("digits", "alpha")
    claims.note_study("digits", "study-1")
    claims.note_study("digits", "study-2")
    assert claims.holder("digits").study_id == "study-1"


def test_claims_outlive_the_process_and_their_start_is_kept(storage: str):
    first = ModelClaims(claims_url(storage))
    claim, _ = first.claim("digits", "alpha")
    first.engine.dispose()
    second = ModelClaims(claims_url(storage))
    assert second.holder("digits") == claim and second.since == first.since


def test_threads_racing_for_one_name_leave_exactly_one_owner(storage: str):
    claims = open_claims(storage)
    teams = [f"team-{i}" for i in range(8)]
    barrier = threading.Barrier(len(teams))
    won: list[str] = []
    refused: list[str] = []

    def race(team: str) -> None:
        barrier.wait()
        try:
            _, new = claims.claim("contested", team)
            assert new
            won.append(team)
        except ClaimRefused:
            refused.append(team)

    threads = [threading.Thread(target=race, args=(t,)) for t in teams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and sorted(won + refused) == sorted(teams)
    assert claims.holder("contested").team == won[0]


def _claim_in_a_process(storage: str, team: str, start, results) -> None:
    start.wait()
    try:
        _, new = open_claims(storage).claim("contested", team)
        results.put((team, "won" if new else "again"))
    except ClaimRefused:
        results.put((team, "refused"))


def test_processes_racing_for_one_name_leave_exactly_one_owner(storage: str):
    open_claims(storage)  # the parent's engine: each forked child opens its own connections (models.store.servicedb)
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    teams = [f"team-{i}" for i in range(6)]
    procs = [ctx.Process(target=_claim_in_a_process, args=(storage, t, start, results)) for t in teams]
    for p in procs:
        p.start()
    start.set()
    outcomes = dict(results.get(timeout=60) for _ in teams)
    for p in procs:
        p.join(timeout=60)
    winners = [t for t, o in outcomes.items() if o == "won"]
    assert len(winners) == 1 and sorted(outcomes.values()).count("refused") == len(teams) - 1, outcomes
    assert open_claims(storage).holder("contested").team == winners[0]


def _model(created_ms: int | None, **tags: str) -> RegisteredModel:
    return RegisteredModel("digits", creation_timestamp=created_ms, tags=[RegisteredModelTag(k, v) for k, v in tags.items()])


def test_an_unclaimed_model_is_adopted_by_admins_or_its_legacy_team_from_before_claims_only():
    since = 1_700_000_000.0
    before, after = int(since * 1000) - 1, int(since * 1000) + 1
    assert may_adopt(_model(before, **{"convtune.team": "alpha"}), "alpha", since, admin=False)
    assert may_adopt(_model(before, **{"convtune.owner": "alpha"}), "alpha", since, admin=False)  # made before teams: its token
    assert not may_adopt(_model(after, **{"convtune.team": "alpha"}), "alpha", since, admin=False)  # a tag anyone could write since
    assert not may_adopt(_model(before, **{"convtune.team": "beta"}), "alpha", since, admin=False)
    assert not may_adopt(_model(before), "alpha", since, admin=False)  # registered by hand
    assert not may_adopt(_model(before), None, since, admin=False)
    assert may_adopt(_model(after), "alpha", since, admin=True)


def test_a_claim_covers_the_model_made_under_it_or_the_one_it_adopted():
    claim = Claim("digits", "alpha", "s", 0.0, "seal-1")
    assert claim.covers(_model(5, **{SEAL_TAG: "seal-1"}))
    assert not claim.covers(_model(5, **{SEAL_TAG: "seal-2"}))
    assert not claim.covers(_model(5, **{"convtune.team": "alpha"}))  # a squatter's model, however tagged
    adopted = Claim("digits", "alpha", "s", 0.0, "seal-1", adopted=5)
    assert adopted.covers(_model(5)) and not adopted.covers(_model(6))  # deleted and made again: not the adopted one
