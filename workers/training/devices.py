"""Where a trial trains: on this process's device, or data-parallel on ``devices: N`` processes.

``devices: N`` trains on N devices, one process each, with DistributedDataParallel. The worker's
own process is rank 0: it keeps the trial's tracker, lease, cancel flag, pruner hook and
checkpoints. It starts ranks 1..N-1 as fresh Python processes (``python -m workers.training.devices``:
a Celery prefork child is a daemon, which ``multiprocessing`` forbids to have children), which
load the same data, build the same network and walk the same batch order; each rank trains on its
slice of every global batch (``batch_size`` samples per pass, so the global batch is
``batch_size x N``) and DDP averages the gradients. Backends: NCCL on GPUs (rank r on ``cuda:r``),
gloo on the CPU. The collectives the loop uses on every rank are :mod:`workers.training.parallel`.

A rank that fails writes its ending to a file before it exits; rank 0 reports that ending (say
``out_of_memory`` on rank 1) instead of the broken connection it sees.

A worker owns the GPUs it can see, or ``cpu_devices`` processes on a CPU host. A trial asking for
more devices than its worker owns fails at once with outcome ``error`` and a reason saying so.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models.data.roots import DataRoot
from models.spec.trial import TrialSpec
from workers.training.outcomes import TrialStopped, classify
from workers.training.parallel import NotEnoughDevices, Parallel, RankFailed, leave_group
from workers.training.train import Tracker, TrainingContext, TrialResult, run_trial

__all__ = ["train_data_parallel", "train_on_devices", "train_rank"]

log = logging.getLogger(__name__)
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


def train_on_devices(spec: TrialSpec, tracker: Tracker, ctx: TrainingContext, owned: int) -> TrialResult:
    """Train ``spec`` on one device, or data-parallel on ``spec.devices`` when this worker owns that many."""
    if spec.devices == 1:
        return run_trial(spec, tracker, ctx)
    if spec.devices > owned:
        kind = "GPUs" if ctx.device.type == "cuda" else "CPU processes (CONVTUNE_CPU_DEVICES)"
        raise NotEnoughDevices(
            f"the trial asks for devices={spec.devices}, and this worker owns {owned} {kind}: send it to a queue "
            f"served by workers with at least {spec.devices} devices, or lower 'devices'"
        )
    return train_data_parallel(spec, tracker, ctx)


def train_data_parallel(spec: TrialSpec, tracker: Tracker, ctx: TrainingContext) -> TrialResult:
    """Train on ``spec.devices`` processes: this one is rank 0, the others are spawned and joined here."""
    world = spec.devices
    device = torch.device("cuda", 0) if ctx.device.type == "cuda" else ctx.device
    with tempfile.TemporaryDirectory(prefix="convtune-ddp-") as tmp:
        init_method = f"file://{tmp}/rendezvous"
        (Path(tmp) / "spec.json").write_text(spec.model_dump_json())
        # The ranks divide this worker's share of the cores (workers.training.threads) between them.
        threads = torch.get_num_threads()
        per_rank = max(1, threads // world)
        common = [
            "--world", str(world), "--init-method", init_method, "--spec", f"{tmp}/spec.json", "--device", device.type,
            "--check-every", str(ctx.check_every_steps), "--threads", str(per_rank),
            *(["--data-root", str(ctx.data_root.path)] if ctx.data_root is not None else []),
            *(["--data-team", ctx.data_root.team] if ctx.data_root is not None and ctx.data_root.team is not None else []),
            *(["--checkpoint", str(ctx.checkpoint_path)] if ctx.checkpoint_path is not None else []),
        ]
        children = [
            subprocess.Popen([sys.executable, "-m", "workers.training.devices", "--rank", str(rank), "--error", f"{tmp}/rank{rank}.json", *common])
            for rank in range(1, world)
        ]
        in_step = False
        torch.set_num_threads(per_rank)
        try:
            dist.init_process_group(_backend(device), init_method=init_method, rank=0, world_size=world, timeout=COLLECTIVE_TIMEOUT)
            log.info("data-parallel trial on %d %s processes", world, device.type)
            result = run_trial(spec, tracker, replace(ctx, device=device, parallel=Parallel(0, world, device)))
            in_step = True
            return result
        except TrialStopped:
            in_step = True  # rank 0 decided the stop and every rank heard it at the same check
            raise
        except Exception as exc:
            failure = _first_failure(Path(tmp), children)
            if failure is not None:
                raise failure from exc
            raise
        finally:
            leave_group(in_step)
            for child in children:
                _stop(child, wait_s=30)
            torch.set_num_threads(threads)


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _stop(child: subprocess.Popen, wait_s: float) -> None:
    try:
        child.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        child.terminate()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _first_failure(tmp: Path, children: list[subprocess.Popen]) -> RankFailed | None:
    for child in children:
        try:
            child.wait(timeout=10)  # a failed rank wrote its ending before it exited
        except subprocess.TimeoutExpired:
            pass
    for rank in range(1, len(children) + 1):
        path = tmp / f"rank{rank}.json"
        if path.exists():
            ending = json.loads(path.read_text())
            return RankFailed(rank, ending["outcome"], ending["mlflow_status"], ending["reason"])
    return None


class _NullTracker:
    """Ranks other than 0 log nothing."""

    def log_epoch(self, epoch: int, metrics: dict[str, float], at_ms: int | None = None, after: Any = None) -> None: ...
    def log_summary(self, rows: list[dict[str, Any]]) -> None: ...
    def log_result(self, model: nn.Module, example: torch.Tensor, history: list[dict[str, float]], served: Any = None) -> None: ...


def train_rank(
    rank: int, world: int, init_method: str, payload: dict, device_kind: str,
    data_root: str | None, checkpoint: str | None, check_every_steps: int, error_path: str | None = None, data_team: str | None = None,
) -> None:
    """Entry point of rank ``rank`` >= 1 in its own process: train in step with rank 0, log nothing."""
    spec = TrialSpec.model_validate(payload)
    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(_backend(device), init_method=init_method, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    ctx = TrainingContext(
        device=device, data_root=None if data_root is None else DataRoot(Path(data_root), data_team),
        checkpoint_path=None if checkpoint is None else Path(checkpoint),
        check_every_steps=check_every_steps, parallel=Parallel(rank, world, device),
    )
    in_step = False
    try:
        run_trial(spec, _NullTracker(), ctx)
        in_step = True
    except TrialStopped:
        in_step = True  # every rank reached the same stop; rank 0 reports it
    except Exception as exc:
        ending = classify(exc)
        if error_path:
            Path(error_path).write_text(json.dumps({"outcome": ending.outcome, "mlflow_status": ending.mlflow_status, "reason": ending.reason}))
        raise
    finally:
        leave_group(in_step)


def main(argv: list[str] | None = None) -> None:
    """``python -m workers.training.devices --rank R ...``: how rank 0 starts the other ranks."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--init-method", required=True)
    parser.add_argument("--spec", required=True, help="a file holding the TrialSpec as JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--check-every", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of this rank: its share of rank 0's")
    parser.add_argument("--data-root")
    parser.add_argument("--data-team", help="the team whose folder of the data root the trial reads (models.data.roots)")
    parser.add_argument("--checkpoint")
    parser.add_argument("--error", help="where to write this rank's ending if it fails")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"rank {args.rank}: %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    payload = json.loads(Path(args.spec).read_text())
    train_rank(args.rank, args.world, args.init_method, payload, args.device, args.data_root, args.checkpoint, args.check_every, args.error, args.data_team)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        log.exception("this rank failed; rank 0 reports its ending")
        sys.exit(1)
