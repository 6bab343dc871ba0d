"""The trial contract (torch-free) and, in submodules, the torch code that builds and trains on it.

``models`` itself, ``models.spec``, ``models.shapes``, ``models.data``, ``models.protocol``,
``models.study_spec``, ``models.study_checks``, ``models.search`` and ``models.budget`` import no torch, so the API can validate and size a spec without it. ``models.convnet`` needs torch.
"""

from models.spec import AsppSpec, ConvNetSpec, DataSpec, OptimSpec, TrialSpec, flatten_params
from models.study_spec import StudySpec

__all__ = ["AsppSpec", "ConvNetSpec", "DataSpec", "OptimSpec", "StudySpec", "TrialSpec", "flatten_params"]
