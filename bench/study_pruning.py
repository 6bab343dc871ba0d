"""What pruning saves: a 24-trial TPE study on digits with the ASHA pruner vs the same study unpruned.

Both studies go through a local stack started here (Redis, mlflow server, two CPU worker processes,
the API under gunicorn): POST /studies, then poll GET /studies/{id} until it ends. Same sampler seed,
same space (learning rate on a log range, batch size, kernel size, downsampling mode, activation),
same 24-trial budget and parallelism 2; only the pruner differs. Printed: epochs trained by each
(the baseline is the unpruned study, measured in the same run), the ratio, the best validation
accuracy of each, trials per outcome, wall time, and the checks of issue 3's "done when".

    python bench/study_pruning.py [--trials 24] [--epochs 10] [--redis-url redis://127.0.0.1:6379/12]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def study_body(trials: int, epochs: int, pruner: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"digits tpe/{pruner['name']}",
        "base": {
            "model": {"channels": [32, 64], "convs_per_stage": 1},
            "optim": {"optimizer": "adamw", "epochs": epochs},
            "data": {"name": "digits"},
        },
        "search_space": {
            "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "optim.batch_size": [16, 32, 64, 128],
            "model.kernel_size": [3, 5],
            "model.downsample": ["stride", "maxpool", "avgpool", "dilation"],
            "model.activation": ["relu", "gelu", "silu", "tanh"],
        },
        "sampler": {"name": "tpe", "n_startup_trials": 8},
        "pruner": pruner,
        "seed": 7,
        "n_trials": trials,
        "parallelism": 2,
    }


def run_study(client: httpx.Client, body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    t0 = time.perf_counter()
    response = client.post("/studies", json=body)
    response.raise_for_status()
    study_id = response.json()["id"]
    print(f"  {body['name']}: study {study_id}", file=sys.stderr)
    while True:
        study = client.get(f"/studies/{study_id}").raise_for_status().json()
        if study["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1)
    elapsed = time.perf_counter() - t0
    trials = client.get(f"/studies/{study_id}/trials", params={"limit": 1000}).raise_for_status().json()["items"]
    return study, trials, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from service.stack.supervisor import Stack, StackConfig
    from tests.conftest import free_port

    home = Path(tempfile.mkdtemp(prefix="convtune-bench-study-"))
    config = StackConfig(home=home, api_port=free_port(), mlflow_port=free_port(), redis_url=args.redis_url, cpu_workers=2, extra_env={"OMP_NUM_THREADS": "1"})
    stack = Stack(config, say=lambda m: print(f"  {m}", file=sys.stderr))
    asha = {"name": "successive_halving", "min_resource": 1, "reduction_factor": 3}
    results = {}
    try:
        stack.up()
        with httpx.Client(base_url=config.api_url, timeout=30) as client:
            for label, pruner in (("asha", asha), ("none", {"name": "none"})):
                results[label] = run_study(client, study_body(args.trials, args.epochs, pruner))
        mlflow = MlflowClient(config.mlflow_url)
        asha_study = results["asha"][0]
        children = mlflow.search_runs(
            [mlflow.get_run(asha_study["id"]).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{asha_study['id']}'", max_results=1000,
        )
    finally:
        stack.down()

    print(f"\n{args.trials}-trial TPE study on digits (seed 7, parallelism 2, {args.epochs} epochs a trial), two CPU workers")
    for label, (study, trials, elapsed) in results.items():
        best = study["best"]["value"] if study["best"] else float("nan")
        print(f"  pruner {label:<5} state {study['state']:<9} epochs trained {study['progress']['epochs_trained']:4d}   best val_accuracy {best:.4f}   "
              f"wall {elapsed:6.1f} s   {study['counts']}")
    epochs_asha = results["asha"][0]["progress"]["epochs_trained"]
    epochs_none = results["none"][0]["progress"]["epochs_trained"]
    print(f"  epochs trained, ASHA vs no pruning (baseline): {epochs_asha}/{epochs_none} = {epochs_asha / max(epochs_none, 1):.2f}x")
    print(f"  wall time, ASHA vs no pruning: {results['asha'][2] / results['none'][2]:.2f}x")
    pruned = [t for t in results["asha"][1] if t["outcome"] == "pruned"]
    print("  pruned trials (ASHA), stopped after epoch: " + ", ".join(f"#{t['number']}@{t['epochs']}" for t in pruned))
    study = results["asha"][0]
    checks = {
        "completed through the API": study["state"] == "succeeded",
        f"parent run has {args.trials} child runs": len(children) == args.trials,
        "best val_accuracy >= 0.97": bool(study["best"]) and study["best"]["value"] >= 0.97,
        "pruned trials show as pruned with their epoch": bool(pruned) and all(
            c.data.tags.get("convtune.outcome") == "pruned" and int(c.data.tags.get("convtune.epochs_done", 0)) < args.epochs
            for c in children if c.info.run_id in {t["trial_id"] for t in pruned}
        ),
    }
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
