"""What convtune assumes of its dependencies' internals: one module per library, the only place each is touched.

A private attribute, a helper outside a library's documented API or a storage layout another
library owns can change in any release. Each assumption lives in one module here, with the
versions it was checked on in its docstring and a contract test of exactly that assumption in
``tests/compat`` (one file per module), so an upgrade fails there, and at run time with a
:class:`CompatError` naming the library, its installed version and the assumption, rather than
somewhere inside a trial. ``pyproject.toml`` caps each of these libraries to the versions the
contract tests passed on; ``deploy/newest-deps.sh`` runs them against the newest releases.

- :mod:`models.compat.torch_export`: the pt2 archive's weight records (workers only: it imports torch)
- :mod:`models.compat.torch_state`: the load metadata on a module's state dict (workers only: it imports torch)
- :mod:`models.compat.optuna_storage`: a study's storage and a trial's storage id
- :mod:`models.compat.mlflow_store`: the client's tracking store, MLflow's REST helper, artifact repositories, the tables tag, the proxied artifact layout
- :mod:`models.compat.kombu_redis`: kombu's Redis keys for queued and unacked messages
- :mod:`models.compat.httpx_transport`: the connection pool inside httpx's transport

This package imports none of them: each module imports its library only where it is used.
"""

from __future__ import annotations

from models.compat._base import CompatError, installed_version

__all__ = ["CompatError", "installed_version"]
