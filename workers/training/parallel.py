"""The collectives of a data-parallel trial: one rank's place in the group and what the loop asks of the others.

:class:`Parallel` is what the training loop holds on every rank (``TrainingContext.parallel``): it
wraps the network in DistributedDataParallel (NCCL on GPUs with batch norm synchronised across
ranks, gloo on the CPU with batch norm statistics per rank, as in plain DDP), hands each rank its
slice of a global batch, and makes every rank reach the same decisions at the same steps: losses
are averaged over the ranks before divergence is judged, rank 0's stops (cancel, time limit,
pruning) are broadcast at each check. :func:`leave_group` ends a rank's part in the group.

Starting the ranks and reporting how they ended is :mod:`workers.training.devices`.
"""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from workers.training.outcomes import TrialStopped

__all__ = ["NotEnoughDevices", "Parallel", "PeerStopped", "RankFailed", "leave_group"]


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
