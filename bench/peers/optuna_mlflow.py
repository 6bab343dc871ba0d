"""Peer 1 of bench/small_trials.py: the Optuna + MLflow loop a user who knows the costs writes by hand.

One process, one torch thread, an in-memory Optuna study (TPE), and per trial a nested MLflow run
under one parent: params logged once, one batched metrics call per epoch, the model as a
``state_dict`` artifact. The data is scikit-learn's digits with convtune's split sizes (1,438 train,
359 validation, stratified) and convtune's normalisation; the net is a small conv net of 3.58 MFLOPs
a sample (conv 1->32, conv 32->64, 2x2 max pool, conv 64->64, global average pool, linear 64->10).

Imports, loading the data and a first optimizer step happen before the clock starts (once per
process, as in a warm worker). The clock runs from creating the parent run to ending it. Prints one
JSON line: wall seconds, and each trial's start and end (epoch seconds).

    python bench/peers/optuna_mlflow.py --tracking-uri http://127.0.0.1:5000 [--trials 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import mlflow
import numpy as np
import optuna
import torch
import torch.nn.functional as F
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

VAL_SIZE = 359  # what convtune's stratified 20 % split of digits leaves for validation


def digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    x_train, x_val, y_train, y_val = train_test_split(x, d.target, test_size=VAL_SIZE, stratify=d.target, random_state=seed)
    mean, std = x_train.mean(), x_train.std()
    return tuple(torch.from_numpy(a) for a in ((x_train - mean) / std, y_train.astype(np.int64), (x_val - mean) / std, y_val.astype(np.int64)))


def small_net() -> nn.Module:
    """3,577,088 FLOPs a sample (2 x the multiply-accumulates of the convs and the linear layer)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> float:
    model.train()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    total = 0.0
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += float(loss) * len(idx)
    return total / len(x)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", default="bench-peer-optuna-mlflow")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mlflow.set_tracking_uri(args.tracking_uri)
    client = MlflowClient(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    x_train, y_train, x_val, y_val = digits()
    warm = small_net()
    torch.optim.AdamW(warm.parameters()).step()  # the first optimizer of a process imports torch._dynamo (~1 s): once
    artifacts = tempfile.mkdtemp(prefix="peer-optuna-")
    starts, ends = [], []

    def objective(trial: optuna.Trial) -> float:
        starts.append(time.time())
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        batch_size = trial.suggest_categorical("batch_size", [16, 32, 64])
        with mlflow.start_run(run_name=f"trial {trial.number}", nested=True) as run:
            mlflow.log_params({"lr": lr, "batch_size": batch_size, "epochs": args.epochs})
            torch.manual_seed(args.seed * 1000 + trial.number)
            model = small_net()
            opt = torch.optim.AdamW(model.parameters(), lr=lr)
            for epoch in range(1, args.epochs + 1):
                t0 = time.perf_counter()
                train_loss = train_epoch(model, opt, x_train, y_train, batch_size, trial.number * 100 + epoch)
                val_loss, val_accuracy = evaluate(model, x_val, y_val)
                metrics = {"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy, "epoch_seconds": time.perf_counter() - t0}
                now = int(time.time() * 1000)
                client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, epoch) for k, v in metrics.items()])
            path = os.path.join(artifacts, "model.pt")
            torch.save(model.state_dict(), path)
            mlflow.log_artifact(path)
        ends.append(time.time())
        return val_accuracy

    t0 = time.perf_counter()
    with mlflow.start_run(run_name=f"optuna tpe seed {args.seed}"):
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=args.seed))
        study.optimize(objective, n_trials=args.trials)
        mlflow.log_metric("best_val_accuracy", study.best_value)
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "starts": starts, "ends": ends, "completed": len(ends), "best": study.best_value}), flush=True)


if __name__ == "__main__":
    main()
