"""What the API and the workers share.

- :mod:`models.spec`: the contract, torch-free and file-free: trial, study and range-test specs, the
  search space and its checks, the feasibility plan (sizes, parameters, FLOPs per layer).
- :mod:`models.data`: the data sets, described (for the API) and loaded as arrays (for the workers);
  numpy and file readers, no torch.
- :mod:`models.nets`: the torch modules a spec describes. Only the workers import it.
- :mod:`models.store`: the records both sides keep: a run's life in MLflow, the Optuna study
  storage, Redis keys and a study's trial slots.
- :mod:`models.messages`: the Celery messages between them; :mod:`models.logs` and
  :mod:`models.callbacks`: JSON logs and signed callback events.

The import rules between these (and ``service`` and ``workers``) are import-linter contracts in
``pyproject.toml``, checked in CI.
"""

from models.spec import AsppSpec, ConvNetSpec, DataSpec, OptimSpec, StudySpec, TrialSpec, flatten_params

__all__ = ["AsppSpec", "ConvNetSpec", "DataSpec", "OptimSpec", "StudySpec", "TrialSpec", "flatten_params"]
