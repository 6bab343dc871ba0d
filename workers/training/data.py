"""A trial's data as tensors on its device, built once per worker process for the built-in sets.

A study's trials differ in learning rate, batch size or architecture, rarely in data: loading,
splitting and normalising ``digits`` again for each one-epoch trial cost a large share of the epoch
(docs/performance.md, "Per-trial work outside the epoch"). The built-in sets are a pure function of their spec (name,
size, seed, split), so their tensors are kept per process, keyed by that spec and the device, a few
at a time. Files (``npz``, ``folder``) are read again every time: they may change between trials.
Training never writes into these tensors (it indexes them), so trials can share them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from threading import Lock

import torch

from models.data.roots import DataRoot
from models.data.sets import RawInput, load
from models.spec.plan import InputInfo
from models.spec.trial import BUILTIN_DATASETS, DataSpec

__all__ = ["DeviceData", "device_data"]

MAX_CACHED = 2  # data sets kept per process
MAX_CACHED_BYTES = 1 << 30  # a larger one is used once and not kept


@dataclass(frozen=True)
class DeviceData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    info: InputInfo
    class_names: list[str]
    raw: RawInput | None = None  # what its raw images are, and its training statistics in raw pixel units (a served model's input)

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in (self.x_train, self.y_train, self.x_val, self.y_val))


_cache: OrderedDict[tuple[str, str], DeviceData] = OrderedDict()
_lock = Lock()


def device_data(spec: DataSpec, root: DataRoot | Path | None, device: torch.device) -> DeviceData:
    """The data set ``spec`` names, split and normalised, as tensors on ``device``."""
    key = (spec.model_dump_json(), str(device))
    cacheable = spec.name in BUILTIN_DATASETS
    if cacheable:
        with _lock:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
    data = load(spec, root)
    x_train, y_train, x_val, y_val = (torch.from_numpy(a).to(device) for a in (data.x_train, data.y_train, data.x_val, data.y_val))
    tensors = DeviceData(x_train, y_train, x_val, y_val, data.info, list(data.class_names), data.raw)
    if cacheable and tensors.nbytes <= MAX_CACHED_BYTES:
        with _lock:
            _cache[key] = tensors
            while len(_cache) > MAX_CACHED:
                _cache.popitem(last=False)
    return tensors


def clear() -> None:
    """Forget every cached data set (a worker giving back GPU memory; tests)."""
    with _lock:
        _cache.clear()
