"""The root of convtune's exceptions, :class:`ConvtuneError`; its tree is drawn in :mod:`models.errors`.

It lives here, not in :mod:`models.errors`, because the contract (:mod:`models.spec`) imports nothing
of ours but itself, and its own refusals (InfeasibleArchitecture, NoSuggestion, UnknownOutcome)
derive from it. Import it from :mod:`models.errors`.
"""

from __future__ import annotations

__all__ = ["ConvtuneError"]


class ConvtuneError(Exception):
    """Base of every exception convtune's code raises on purpose, in the API and in the workers."""
