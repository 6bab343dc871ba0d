"""torch's state dicts: the load metadata a module's ``state_dict()`` carries beside its tensors.

``nn.Module.state_dict()`` returns an ``OrderedDict`` with an attribute ``_metadata`` (each
submodule's prefix -> ``{"version": ...}``), and ``load_state_dict`` hands each submodule its entry
so that ``_load_from_state_dict`` can read a checkpoint written by an older version of that module.
``workers.training`` snapshots a checkpoint's state by rebuilding its containers (cheaper than
``copy.deepcopy``), which drops that attribute unless it is copied across: this module copies it,
and checks once per process that the installed torch still keeps it there.

Checked on torch 2.13.0 (``tests/compat/test_torch_state.py``). Imports torch: only the workers
import this module (the API never loads torch).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping

from torch import nn

from models.compat._base import CompatError

__all__ = ["check_load_metadata", "copy_load_metadata"]

_LIBRARY = "torch"
_ASSUMPTION = "a module's state_dict() carries its submodules' versions in its _metadata attribute"


@functools.cache
def check_load_metadata() -> None:
    """Raise CompatError unless a module's ``state_dict()`` carries its load metadata in ``_metadata``."""
    state = nn.BatchNorm1d(1).state_dict()  # a module with a version of its own
    metadata = getattr(state, "_metadata", None)
    if not isinstance(metadata, dict) or not isinstance(metadata.get(""), dict) or "version" not in metadata[""]:
        raise CompatError(_LIBRARY, _ASSUMPTION, __name__, f"BatchNorm1d's state_dict has _metadata {metadata!r}")


def copy_load_metadata(source: Mapping, target: Mapping) -> None:
    """Give ``target``, a rebuilt copy of the state dict ``source``, a copy of the load metadata torch keeps on ``source`` (if any).

    Raises CompatError when the installed torch keeps that metadata elsewhere (a copy would load
    without it, silently).
    """
    check_load_metadata()
    metadata = getattr(source, "_metadata", None)
    if metadata is not None:
        target._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
