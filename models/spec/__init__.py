"""The contract the API and the workers share: pydantic specs and the arithmetic that checks them.

Imports neither torch nor file readers (numpy, PIL): the API validates and sizes a spec with it
alone, and the workers re-validate the payload they receive with the same classes.
"""

from models.spec.plan import InfeasibleArchitecture, InputInfo, NetworkPlan, plan_network
from models.spec.study import StudySpec
from models.spec.trial import AsppSpec, ConvNetSpec, DataSpec, OptimSpec, TrialSpec, flatten_params
from models.spec.tuning import LrRangeSpec

__all__ = [
    "AsppSpec", "ConvNetSpec", "DataSpec", "InfeasibleArchitecture", "InputInfo", "LrRangeSpec", "NetworkPlan", "OptimSpec", "StudySpec",
    "TrialSpec", "flatten_params", "plan_network",
]
