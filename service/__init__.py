"""convtune's programs other than the workers, one subpackage each:

- :mod:`service.api`: the HTTP API (``gunicorn "service.api:create_app()"`` or ``convtune api``);
- :mod:`service.cli`: the ``convtune`` command (``convtune up``, ``submit``, ``study``, ``wait``...);
- :mod:`service.stack`: the local stack supervisor behind ``convtune up``, and its demo;
- :mod:`service.client`: the Python client of the API, used by the CLI and the demo and importable
  by other services.

None of them imports torch or ``workers``; the API imports none of the others (import-linter
contracts in ``pyproject.toml``).
"""
