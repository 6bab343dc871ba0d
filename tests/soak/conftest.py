"""The soak tier: selected only by a ``-m`` expression that names ``soak`` (``.ci/run`` runs it as its own step).

The soak test takes minutes of wall time with faults landing on a private stack; the suite's
command (``pytest -q``) leaves it out, so the suite keeps its own time.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "soak" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("soak") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("soak") is not None])
        items[:] = kept
