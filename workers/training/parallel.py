"""Data-parallel trials: ``devices: N`` trains on N devices, one process each, with DistributedDataParallel.

The worker's own process is rank 0: it keeps the trial's tracker, lease, cancel flag, pruner hook
and checkpoints. It starts ranks 1..N-1 as fresh Python processes (``python -m workers.training.parallel``:
a Celery prefork child is a daemon, which ``multiprocessing`` forbids to have children), which
load the same data, build the same network and walk the same batch order; each rank trains on its
slice of every global batch (``batch_size`` samples per pass, so the global batch is
``batch_size x N``) and DDP averages the gradients. Backends: NCCL on GPUs (rank r on ``cuda:r``,
batch norm synchronised across ranks), gloo on the CPU (batch norm statistics stay per rank, as in
plain DDP).

Every rank reaches the same decisions at the same steps: divergence is judged on losses averaged
over the ranks, and rank 0 broadcasts its own stops (cancel, time limit, pruning) at each check. A
rank that fails writes its ending to a file before it exits; rank 0 reports that ending (say
``out_of_memory`` on rank 1) instead of the broken connection it sees.

A worker owns the GPUs it can see, or ``cpu_devices`` processes on a CPU host. A trial asking for
more devices than its worker owns fails at once with outcome ``error`` and a reason saying so.
"""

from __future__ import annotations

import argparse
import gc
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
from torch.nn.parallel import DistributedDataParallel

from models.spec.trial import TrialSpec
from workers.training.outcomes import TrialStopped, classify

__all__ = ["NotEnoughDevices", "Parallel", "PeerStopped", "RankFailed", "leave_group", "run_data_parallel", "run_on_devices", "train_rank"]

log = logging.getLogger(__name__)
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


class NotEnoughDevices(TrialStopped):
    """The trial asks for more devices than this worker owns."""

    mlflow_status, outcome = "FAILED", "error"


class PeerStopped(TrialStopped):
    """Rank 0 stopped the trial (cancel, time limit, pruning); the other ranks just end."""


class RankFailed(TrialStopped):
    """Another rank failed; carries that rank's outcome and reason."""

    def __init__(self, rank: int, outcome: str, mlflow_status: str, reason: str):
        super().__init__(f"rank {rank} of the data-parallel trial failed: {reason}")
        self.outcome, self.mlflow_status = outcome, mlflow_status


class Parallel:
    """This process's place in a data-parallel trial and the collectives the training loop needs."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device

    def wrap(self, model: nn.Module) -> DistributedDataParallel:
        if self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return DistributedDataParallel(model, device_ids=[self.device.index])
        return DistributedDataParallel(model)

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch."""
        return idx.tensor_split(self.world)[self.rank]

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``values`` over the ranks."""
        values = values.detach().to(self.device, torch.float64 if self.device.type == "cpu" else torch.float32).clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return self.total(values) / self.world

    def smallest(self, value: int) -> int:
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def agree(self, stop: TrialStopped | None) -> TrialStopped | None:
        """Rank 0's stop, known to every rank (rank 0 passes its own; the others pass None)."""
        flag = torch.tensor([1 if stop is not None else 0], device=self.device)
        dist.broadcast(flag, src=0)
        if self.rank == 0:
            return stop
        return PeerStopped("rank 0 stopped the trial") if int(flag.item()) else None


class _NullTracker:
    """Ranks other than 0 log nothing."""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...
    def log_summary(self, rows: list[dict[str, Any]]) -> None: ...
    def log_result(self, model: nn.Module, example: torch.Tensor, history: list[dict[str, float]]) -> None: ...


def leave_group(in_step: bool) -> None:
    """Leave the data-parallel process group; ``in_step`` when every rank got here at the same point.

    DistributedDataParallel sits in a reference cycle, and its reducer holds the process group:
    left to the garbage collector, the gloo group could outlive ``destroy_process_group`` and be torn
    down during interpreter shutdown, which aborts the process (SIGABRT). So collect it first. Then,
    when every rank is in step (the trial finished or every rank agreed to stop), a barrier keeps a
    fast rank from closing its connections while another still reads its last collective; a rank
    that failed alone skips it, since its peers are in another collective or gone.
    """
    if not dist.is_initialized():
        return
    gc.collect()
    try:
        if in_step:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _rank_device(kind: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if kind == "cuda" else torch.device("cpu")


def run_on_devices(spec: TrialSpec, tracker: Any, ctx: Any, owned: int) -> Any:
    """Train ``spec`` on one device, or data-parallel on ``spec.devices`` when this worker owns that many."""
    from workers.training.train import run_trial

    if spec.devices == 1:
        return run_trial(spec, tracker, ctx)
    if spec.devices > owned:
        kind = "GPUs" if ctx.device.type == "cuda" else "CPU processes (CONVTUNE_CPU_DEVICES)"
        raise NotEnoughDevices(
            f"the trial asks for devices={spec.devices}, and this worker owns {owned} {kind}: send it to a queue "
            f"served by workers with at least {spec.devices} devices, or lower 'devices'"
        )
    return run_data_parallel(spec, tracker, ctx)


def run_data_parallel(spec: TrialSpec, tracker: Any, ctx: Any) -> Any:
    """Train on ``spec.devices`` processes: this one is rank 0, the others are spawned and joined here."""
    from workers.training.train import run_trial

    world = spec.devices
    device = torch.device("cuda", 0) if ctx.device.type == "cuda" else ctx.device
    with tempfile.TemporaryDirectory(prefix="convtune-ddp-") as tmp:
        init_method = f"file://{tmp}/rendezvous"
        (Path(tmp) / "spec.json").write_text(spec.model_dump_json())
        common = [
            "--world", str(world), "--init-method", init_method, "--spec", f"{tmp}/spec.json", "--device", device.type,
            "--check-every", str(ctx.check_every_steps),
            *(["--data-root", str(ctx.data_root)] if ctx.data_root is not None else []),
            *(["--checkpoint", str(ctx.checkpoint_path)] if ctx.checkpoint_path is not None else []),
        ]
        children = [
            subprocess.Popen([sys.executable, "-m", "workers.training.parallel", "--rank", str(rank), "--error", f"{tmp}/rank{rank}.json", *common])
            for rank in range(1, world)
        ]
        in_step = False
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


def train_rank(
    rank: int, world: int, init_method: str, payload: dict, device_kind: str,
    data_root: str | None, checkpoint: str | None, check_every_steps: int, error_path: str | None = None,
) -> None:
    """Entry point of rank ``rank`` >= 1 in its own process: train in step with rank 0, log nothing."""
    from workers.training.train import TrialContext, run_trial

    spec = TrialSpec.model_validate(payload)
    device = _rank_device(device_kind, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(_backend(device), init_method=init_method, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    ctx = TrialContext(
        device=device, data_root=None if data_root is None else Path(data_root),
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
    """``python -m workers.training.parallel --rank R ...``: how rank 0 starts the other ranks."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--init-method", required=True)
    parser.add_argument("--spec", required=True, help="a file holding the TrialSpec as JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--check-every", type=int, required=True)
    parser.add_argument("--data-root")
    parser.add_argument("--checkpoint")
    parser.add_argument("--error", help="where to write this rank's ending if it fails")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"rank {args.rank}: %(levelname)s %(name)s: %(message)s")
    payload = json.loads(Path(args.spec).read_text())
    train_rank(args.rank, args.world, args.init_method, payload, args.device, args.data_root, args.checkpoint, args.check_every, args.error)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        log.exception("this rank failed; rank 0 reports its ending")
        sys.exit(1)
