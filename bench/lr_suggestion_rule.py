"""Which rule turns a range test into a learning rate: "largest stable / 10" (fastai's minimum / 10)
or "largest stable / 3" (Smith's third of the maximum, the one convtune uses)?

For a few optimizer x normalisation settings on digits, it runs the range test once, trains the
same tiny net for 8 epochs at each rule's LR (and at 10x the largest stable LR, which should be
flagged as diverged), and prints the best validation accuracy of each. Run it with:

    OMP_NUM_THREADS=1 python bench/lr_suggestion_rule.py

It prints one row per setting and, last, the mean accuracy of the /3 rule over that of the /10 rule.
"""

from __future__ import annotations

import time

import torch

from models.spec.trial import TrialSpec
from models.spec.tuning import LrRangeSpec, analyse_range
from workers.training.outcomes import Diverged
from workers.training.range_test import range_test
from workers.training.train import TrainingContext, run_trial

CPU = torch.device("cpu")
SETTINGS = [("adamw", "batch"), ("momentum", "batch"), ("momentum", "none"), ("sgd", "batch"), ("adam", "none")]


class _Quiet:
    def log_epoch(self, epoch: int, metrics: dict, at_ms: int | None = None, after: object = None) -> None: ...
    def log_summary(self, rows: list) -> None: ...
    def log_result(self, *args: object) -> None: ...


def best_accuracy(trial: TrialSpec, lr: float) -> str:
    spec = trial.model_copy(update={"optim": trial.optim.model_copy(update={"lr": lr})})
    try:
        return f"{run_trial(spec, _Quiet(), TrainingContext(device=CPU)).best_val_accuracy:.3f}"
    except Diverged:
        return "diverged"


def main() -> None:
    t0 = time.perf_counter()
    print(f"{'optimizer':10} {'norm':6} {'largest':>8} {'acc@/10':>8} {'acc@/3':>8} {'10x largest':>12}")
    tenth, third = [], []
    for optimizer, norm in SETTINGS:
        trial = TrialSpec.model_validate({
            "model": {"channels": [8, 16], "convs_per_stage": 1, "norm": norm},
            "optim": {"optimizer": optimizer, "batch_size": 64, "epochs": 8},
        })
        spec = LrRangeSpec(trial=trial)
        curve, reason = range_test(spec, TrainingContext(device=CPU))
        result = analyse_range(spec, curve.lrs, curve.losses, reason)
        a10, a3 = best_accuracy(trial, result.largest_stable_lr / 10), best_accuracy(trial, result.largest_stable_lr / 3)
        high = best_accuracy(trial, result.largest_stable_lr * 10)
        print(f"{optimizer:10} {norm:6} {result.largest_stable_lr:8.3g} {a10:>8} {a3:>8} {high:>12}")
        tenth.append(float(a10) if a10 != "diverged" else 0.0)
        third.append(float(a3) if a3 != "diverged" else 0.0)
    print(f"mean accuracy, /3 rule over /10 rule: {sum(third) / sum(tenth):.3f}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
