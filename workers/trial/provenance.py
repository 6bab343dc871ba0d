"""A delivery's provenance: the code, libraries, device and data it ran with, as tags on its run.

They go with the run's start tags, in the same request (:meth:`MlflowTracker.starting`,
:meth:`MlflowTracker.start`). What stays the same for the life of the process (versions, the commit)
is read once; the device's name once per device; the data's fingerprint
(:func:`models.data.fingerprint.fingerprint`) is kept per file by its modification time and size.

The commit is, in order: ``CONVTUNE_COMMIT``; the file ``COMMIT`` at the source root (a build writes
it, e.g. ``git rev-parse HEAD > COMMIT`` before ``docker build``); ``git rev-parse HEAD`` when the
source is a git checkout; else ``unknown``.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch

from models.data import DataRoot
from models.data.fingerprint import UNKNOWN, fingerprint
from models.spec.trial import DataSpec
from models.store.runs import TAG
from workers.trial.accounting import device_kind

__all__ = ["provenance_tags", "source_commit"]

log = logging.getLogger(__name__)
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def provenance_tags(data: DataSpec, root: DataRoot | None, device: torch.device) -> dict[str, str]:
    """The provenance tags of a delivery training on ``device`` with ``data`` (``root``: as its team sees it); never raises."""
    tags = dict(_process_tags())
    try:
        tags[TAG.DEVICE_NAME] = device_kind(device)
    except Exception:  # noqa: BLE001 - a device that cannot be named still trains (or fails with its own error)
        tags[TAG.DEVICE_NAME] = UNKNOWN
    try:
        tags[TAG.DATA_FINGERPRINT] = fingerprint(data, root)
    except Exception as exc:  # noqa: BLE001 - provenance never fails a trial
        log.warning("the data's fingerprint could not be taken: %s: %s", type(exc).__name__, exc)
        tags[TAG.DATA_FINGERPRINT] = UNKNOWN
    return tags


@lru_cache(maxsize=1)
def _process_tags() -> dict[str, str]:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        TAG.VERSION: _version(),
        TAG.COMMIT: source_commit(),
        TAG.TORCH: torch.__version__,
        TAG.CUDA: torch.version.cuda or "none",
        TAG.CUDNN: str(cudnn) if cudnn else "none",
        TAG.PYTHON: platform.python_version(),
    }


def _version() -> str:
    try:
        return metadata.version("convtune")
    except metadata.PackageNotFoundError:
        return UNKNOWN


@lru_cache(maxsize=1)
def source_commit() -> str:
    """The commit of the running source (see the module's doc); looked up once per process."""
    given = os.environ.get("CONVTUNE_COMMIT", "").strip()
    if given:
        return given
    written = SOURCE_ROOT / "COMMIT"
    try:
        text = written.read_text(encoding="utf-8").strip()
        if text:
            return text
    except OSError:
        pass  # no file: not a build that wrote one
    if (SOURCE_ROOT / ".git").exists():
        try:
            done = subprocess.run(
                ["git", "-C", str(SOURCE_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
            )
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass  # no git here, or it hung: unknown
    return UNKNOWN
