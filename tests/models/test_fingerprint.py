"""A data set's fingerprint: the same bytes (or built-in parameters) give the same hash, any change another."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from models.data import DataRoot
from models.data import fingerprint as fp
from models.data.fingerprint import UNKNOWN, fingerprint
from models.spec.trial import DataSpec


def npz(root: Path, name: str, seed: int = 0) -> DataSpec:
    rng = np.random.default_rng(seed)
    np.savez(root / name, images=rng.random((20, 8, 8)).astype(np.float32), labels=np.arange(20) % 2)
    return DataSpec(name="npz", path=name)


def test_built_in_sets_are_fingerprinted_by_what_draws_them():
    shapes = fingerprint(DataSpec(name="shapes"), None)
    assert shapes.startswith("sha256:") and len(shapes) == len("sha256:") + 64
    assert fingerprint(DataSpec(name="shapes"), None) == shapes
    for change in ({"seed": 1}, {"num_samples": 500}, {"image_size": 16}, {"num_classes": 3}):
        assert fingerprint(DataSpec(name="shapes", **change), None) != shapes, change
    # The split is the run's params, not its data: digits with another val_fraction or seed are the same images.
    assert fingerprint(DataSpec(name="digits"), None) == fingerprint(DataSpec(name="digits", seed=3, val_fraction=0.3), None) != shapes


def test_an_npz_is_fingerprinted_by_its_bytes(tmp_path: Path):
    a = npz(tmp_path, "a.npz")
    first = fingerprint(a, tmp_path)
    assert first != UNKNOWN and fingerprint(a, DataRoot(tmp_path)) == first
    (tmp_path / "copy.npz").write_bytes((tmp_path / "a.npz").read_bytes())
    assert fingerprint(DataSpec(name="npz", path="copy.npz"), tmp_path) == first  # same bytes, another name
    npz(tmp_path, "a.npz", seed=1)
    assert fingerprint(a, tmp_path) != first  # rewritten: its size or modification time moved, so it is read again


def test_a_file_is_read_once_while_it_stays_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec = npz(tmp_path, "a.npz")
    fingerprint(spec, tmp_path)
    opened: list[Path] = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: opened.append(self) or real_open(self, *a, **k))
    fingerprint(spec, tmp_path)
    assert opened == []
    os.utime(tmp_path / "a.npz", ns=(1, 1))
    fingerprint(spec, tmp_path)
    assert len(opened) == 1


def test_a_folder_is_fingerprinted_by_its_files_and_their_names(tmp_path: Path):
    for cls in ("cat", "dog"):
        (tmp_path / "pets" / cls).mkdir(parents=True)
        (tmp_path / "pets" / cls / "1.png").write_bytes(cls.encode())
    (tmp_path / "pets" / ".cache").mkdir()
    spec = DataSpec(name="folder", path="pets")
    first = fingerprint(spec, tmp_path)
    (tmp_path / "pets" / ".cache" / "x").write_bytes(b"hidden")
    assert fingerprint(spec, tmp_path) == first  # hidden files and folders are not data
    (tmp_path / "pets" / "dog").rename(tmp_path / "pets" / "wolf")
    assert fingerprint(spec, tmp_path) not in (first, UNKNOWN)


def test_missing_data_is_unknown_never_an_error(tmp_path: Path):
    assert fingerprint(DataSpec(name="npz", path="missing.npz"), tmp_path) == UNKNOWN
    assert fingerprint(DataSpec(name="folder", path="missing"), tmp_path) == UNKNOWN
    assert fingerprint(DataSpec(name="npz", path="a.npz"), None) == UNKNOWN  # no data root on this process
    assert fingerprint(DataSpec(name="npz", path="a.npz"), tmp_path / "not-there") == UNKNOWN
    (tmp_path / "elsewhere.npz").write_bytes(b"x")
    assert fingerprint(DataSpec(name="npz", path="elsewhere.npz"), DataRoot(tmp_path, team="vision")) == UNKNOWN  # not the team's


def test_the_cache_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fp, "_FILE_DIGESTS", {})
    monkeypatch.setattr(fp, "_FILES_KEPT", 2)
    for i in range(5):
        fingerprint(npz(tmp_path, f"{i}.npz", seed=i), tmp_path)
    assert len(fp._FILE_DIGESTS) <= 2
