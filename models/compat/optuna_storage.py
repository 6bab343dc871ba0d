"""Optuna: a study's storage, and the storage's id of a trial known by its number.

Optuna's public ``Study`` names trials by number; its storage (the journal file, the RDB) keys them
by an id of its own. convtune writes to a trial outside its objective (failing it, telling it from
an ended MLflow run, rebuilding a running one to train it on), which takes the storage and that id.
``Study`` exposes neither: this module reads ``Study._storage`` and ``Study._study_id`` and asks the
storage ``get_trial_id_from_study_id_trial_number`` (a public ``BaseStorage`` method). What it
returns is used through ``BaseStorage``'s public methods and ``optuna.Trial(study, trial_id)``.

Checked on optuna 5.1.0 (``tests/compat/test_optuna_storage.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.compat._base import CompatError, require

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage

__all__ = ["storage", "trial_id"]

_LIBRARY = "optuna"


def storage(study: optuna.Study) -> BaseStorage:
    """The storage ``study`` reads and writes (``Study._storage``)."""
    return require(study, "_storage", _LIBRARY, "a Study keeps its storage in Study._storage", __name__)  # type: ignore[return-value]


def trial_id(study: optuna.Study, number: int) -> int:
    """The storage's id of ``study``'s trial ``number``; KeyError when the study has no such trial."""
    study_id = require(study, "_study_id", _LIBRARY, "a Study keeps its storage id in Study._study_id", __name__)
    lookup = require(
        storage(study), "get_trial_id_from_study_id_trial_number", _LIBRARY,
        "a study's storage maps a trial number to its id (get_trial_id_from_study_id_trial_number)", __name__,
    )
    found = lookup(study_id, number)  # type: ignore[operator]
    if not isinstance(found, int):
        raise CompatError(_LIBRARY, "a trial's storage id is an int", __name__, f"got {type(found).__name__}")
    return found
