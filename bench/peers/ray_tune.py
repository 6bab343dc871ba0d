"""Peer 2 of bench/small_trials.py: Ray Tune, 2 concurrent trials, actors reused, Optuna's TPE.

The same work as peer 1 (bench/peers/optuna_mlflow.py: its data, net, epoch and logging): each trial
logs to MLflow from inside the trainable, as a user of Ray would, into a child run of one parent
run: params once, one batched metrics call per epoch, the model as a ``state_dict`` artifact.
``ray.init`` (a local cluster of 2 CPUs) happens before the clock starts, once per process; the
clock runs over ``Tuner.fit()`` (which starts the trial actors: every tuning run pays that).
Prints one JSON line: wall seconds, each trial's start and end (epoch seconds).

    python bench/peers/ray_tune.py --tracking-uri http://127.0.0.1:5000 [--trials 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# The trial actors import the peer-1 helpers by name: they inherit this path from the driver.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
sys.path.insert(0, str(HERE))
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def trainable(config: dict[str, Any]) -> None:
    import mlflow
    import optuna_mlflow as peer
    import torch
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    from ray import tune

    t_start = time.time()
    torch.set_num_threads(1)
    data = _data(peer)  # once per actor: reused actors keep it
    x_train, y_train, x_val, y_val = data
    mlflow.set_tracking_uri(config["tracking_uri"])
    client = MlflowClient(config["tracking_uri"])
    number = tune.get_context().get_trial_id()
    with mlflow.start_run(experiment_id=config["experiment_id"], run_name=f"trial {number}", parent_run_id=config["parent_run_id"]) as run:
        mlflow.log_params({"lr": config["lr"], "batch_size": config["batch_size"], "epochs": config["epochs"]})
        torch.manual_seed(abs(hash(number)) % 2**31)
        model = peer.small_net()
        opt = torch.optim.AdamW(model.parameters(), lr=config["lr"])
        for epoch in range(1, config["epochs"] + 1):
            t0 = time.perf_counter()
            train_loss = peer.train_epoch(model, opt, x_train, y_train, config["batch_size"], epoch)
            val_loss, val_accuracy = peer.evaluate(model, x_val, y_val)
            metrics = {"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy, "epoch_seconds": time.perf_counter() - t0}
            now = int(time.time() * 1000)
            client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, epoch) for k, v in metrics.items()])
            if epoch < config["epochs"]:
                tune.report({"val_accuracy": val_accuracy})
        path = os.path.join(tempfile.mkdtemp(prefix="peer-ray-"), "model.pt")
        torch.save(model.state_dict(), path)
        mlflow.log_artifact(path)
    tune.report({"val_accuracy": val_accuracy, "t_start": t_start, "t_end": time.time()})


_CACHE: dict[str, Any] = {}


def _data(peer: Any) -> Any:
    if "digits" not in _CACHE:
        _CACHE["digits"] = peer.digits()
    return _CACHE["digits"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", default="bench-peer-ray-tune")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()

    import mlflow
    import optuna
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray.init(num_cpus=args.concurrency, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20, logging_level="ERROR")
    mlflow.set_tracking_uri(args.tracking_uri)
    experiment_id = mlflow.set_experiment(args.experiment).experiment_id
    storage = tempfile.mkdtemp(prefix="peer-ray-results-")
    try:
        t0 = time.perf_counter()
        with mlflow.start_run(run_name=f"ray tune tpe seed {args.seed}") as parent:
            space = {
                "lr": tune.loguniform(1e-4, 1e-1), "batch_size": tune.choice([16, 32, 64]),
                "epochs": args.epochs, "tracking_uri": args.tracking_uri, "experiment_id": experiment_id, "parent_run_id": parent.info.run_id,
            }
            tuner = tune.Tuner(
                tune.with_resources(trainable, {"cpu": 1}),
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric="val_accuracy", mode="max", num_samples=args.trials, max_concurrent_trials=args.concurrency, reuse_actors=True,
                    search_alg=OptunaSearch(sampler=optuna.samplers.TPESampler(seed=args.seed)),
                ),
                run_config=tune.RunConfig(storage_path=storage, name="small-trials", verbose=0),
            )
            results = tuner.fit()
            best = results.get_best_result().metrics["val_accuracy"]
            mlflow.log_metric("best_val_accuracy", best)
        wall = time.perf_counter() - t0
        frame = results.get_dataframe()
        done = frame.dropna(subset=["t_end"]) if "t_end" in frame else frame.iloc[0:0]
        print(json.dumps({
            "wall_s": wall, "starts": sorted(done["t_start"].tolist()), "ends": sorted(done["t_end"].tolist()),
            "completed": len(done), "errors": len(results.errors), "best": best,
        }), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
