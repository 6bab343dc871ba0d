"""The outcomes a run can end with: one table, read by every site that maps an outcome.

Every ended trial (a study's parent run and a range test too) carries exactly one outcome, the
MLflow tag ``convtune.outcome``, and a reason for a person. Each outcome fixes the rest of how the
run ends and how it is read back:

- ``mlflow_status``: the terminal MLflow status written with it (FINISHED, FAILED, KILLED);
- ``study_state``: the name of the Optuna ``TrialState`` a study's trial is told (COMPLETE, PRUNED:
  the configuration is bad and the sampler learns it, FAIL: nothing learnt about it); None for
  ``duplicate``, which takes its twin's state and value;
- ``client_status``: the ``status`` the API answers (``models.store.runs.client_status``);
- ``retried``: whether what causes it is first redelivered and the trial resumed from its last
  checkpoint (a lost worker, up to ``max_attempts``); every outcome itself is final;
- ``study_only``: only a study's trial ends so.

Adding an outcome is adding a row here (ARCHITECTURE.md, "Adding an outcome");
``tests/models/test_outcomes.py`` fails where the code, the API schema or docs/api.md disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.spec.errors import ConvtuneError

__all__ = ["OUTCOMES", "Outcome", "OutcomeName", "UnknownOutcome", "describe_outcomes", "outcome"]


@dataclass(frozen=True)
class Outcome:
    """One outcome: how a run that ends with it is recorded, and what it means to a person."""

    name: str
    mlflow_status: Literal["FINISHED", "FAILED", "KILLED"]
    study_state: Literal["COMPLETE", "PRUNED", "FAIL"] | None
    client_status: Literal["succeeded", "pruned", "failed", "cancelled"]
    meaning: str
    retried: bool = False
    study_only: bool = False

    @property
    def counts_as_pruned(self) -> bool:
        """Whether a study tells Optuna PRUNED: the configuration is bad, and the sampler learns it."""
        return self.study_state == "PRUNED"


_TABLE = (  # name, MLflow status, Optuna state in a study, client status, meaning
    Outcome("succeeded", "FINISHED", "COMPLETE", "succeeded", "trained all its epochs (a study, a range test: ended with a result)"),
    Outcome("pruned", "FINISHED", "PRUNED", "pruned", "a study's pruner stopped it early", study_only=True),
    Outcome("diverged", "FAILED", "PRUNED", "failed", "a divergence rule fired: the loss became non-finite or blew up"),
    Outcome("out_of_memory", "FAILED", "PRUNED", "failed", "it ran out of GPU or host memory (a smaller batch_size or model may fit)"),
    Outcome("timeout", "FAILED", "PRUNED", "failed", "it ran past the spec's time_limit_s"),
    Outcome("cancelled", "KILLED", "FAIL", "cancelled", "its cancel flag (or its study's) was raised"),
    Outcome(
        "worker_lost", "FAILED", "FAIL", "failed", "its worker died more than max_attempts times (each earlier loss resumed it from its checkpoint)",
        retried=True,
    ),
    Outcome("invalid_data", "FAILED", "FAIL", "failed", "its data could not be used"),
    Outcome("error", "FAILED", "FAIL", "failed", "anything else, with the exception's type and message (an infrastructure failure once its retries are spent)"),
    Outcome("infeasible", "FAILED", "PRUNED", "failed", "the sampled architecture cannot run on its input or is over the service's size limits", study_only=True),
    Outcome("over_budget", "FAILED", "PRUNED", "failed", "the sampled configuration breaks the study's size budget: never trained", study_only=True),
    Outcome("duplicate", "FINISHED", None, "succeeded", "the same parameters as an earlier trial: its twin's result reused, not trained again", study_only=True),
)

OUTCOMES: dict[str, Outcome] = {o.name: o for o in _TABLE}

# Built from the table: pydantic reads it at run time like a Literal written out by hand.
OutcomeName = Literal[tuple(OUTCOMES)]  # type: ignore[valid-type]


class UnknownOutcome(ConvtuneError, KeyError):
    """A name that is not an outcome of :data:`OUTCOMES`."""

    def __str__(self) -> str:
        return f"unknown outcome {self.args[0]!r}; the outcomes are {', '.join(OUTCOMES)} (models/spec/outcomes.py)"


def outcome(name: str) -> Outcome:
    """The outcome called ``name``; raises :class:`UnknownOutcome` for a name the table lacks."""
    try:
        return OUTCOMES[name]
    except KeyError:
        raise UnknownOutcome(name) from None


def describe_outcomes() -> str:
    """The outcomes for a person, as an API field's description: every name with its meaning, a study's own last."""
    listed = [o for o in _TABLE if not o.study_only] + [o for o in _TABLE if o.study_only]
    return "; ".join(f"{o.name}{' (in a study)' if o.study_only else ''}: {o.meaning}" for o in listed)
