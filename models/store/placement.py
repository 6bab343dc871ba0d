"""Where studies live, and the rule that keeps one study storage for the API and every worker.

A settings mixin both processes' settings classes inherit, so the rule is written once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

__all__ = ["StudyPlacement"]


class StudyPlacement(BaseModel):
    """``study_storage`` and ``deployment``; refuses a local study file in a distributed deployment."""

    study_storage: str = Field(
        default=".convtune/studies.journal",
        description="Optuna storage of studies, the same for the API and every worker: a journal file path (one host) or a database URL (postgresql://...).",
    )
    deployment: Literal["single-host", "distributed"] = Field(
        default="single-host",
        description=(
            "single-host: the API and every worker run on this one host, where a journal file may hold the studies; "
            "distributed (the images' default): separate hosts, containers or replicas, so study_storage must be a database they all reach."
        ),
    )

    @model_validator(mode="after")
    def _one_study_storage(self) -> StudyPlacement:
        """The API and every worker must open the same studies: a local file is one host's alone."""
        local = "://" not in self.study_storage or self.study_storage.startswith(("sqlite:", "file:"))
        if self.deployment == "distributed" and local:
            raise ValueError(
                f"CONVTUNE_STUDY_STORAGE={self.study_storage!r} is a local file, but CONVTUNE_DEPLOYMENT=distributed: every host would "
                "keep studies of its own. Set CONVTUNE_STUDY_STORAGE to a database URL the API and all workers share "
                "(postgresql://USER:PASSWORD@HOST:5432/DB), or CONVTUNE_DEPLOYMENT=single-host if they all run on this one host."
            )
        return self
