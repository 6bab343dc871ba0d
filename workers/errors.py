"""The workers' exceptions, under one root, :class:`WorkerError` (a :class:`~models.errors.ConvtuneError`).

    WorkerError
     +-- TrialStopped                  workers/training/outcomes.py  the loop stopped the trial on purpose (its outcome)
     |    +-- Cancelled                workers/training/outcomes.py  the trial's cancel flag was raised
     |    +-- TimedOut                 workers/training/outcomes.py  past the spec's time_limit_s
     |    +-- Diverged                 workers/training/outcomes.py  the loss blew up
     |    +-- Pruned                   workers/training/outcomes.py  a study's pruner stopped it early
     |    +-- Superseded               workers/training/outcomes.py  this worker lost the trial's lease
     |    +-- NotEnoughDevices         workers/training/parallel.py  the trial asks for more devices than the worker owns
     |    +-- PeerStopped              workers/training/parallel.py  rank 0 stopped the trial; the other ranks just end
     |    +-- RankFailed               workers/training/parallel.py  another rank failed, with its outcome
     +-- BatchTooLarge (+ MemoryError) workers/training/batching.py  even the smallest batch does not fit the device
     +-- UnreadableCheckpoint          workers/training/train.py     a checkpoint that is there but cannot be loaded
     +-- LeaseHeld                     workers/trial/execution.py    another worker holds the trial's lease; retry later
     +-- LrAutoFailed                  workers/trial/lr_finder.py    a study's lr_auto range test gave no range
     +-- TrialFailed                   workers/study/step.py         the trial ended with nothing to tell Optuna (FAIL)
     +-- LockLost                      workers/reconciler/sweep.py   another reconciler took the sweep lock
     +-- RetryableDelivery             workers/callbacks/delivery.py a callback's receiver could not take it now
     +-- RefusedDestination            workers/callbacks/delivery.py a callback address callbacks may not reach

    (BaseException, on purpose: control flow, not errors, outside the tree)
     +-- StepInterrupted               workers/study/step.py         the trial stopped without an ending
     +-- _EndedEarlier                 workers/study/step.py         the trial's run ended before this delivery

Each class stays in the module that raises it (and is imported from there). BatchTooLarge keeps
MemoryError as a second base: ``classify`` reads ``out_of_memory`` from it. StepInterrupted and
_EndedEarlier derive from BaseException so that Optuna's ``study.optimize``, which records every
Exception as a FAIL, lets them through without recording the trial. This module imports nothing of
``workers``: the training loop (``workers.training``) may import it, and nothing above it.
"""

from __future__ import annotations

from models.errors import ConvtuneError

__all__ = ["WorkerError"]


class WorkerError(ConvtuneError):
    """Base of every exception the workers raise on purpose."""
