"""The ``convtune`` command (:func:`main`) and the Python client of the API it uses."""

from service.cli.main import main

__all__ = ["main"]
