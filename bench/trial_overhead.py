"""What the service costs on top of training: a 9-epoch digits trial through convtune vs the script a user writes.

Measured in one run, on the same machine, against the same MLflow server (the stack's), so the
ratios hold while absolute times drift:

  bare (warm)         run_trial in this process, torch already imported, nothing logged
  bare (fresh)        a new python process that imports torch and trains the same spec (no MLflow)
  standalone script   bench/peers/standalone.py, run as a user runs it (``python script.py``): imports
                      torch and MLflow, trains the same network by hand, logs params, one batched
                      metrics call per epoch and the model (log_model) to the stack's MLflow server;
                      timed from spawn to exit
  convtune            POST /trials to the run's end in MLflow (what ``GET /trials/{id}`` then
                      shows as ended), through ``convtune up`` (gunicorn, Redis, a Celery worker,
                      MLflow: metrics per epoch, summary, curves, confusion matrix, the model),
                      one trial at a time, after one warm-up trial per worker (sent together: each
                      worker pays its once-per-process costs, as a long-lived stack has; the
                      warm-up trials' own walls are shown in brackets, not in the targets)

and where convtune's time goes, per trial (medians), from the run's own records: the client's
clock around the POST, the worker log ("Task ... received" / "succeeded in"), the ``started_at``
tag, each epoch's metric timestamp and ``epoch_seconds`` (training = the epochs' train + evaluate),
the artifacts' files in the stack's artifact store (their modification times) and the run's end time.

The stack is ``convtune up --cpu-workers 2`` (issue 10's); the bare runs and the script train with
``--threads`` torch threads (1: what each of two workers gets on two cores; on a machine shared with
other jobs torch's default of every core spins against the load and can run 10x slower).

Targets: convtune's wall <= 0.5x the standalone script's; time outside training (POST to the end
of the run, minus the epochs) <= 0.3 s per trial.

    python bench/trial_overhead.py [--quick] [--repeats 5] [--cpu-workers 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, Stack, Target, convtune_up, emit, median, note, print_table, private_redis  # noqa: E402

SPEC = {"model": {"channels": [32, 64]}, "optim": {"lr": 3e-3, "epochs": 9, "batch_size": 32}, "data": {"name": "digits"}}
FRESH = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from models.spec.trial import TrialSpec
from workers.training.train import TrainingContext, run_trial
class Null:
    def __getattr__(self, name):
        return lambda *a, **k: None
run_trial(TrialSpec.model_validate(%r), Null(), TrainingContext(device=torch.device("cpu")))
""" % (SPEC,)


class NullTracker:
    """A tracker that records nothing, whatever the loop calls on it."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def bare_warm(repeats: int, threads: int) -> list[float]:
    import torch

    from models.spec.trial import TrialSpec
    from workers.training.train import TrainingContext, run_trial

    torch.set_num_threads(threads)
    spec = TrialSpec.model_validate(SPEC)
    run_trial(spec, NullTracker(), TrainingContext(device=torch.device("cpu")))  # warm-up, as a worker does at start
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_trial(spec, NullTracker(), TrainingContext(device=torch.device("cpu")))
        times.append(time.perf_counter() - t0)
    return times


def bare_fresh(repeats: int, threads: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", FRESH, str(threads)], check=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return times


def standalone(tracking_uri: str, repeats: int, threads: int) -> tuple[list[float], list[dict[str, Any]]]:
    times, inside = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        argv = [sys.executable, str(ROOT / "bench/peers/standalone.py"), "--tracking-uri", tracking_uri, "--epochs", str(SPEC["optim"]["epochs"]), "--threads", str(threads)]
        done = subprocess.run(argv,
                              cwd=ROOT, capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - t0)
        inside.append(json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1]))
    return times, inside


# --- convtune, and where its time goes ------------------------------------------------------------


def through_service(stack: Stack, repeats: int, workers: int) -> tuple[list[dict[str, Any]], list[float]]:
    """One trial at a time, after one warm-up trial per worker; each one's timeline, and the warm-up trials' walls.

    The warm-up trials are sent together, so each worker takes one: the first trial of a worker process
    pays its once-per-process costs (imports on first use, the data set, the first export of this
    architecture), as a long-lived ``convtune up`` has paid them. Their walls are reported apart.
    """
    from service.client import ConvtuneClient

    timelines = []
    with ConvtuneClient(stack.api_url) as client:
        t_warm = time.time()
        warm = [client.submit_trial(SPEC)["id"] for _ in range(workers)]
        cold = []
        for trial_id in warm:
            client.wait_trial(trial_id, poll_s=0.25)
            cold.append(_ended(stack, trial_id) - t_warm)
        for _ in range(repeats):
            t_post = time.time()
            trial_id = client.submit_trial(SPEC)["id"]
            t_accepted = time.time()
            trial = client.wait_trial(trial_id, poll_s=0.25)
            assert trial["status"] == "succeeded", trial
            timelines.append(timeline(stack, trial_id, t_post, t_accepted))
    return timelines, cold


def _ended(stack: Stack, trial_id: str) -> float:
    from mlflow.tracking import MlflowClient

    return MlflowClient(stack.mlflow_url).get_run(trial_id).info.end_time / 1000


def timeline(stack: Stack, trial_id: str, t_post: float, t_accepted: float) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack.mlflow_url)
    run = client.get_run(trial_id)
    history = {key: client.get_metric_history(trial_id, key) for key in ("epoch_seconds", "val_accuracy")}
    epochs = sorted(history["epoch_seconds"], key=lambda m: m.step)
    received, task_done = _task_times(stack, trial_id)
    started = run.data.tags.get("convtune.started_at")
    artifacts = _artifact_times(stack, run)
    return {
        "post": t_post, "accepted": t_accepted, "received": received, "started": datetime.fromisoformat(started).timestamp() if started else None,
        "epoch_logged": [m.timestamp / 1000 for m in epochs], "epoch_seconds": [m.value for m in epochs],
        "artifacts": artifacts, "ended": run.info.end_time / 1000, "task_done": task_done,
    }


def _task_times(stack: Stack, task_id: str) -> tuple[float | None, float | None]:
    """When a worker received the task and when it finished it (its log lines), in epoch seconds."""
    received = done = None
    for path in stack.worker_logs():
        for line in path.read_text(errors="replace").splitlines():
            if task_id not in line or not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            message = record.get("message", "")
            if message.startswith("Task ") and f"[{task_id}]" in message:
                at = datetime.strptime(record["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if message.endswith(" received"):
                    received = at
                elif " succeeded in " in message:
                    done = at
    return received, done


ARTIFACT_GROUPS = (  # (part of the breakdown, what its files' paths start with)
    ("summary", ("model_summary",)),
    ("curves and history", ("plots/learning_curve", "history")),
    ("model export", ("model/", "model.")),
    ("confusion matrix", ("confusion_matrix", "plots/confusion_matrix")),
)


def _artifact_times(stack: Stack, run: Any) -> dict[str, float]:
    """The last modification time of each group's files in the stack's local artifact store (the run's logged model's: "model export")."""
    root = stack.home / "artifacts" / run.info.experiment_id / run.info.run_id / "artifacts"
    times: dict[str, float] = {}
    for path in root.rglob("*") if root.exists() else ():
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        group = next((g for g, prefixes in ARTIFACT_GROUPS if rel.startswith(prefixes)), "other artifacts")
        times[group] = max(times.get(group, 0.0), path.stat().st_mtime)
    model_id = run.data.tags.get("convtune.model_id")
    model_root = stack.home / "artifacts" / run.info.experiment_id / "models" / model_id / "artifacts" if model_id else None
    for path in model_root.rglob("*") if model_root is not None and model_root.exists() else ():
        if path.is_file():
            times["model export"] = max(times.get("model export", 0.0), path.stat().st_mtime)
    return times


def breakdown(t: dict[str, Any]) -> dict[str, float]:
    """Seconds per part of one trial, in the order they happen; parts whose records are missing fold into the next."""
    training = sum(t["epoch_seconds"])
    first_train_start = t["epoch_logged"][0] - t["epoch_seconds"][0] if t["epoch_logged"] else None
    last_logged = t["epoch_logged"][-1] if t["epoch_logged"] else None
    parts: dict[str, float] = {}
    marks = [("accept (POST -> 202)", t["accepted"]), ("queue wait (202 -> worker received)", t["received"]),
             ("admit, lease, start run", t["started"]), ("set-up (data, model, summary)", first_train_start)]
    previous = t["post"]
    for name, at in marks:
        if at is not None:  # the worker may receive the message before the client reads the 202: no negative parts
            parts[name] = max(0.0, at - previous)
            previous = max(previous, at)
    if last_logged is not None:
        parts["training (epochs: train + evaluate)"] = training
        parts["per-epoch logging and checkpoints"] = (last_logged - previous) - training
        previous = last_logged
    after = sorted((at, group) for group, at in t["artifacts"].items() if group != "summary" and previous <= at <= t["ended"])
    for at, group in after:
        parts[f"results: {group}"] = at - previous
        previous = at
    parts["status (end the run)"] = t["ended"] - previous
    late = [at for group, at in t["artifacts"].items() if at > t["ended"]]
    if late:
        parts["(after the end: uploads still landing)"] = max(late) - t["ended"]
    if t["task_done"] is not None:
        parts["(after the end: task finishes)"] = t["task_done"] - t["ended"]
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 repeats, 1 standalone run, no fresh-process baseline")
    parser.add_argument("--repeats", type=int, default=None, help="trials through convtune (5; --quick 2)")
    parser.add_argument("--cpu-workers", type=int, default=2, help="workers of the stack (issue 10's `convtune up --cpu-workers 2`)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the bare runs and the standalone script (1: a worker's share of 2 cores with 2 workers; 0: torch's default)")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    fresh_repeats = 0 if args.quick else max(2, repeats // 2)

    threads = args.threads or os.cpu_count() or 1
    results: dict[str, list[float]] = {"bare (warm): run_trial in process, no logging": bare_warm(repeats, threads)}
    note(f"bare (warm): {median(results['bare (warm): run_trial in process, no logging']):.2f}s")
    if fresh_repeats:
        results["bare (fresh process): imports + run_trial, no MLflow"] = bare_fresh(fresh_repeats, threads)
    with private_redis() as redis_url, convtune_up(redis_url, cpu_workers=args.cpu_workers) as stack:
        sa_times, sa_inside = standalone(stack.mlflow_url, max(1, fresh_repeats), args.threads)
        results["standalone script: python script.py, train + MLflow"] = sa_times
        note(f"standalone: {median(sa_times):.2f}s ({sa_inside[-1]})")
        timelines, cold = through_service(stack, repeats, args.cpu_workers)
    service = [t["ended"] - t["post"] for t in timelines]
    results["convtune: POST /trials -> run ended"] = service
    results[f"(convtune: {args.cpu_workers} warm-up trials sent together, POST -> ended)"] = cold

    baseline = median(sa_times)
    print_table(
        f"9-epoch digits trial ({SPEC['model']['channels']} channels, batch {SPEC['optim']['batch_size']}), median of each; stack: {args.cpu_workers} worker(s); bare and standalone: {threads} thread(s)",
        ["how", "wall s", "vs standalone script"],
        [[name, round(median(times), 3), round(median(times) / baseline, 3)] for name, times in results.items()],
    )
    parts = [breakdown(t) for t in timelines]
    names = list(dict.fromkeys(name for p in parts for name in p))
    per_part = {name: median([p.get(name, 0.0) for p in parts]) for name in names}
    total = median(service)
    print_table(
        f"where convtune's time goes, per trial (median of {repeats}; POST -> run ended = {total:.3f}s)",
        ["part", "s", "share"], [[name, round(s, 3), f"{100 * s / total:.0f} %" if not name.startswith("(") else ""] for name, s in per_part.items()],
    )
    training = median([sum(t["epoch_seconds"]) for t in timelines])
    outside = median([(t["ended"] - t["post"]) - sum(t["epoch_seconds"]) for t in timelines])
    in_worker = median([(t["ended"] - t["received"]) - sum(t["epoch_seconds"]) for t in timelines if t["received"] is not None])
    print(f"training {training:.3f}s; outside training: {outside:.3f}s end to end, {in_worker:.3f}s of it in the worker (received -> run ended)")
    standalone_inside = {k: median([s[k] for s in sa_inside]) for k in sa_inside[0]}
    print("standalone script, its own phases: " + ", ".join(f"{k} {v:.2f}" for k, v in standalone_inside.items() if k.endswith("_s")))
    figures = {
        "wall_s": {name: median(times) for name, times in results.items()},
        "service_vs_standalone": total / baseline,
        "training_s": training, "outside_training_s": outside, "outside_training_in_worker_s": in_worker,
        "breakdown_s": per_part, "standalone_phases_s": standalone_inside, "repeats": repeats, "cpu_workers": args.cpu_workers, "threads": threads,
    }
    emit("trial_overhead", figures, {
        "service_vs_standalone": Target(total / baseline, "<=", 0.5),
        "outside_training_s": Target(outside, "<=", 0.3),
    })


if __name__ == "__main__":
    main()
