"""The Study internals models.compat.optuna_storage relies on, against the installed optuna (in memory and a journal file)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from models.compat import CompatError, optuna_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _journal(path: Path) -> optuna.storages.BaseStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


@pytest.mark.parametrize("kind", ["memory", "journal"])
def test_a_trial_number_maps_to_the_storage_id_that_names_it(kind: str, tmp_path: Path):
    storage = optuna.storages.InMemoryStorage() if kind == "memory" else _journal(tmp_path / "study.log")
    optuna.create_study(study_name="other", storage=storage).ask()  # ids count across studies, numbers per study
    study = optuna.create_study(study_name="study", storage=storage)
    trials = [study.ask() for _ in range(3)]
    study.tell(trials[1], 0.5)

    assert optuna_storage.storage(study) is storage
    for trial in trials:
        found = optuna_storage.trial_id(study, trial.number)
        assert optuna_storage.storage(study).get_trial(found).number == trial.number
        assert optuna.Trial(study, found).number == trial.number
    assert optuna_storage.storage(study).get_trial(optuna_storage.trial_id(study, 1)).state == TrialState.COMPLETE
    with pytest.raises(KeyError):
        optuna_storage.trial_id(study, 3)


def test_a_study_without_its_storage_attribute_is_named_in_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    study = optuna.create_study()
    study.ask()
    monkeypatch.delattr(study, "_storage")
    with pytest.raises(CompatError, match=r"optuna .* models\.compat\.optuna_storage assumes: a Study keeps its storage in Study\._storage"):
        optuna_storage.trial_id(study, 0)


def test_a_storage_without_the_number_lookup_is_named_in_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    study = optuna.create_study()
    study.ask()
    for kind in (optuna.storages.InMemoryStorage, optuna.storages.BaseStorage):
        monkeypatch.delattr(kind, "get_trial_id_from_study_id_trial_number")
    with pytest.raises(CompatError, match="maps a trial number to its id"):
        optuna_storage.trial_id(study, 0)
