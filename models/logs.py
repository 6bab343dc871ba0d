"""Logging shared by the API and the workers: JSON lines carrying the trial and study ids.

Both processes call :func:`configure_logging` once at start. The ids of the trial or study being
handled live in context variables (:func:`log_context`), so every line logged while handling it,
by convtune's code or a library's, carries them without passing them around.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

__all__ = ["bind", "clear", "configure_logging", "current_ids", "log_context"]

# Never mutated in place: every bind sets a new mapping, so contexts never share one.
_CONTEXT: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("convtune_log_context", default=MappingProxyType({}))


@contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """Add ``trial_id=...``, ``study_id=...`` (or any ids) to every line logged inside the block."""
    token = _CONTEXT.set({**_CONTEXT.get(), **{k: v for k, v in ids.items() if v}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def bind(**ids: str | None) -> None:
    """Add ids to the current context until it ends (a request, a task); for code without a block."""
    _CONTEXT.set({**_CONTEXT.get(), **{k: v for k, v in ids.items() if v}})


def clear() -> None:
    """Forget the ids bound so far (at the start of each request: threads are reused)."""
    _CONTEXT.set({})


def current_ids() -> dict[str, str]:
    """The ids bound now, e.g. to pass them explicitly in a record's ``extra``."""
    return dict(_CONTEXT.get())


class _ContextFilter(logging.Filter):
    # On the handler, not a record factory: a factory would make logging refuse an ``extra`` that
    # names the same id ("Attempt to overwrite"), which callers are free to pass.
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _CONTEXT.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def configure_logging(process: str, fmt: str = "json", level: str = "INFO") -> None:
    """Send the root logger's records to stderr, as JSON lines (``fmt="json"``) or plain text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"process": process}, timestamp=False,
        ))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_convtune", False)]:
        root.removeHandler(old)
    handler._convtune = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
