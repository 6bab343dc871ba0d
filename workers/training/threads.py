"""How many threads torch may use in a training process: the host's cores shared, not fought over.

torch's default is one intra-op thread per core *in every process*. A host running two training
processes on two cores then runs four busy threads that preempt each other and the MLflow server,
and trains a fraction of the trials one thread each would (docs/performance.md, "Threads"). So every worker applies a policy
itself, at start, with nothing for the operator to export:

- the usable cores are those this process may run on (its CPU affinity), capped by its cgroup's CPU
  quota (a container's ``cpus:`` limit, a pod's ``limits.cpu``);
- they are divided evenly between the training processes sharing the host
  (``CONVTUNE_HOST_TRAINING_PROCESSES``, which ``convtune worker`` and ``convtune up`` set to the
  number of workers they start; 1 in a container with its own quota); a data-parallel trial's ranks
  divide their worker's share again;
- one inter-op thread: a conv net's ops run one after another, and a second pool only adds threads
  that contend for the same cores;
- ``CONVTUNE_TORCH_THREADS``, or else an exported ``OMP_NUM_THREADS``, overrides the intra-op count.

On a GPU host the same share is given to the CPU side (data indexing, the optimizer's launches).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ThreadPolicy", "apply_threads", "thread_policy", "usable_cpus"]

log = logging.getLogger(__name__)
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


@dataclass(frozen=True)
class ThreadPolicy:
    intra_op: int
    inter_op: int
    cpus: int  # usable cores on the host, as seen by this process
    processes: int  # training processes sharing them

    def __str__(self) -> str:
        return f"{self.intra_op} intra-op and {self.inter_op} inter-op threads ({self.cpus} usable cores shared by {self.processes} training processes)"


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may use: its affinity, capped by its cgroup's CPU quota (rounded down, at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota (bare metal, cgroup v1): the affinity stands
    return max(1, cpus)


def thread_policy(processes: int, override: int | None = None, cpus: int | None = None) -> ThreadPolicy:
    """The threads of one of ``processes`` training processes sharing this host's usable cores.

    ``override`` (CONVTUNE_TORCH_THREADS) wins, then an operator's ``OMP_NUM_THREADS``, then the share.
    """
    cpus = usable_cpus() if cpus is None else cpus
    if override is None:
        override = _omp_threads()
    processes = max(1, processes)
    intra = override if override is not None else max(1, cpus // processes)
    return ThreadPolicy(intra_op=intra, inter_op=1, cpus=cpus, processes=processes)


def _omp_threads() -> int | None:
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value >= 1 else None


def apply_threads(policy: ThreadPolicy) -> None:
    """Set this process's torch thread pools to ``policy`` (before its first parallel op, for inter-op)."""
    torch.set_num_threads(policy.intra_op)
    if torch.get_num_interop_threads() != policy.inter_op:
        try:
            torch.set_num_interop_threads(policy.inter_op)
        except RuntimeError:  # the inter-op pool already ran something in this process: it keeps its size
            log.info("inter-op threads stay at %d: set after torch's first parallel work", torch.get_num_interop_threads())
