"""``when`` conditions of a search space (models.spec.space.condition_met), as the checks and Optuna's sampling apply them."""

from __future__ import annotations

from typing import Any

import optuna
import pytest

from models.spec.space import condition_met, corner_points
from models.spec.study import StudySpec
from models.store.search import suggest
from tests.helpers import tiny_trial

BASE = {"optim": {"optimizer": "adamw", "lr": 0.01}, "model": {"channels": [8, 16]}}
WHEN = {"optim.optimizer": ["momentum", "nesterov"]}


@pytest.mark.parametrize(("when", "assigned", "met"), [
    (None, {}, True),
    ({}, {}, True),
    (WHEN, {}, False),  # the base's adamw
    (WHEN, {"optim.optimizer": "nesterov"}, True),  # an earlier key's value wins over the base's
    ({"optim.optimizer": ["adamw"]}, {"optim.optimizer": "momentum"}, False),
    ({"optim.optimizer": ["adamw"], "model.channels": [[8, 16]]}, {}, True),  # every path must be met
    ({"optim.optimizer": ["adamw"], "model.channels": [[4]]}, {}, False),
    ({"model.head.kind": ["linear"]}, {}, False),  # a path through a missing field has no value
])
def test_a_condition_is_met_when_every_path_it_names_has_an_allowed_value(when: dict | None, assigned: dict[str, Any], met: bool):
    assert condition_met(when, assigned, BASE) is met


def conditional_study() -> StudySpec:
    return StudySpec.model_validate({
        "base": tiny_trial(),
        "search_space": {
            "optim.optimizer": ["adamw", "momentum"],
            "optim.momentum": {"type": "float", "low": 0.5, "high": 0.9, "when": {"optim.optimizer": ["momentum"]}},
        },
        "n_trials": 4,
    })


def test_optuna_samples_a_conditional_parameter_only_when_its_condition_is_met():
    spec = conditional_study()
    # A FixedTrial raises on a parameter it was not given: momentum is never asked for with adamw.
    assert suggest(optuna.trial.FixedTrial({"optim.optimizer": "adamw"}), spec) == {"optim.optimizer": "adamw"}
    assert suggest(optuna.trial.FixedTrial({"optim.optimizer": "momentum", "optim.momentum": 0.7}), spec) == {"optim.optimizer": "momentum", "optim.momentum": 0.7}


def test_the_checks_see_the_same_points_optuna_samples():
    assert list(corner_points(conditional_study())) == [
        {"optim.optimizer": "adamw"}, {"optim.optimizer": "momentum", "optim.momentum": 0.5}, {"optim.optimizer": "momentum", "optim.momentum": 0.9},
    ]
