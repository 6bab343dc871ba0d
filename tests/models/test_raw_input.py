"""What each data set says its raw images are: the served model's input contract (models.data.sets.RawInput)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.data.sets import load
from models.spec.trial import DataSpec
from tests.models.test_data import write_image, write_npz


def _normalised_from_raw(raw: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(raw - mean) / std per channel of (N, C, H, W) images: what the served model computes."""
    return (raw - np.asarray(mean)[None, :, None, None]) / np.asarray(std)[None, :, None, None]


def test_digits_raw_pixels_are_sklearns_0_to_16_and_their_statistics_reproduce_training() -> None:
    from sklearn.datasets import load_digits

    data = load(DataSpec(name="digits"), None)
    assert data.raw is not None and (data.raw.dtype, data.raw.layout, data.raw.scale) == ("float64", "NHW", 16.0)
    assert data.raw.shape(data.info) == (8, 8)
    raw = load_digits().images[:, None]  # (N, 1, 8, 8), 0..16
    # The training split's statistics in raw units: the validation images come out as training normalised them.
    normalised = _normalised_from_raw(raw, data.raw.mean, data.raw.std)
    matches = [np.flatnonzero(np.abs(normalised - v).reshape(len(raw), -1).max(axis=1) < 1e-4) for v in data.x_val[:5]]
    assert all(len(m) >= 1 for m in matches)


def test_shapes_are_float_nchw_in_0_to_1() -> None:
    data = load(DataSpec(name="shapes", num_samples=100, image_size=16, num_classes=2), None)
    assert data.raw is not None and (data.raw.dtype, data.raw.layout, data.raw.scale) == ("float32", "NCHW", 1.0)
    assert len(data.raw.mean) == 3 and data.raw.shape(data.info) == (3, 16, 16)


@pytest.mark.parametrize(("shape", "layout", "one"), [((40, 6, 5), "NHW", (6, 5)), ((40, 6, 5, 3), "NHWC", (6, 5, 3)), ((40, 3, 6, 5), "NCHW", (3, 6, 5))])
def test_npz_raw_images_are_the_arrays_own_dtype_and_layout(tmp_path: Path, shape: tuple[int, ...], layout: str, one: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    spec = write_npz(tmp_path, images=rng.integers(0, 256, size=shape).astype(np.uint8), labels=np.arange(40) % 2)
    data = load(spec, tmp_path)
    assert data.raw is not None and (data.raw.dtype, data.raw.layout) == ("uint8", layout)
    assert data.raw.shape(data.info) == one


def test_folder_raw_images_are_uint8_as_files_decode(tmp_path: Path) -> None:
    for i in range(4):
        write_image(tmp_path / "set" / "a" / f"{i}.png", (10, 12), mode="L", value=10 * i)
        write_image(tmp_path / "set" / "b" / f"{i}.png", (10, 12), mode="L", value=200 - 10 * i)
    data = load(DataSpec(name="folder", path="set"), tmp_path)
    assert data.raw is not None and (data.raw.dtype, data.raw.layout, data.raw.scale) == ("uint8", "NHW", 255.0)
    assert data.raw.shape(data.info) == (12, 10)  # (H, W): PIL's size is (W, H)
    assert 0 < data.raw.mean[0] < 255 and data.raw.std[0] > 1  # raw units, not the loader's 0..1
