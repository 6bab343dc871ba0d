"""The one error an adapter raises when an installed library no longer matches what it assumes."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from models.errors import ConvtuneError

__all__ = ["CompatError", "installed_version", "require"]


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution`` (``"not installed"`` when it is not)."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


class CompatError(ConvtuneError, RuntimeError):
    """An installed library breaks an assumption a ``models.compat`` module makes about its internals.

    The message names the library, its installed version, the assumption and the module that makes
    it: pin the library to the versions ``pyproject.toml`` allows, or update that module (and its
    contract test in ``tests/compat``).
    """

    def __init__(self, library: str, assumption: str, module: str, detail: str = ""):
        self.library, self.version, self.assumption = library, installed_version(library), assumption
        why = f" ({detail})" if detail else ""
        super().__init__(
            f"{library} {self.version} no longer holds what {module} assumes: {assumption}{why}; "
            f"install a version pyproject.toml allows, or update {module} and its test in tests/compat",
        )


def require(obj: object, name: str, library: str, assumption: str, module: str) -> object:
    """``getattr(obj, name)``, or CompatError naming ``assumption`` when ``obj`` has no ``name``."""
    try:
        return getattr(obj, name)
    except AttributeError as exc:
        raise CompatError(library, assumption, module, f"{type(obj).__name__} has no {name!r}") from exc
