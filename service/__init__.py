"""convtune's programs other than the workers, one subpackage each:

- :mod:`service.api`: the HTTP API (``gunicorn "service.api:create_app()"`` or ``convtune api``);
- :mod:`service.cli`: the ``convtune`` command and the Python client it drives the API with;
- :mod:`service.stack`: the local stack supervisor behind ``convtune up``.

None of them imports torch or ``workers`` (import-linter contracts in ``pyproject.toml``).
"""
