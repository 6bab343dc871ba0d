"""An in-memory tracker for training tests: what a trial logs, kept for assertions."""

from __future__ import annotations

from concurrent.futures import wait
from typing import Any

import torch


class ListTracker:
    """Records what a trial logs (the :class:`workers.training.train.Tracker` protocol), in memory."""

    def __init__(self) -> None:
        self.epochs: list[tuple[int, dict[str, float]]] = []
        self.stamps: list[int | None] = []  # each logged epoch's at_ms
        self.summary: list[dict[str, Any]] = []
        self.result: tuple[Any, torch.Tensor, list] | None = None
        self.served: Any = None  # the trial's ServedInputs, as log_result got them

    def log_epoch(self, epoch: int, metrics: dict[str, float], at_ms: int | None = None, after: Any = None) -> None:
        if after is not None:
            wait([after])  # as the real tracker: the epoch's checkpoint is written before its metrics go
        self.epochs.append((epoch, metrics))
        self.stamps.append(at_ms)

    def log_summary(self, rows: list[dict[str, Any]]) -> None:
        self.summary = rows

    def log_result(self, model: Any, example: torch.Tensor, history: list, served: Any = None) -> None:
        self.result = (model, example, history)
        self.served = served
