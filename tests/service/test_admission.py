"""The epoch limit of service.api.admission: one check for a trial, a range test's trial, a study's base and its space."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from models.spec.study import StudySpec
from models.spec.trial import TrialSpec
from service.api.admission import admit_trial, check_epochs, check_space
from service.api.errors import InvalidSpec
from service.api.settings import ApiSettings
from service.api.studies.accept import check_study
from tests.helpers import tiny_trial

SETTINGS = ApiSettings(max_epochs=10)


def refused_field(call) -> str:
    with pytest.raises(InvalidSpec) as raised:
        call()
    assert "at most 10 epochs" in raised.value.detail and "CONVTUNE_MAX_EPOCHS" in raised.value.detail
    return raised.value.errors[0].field


def test_the_limit_itself_is_allowed_and_one_more_is_refused_on_the_field_named():
    check_epochs(10, SETTINGS, "optim.epochs")
    assert refused_field(lambda: check_epochs(11, SETTINGS, "base.optim.epochs")) == "base.optim.epochs"


def test_a_trial_over_the_limit_is_refused_on_its_epochs_under_the_prefix():
    spec = TrialSpec.model_validate(tiny_trial(optim={"epochs": 11}))
    assert refused_field(lambda: admit_trial(spec, SETTINGS, None, field_prefix="trial.")) == "trial.optim.epochs"
    assert admit_trial(spec, ApiSettings(max_epochs=11), None) is not None


def test_a_space_that_reaches_past_the_limit_is_refused_on_the_searched_field():
    spec = StudySpec.model_validate({"base": tiny_trial(), "search_space": {"optim.epochs": {"type": "int", "low": 2, "high": 11}}, "n_trials": 2})
    assert refused_field(lambda: check_space(spec, SETTINGS, None)) == "search_space.optim.epochs"
    check_space(spec, ApiSettings(max_epochs=11), None)


def test_a_study_whose_base_is_over_the_limit_is_refused_on_its_base():
    spec = StudySpec.model_validate({"base": tiny_trial(optim={"epochs": 11}), "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}, "n_trials": 2})
    assert refused_field(lambda: check_study(SimpleNamespace(settings=SETTINGS), spec, None)) == "base.optim.epochs"
