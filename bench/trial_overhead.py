"""What the service costs on top of training: a 3-epoch digits trial through the stack vs bare.

Measured in one run, on the same machine, so the ratios hold while absolute times drift:
  bare (warm)   run_trial in this process, torch already imported, nothing logged
  bare (fresh)  a new python process that imports torch and trains the same spec (no MLflow)
  service       POST /trials -> status succeeded, through gunicorn, Redis, a Celery worker and
                MLflow (metrics per epoch, model, curve), timed by the client

    python bench/trial_overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = {"model": {"channels": [32, 64]}, "optim": {"lr": 3e-3, "epochs": 3, "batch_size": 32}, "data": {"name": "digits"}}
FRESH = f"""
import torch
from models.spec.trial import TrialSpec
from workers.training.train import TrainingContext, run_trial
class Null:
    def log_epoch(self, *a): pass
    def log_summary(self, *a): pass
    def log_result(self, *a): pass
run_trial(TrialSpec.model_validate({SPEC!r}), Null(), TrainingContext(device=torch.device("cpu")))
"""


def bare_warm(repeats: int) -> list[float]:
    import torch

    from models.spec.trial import TrialSpec
    from workers.training.train import TrainingContext, run_trial

    class Null:
        def log_epoch(self, *a: object) -> None: ...
        def log_summary(self, *a: object) -> None: ...
        def log_result(self, *a: object) -> None: ...

    spec = TrialSpec.model_validate(SPEC)
    run_trial(spec, Null(), TrainingContext(device=torch.device("cpu")))  # warm-up, as a worker does at start
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_trial(spec, Null(), TrainingContext(device=torch.device("cpu")))
        times.append(time.perf_counter() - t0)
    return times


def bare_fresh(repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", FRESH], check=True, cwd=ROOT, env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
        times.append(time.perf_counter() - t0)
    return times


def through_service(repeats: int) -> list[float]:
    from service.client import ConvtuneClient
    from service.stack.supervisor import Stack, StackConfig
    from tests.conftest import free_port

    home = Path(tempfile.mkdtemp(prefix="convtune-bench-"))
    config = StackConfig(home=home, api_port=free_port(), mlflow_port=free_port(), redis_url="redis://127.0.0.1:6379/9")
    stack = Stack(config, say=lambda m: print(f"  {m}", file=sys.stderr))
    try:
        stack.up()
        with ConvtuneClient(config.api_url) as client:
            client.wait_trial(client.submit_trial(SPEC)["id"], poll_s=0.05)  # warm: first experiment, first trial
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                trial = client.wait_trial(client.submit_trial(SPEC)["id"], poll_s=0.05)
                times.append(time.perf_counter() - t0)
                assert trial["status"] == "succeeded", trial
        return times
    finally:
        stack.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {
        "bare (warm)": bare_warm(args.repeats),
        "bare (fresh process)": bare_fresh(max(2, args.repeats // 2)),
        "service (POST -> succeeded)": through_service(args.repeats),
    }
    baseline = statistics.median(results["bare (warm)"])
    print(f"\n3-epoch digits trial, median of {args.repeats} ({SPEC['model']['channels']} channels, batch {SPEC['optim']['batch_size']})")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"  {name:<28} {median:7.2f} s   ratio vs bare (warm): {median / baseline:5.2f}x")


if __name__ == "__main__":
    main()
