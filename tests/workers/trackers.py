"""An in-memory tracker for training tests: what a trial logs, kept for assertions."""

from __future__ import annotations

from typing import Any

import torch


class ListTracker:
    """Records what a trial logs (the :class:`workers.training.train.Tracker` protocol), in memory."""

    def __init__(self) -> None:
        self.epochs: list[tuple[int, dict[str, float]]] = []
        self.summary: list[dict[str, Any]] = []
        self.result: tuple[Any, torch.Tensor, list] | None = None

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.epochs.append((epoch, metrics))

    def log_summary(self, rows: list[dict[str, Any]]) -> None:
        self.summary = rows

    def log_result(self, model: Any, example: torch.Tensor, history: list) -> None:
        self.result = (model, example, history)
