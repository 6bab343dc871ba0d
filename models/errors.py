"""The exceptions both processes share, under one root, :class:`ConvtuneError`.

    ConvtuneError                                  (models/spec/errors.py: the contract imports only itself)
     +-- InfeasibleArchitecture  (+ ValueError)    models/spec/plan.py      the architecture cannot run on its input
     +-- NoSuggestion            (+ ValueError)    models/spec/tuning.py    a range test's curve gives no learning rate
     +-- UnknownOutcome          (+ KeyError)      models/spec/outcomes.py  a name the outcome table lacks
     +-- InvalidData             (+ ValueError)    models/data/roots.py     the spec's data set cannot be used
     +-- SealBroken              (+ ValueError)    models/sealing.py        a sealed value this service's key does not open
     +-- CompatError             (+ RuntimeError)  models/compat/_base.py   an installed library breaks a compat module's assumption
     +-- NotSent                                   models/messages.py       the broker did not take the message
     +-- AccessNotGranted                          models/store/access.py   MLflow refused a grant or did not answer
     +-- ClaimRefused                              models/store/claims.py   another team claimed the name
     +-- ApiError                                  service/api/errors.py    the API's tree: every problem+json answer
     +-- WorkerError                               workers/errors.py        the workers' tree: stops, leases, deliveries

Each class stays in the module that raises it (and is imported from there); this module only names
the root and draws the tree. A builtin base a class had before the root came stays as its second base,
so that what catches the builtin still catches it: pydantic turns a ValueError raised in a validator
into a field error, ``Ending.of`` documents UnknownOutcome as a KeyError.
The client (:mod:`service.client`) has its own root, ``ClientError``: it imports nothing of ``models``.
"""

from __future__ import annotations

from models.spec.errors import ConvtuneError

__all__ = ["ConvtuneError"]
