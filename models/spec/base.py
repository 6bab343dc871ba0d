"""The base of every spec model: unknown fields are errors, and a validated spec never changes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Spec"]


class Spec(BaseModel):
    """A pydantic model of the contract: ``extra="forbid"`` (a misspelt field is a 422, not ignored), frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
