"""Images for a trial: the built-in data sets, a team's own files, and the train/validation split.

Built-ins need no files: ``digits`` (scikit-learn's 1,797 8x8 digits, shipped inside its wheel) and
``shapes`` (coloured shapes drawn procedurally from ``DataSpec.seed``). A team's data lives in its
folder of a data root the workers share, or in the shared folder every team reads (:mod:`models.data.roots`):

- ``npz``: arrays ``images`` (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3, any numeric dtype
  (pixels are used as they are: normalisation takes care of the scale), and integer ``labels`` (N,) in
  [0, K), at least two distinct. K is the largest label + 1.
- ``folder``: one sub-folder per class (sorted by name; hidden and image-less ones skipped). Every
  image is converted to the first image's mode (greyscale 'L' stays one channel, anything else becomes
  RGB) and resized, bilinear, to the first image's size; pixels are scaled to [0, 1].

Every class with two or more samples gives ``round(val_fraction * n)`` of them (at least one, never all)
to validation, drawn with ``np.random.default_rng(spec.seed)``: the same spec gives the same arrays.

:func:`describe` sizes the input cheaply (no full load), so the API can check a spec's feasibility;
:func:`load` reads everything, validates it, splits it and normalises it with training statistics.
What a raw image of each set is (the dtype, layout and pixel range its source holds, before the loader
scales it) and those statistics in raw pixel units come with it (:class:`RawInput`): a served model
takes raw images and normalises them itself, as training did.
Both raise :class:`InvalidData` for data that cannot be used (a file that cannot be read included), with a
message naming the path as the spec gave it (the root itself is deployment detail and never appears in a
message). A path that leaves the caller's folders gets the very message of a path that does not exist.

This module must not import torch; scikit-learn and PIL are imported only by the functions that need
them, so the API pays for neither.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from models.data.roots import DataRoot, InvalidData, inside
from models.spec.plan import InputInfo
from models.spec.trial import DataSpec

__all__ = ["DataRoot", "Dataset", "InputInfo", "InvalidData", "RawInput", "SHAPE_CLASSES", "describe", "load"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
_MODE_CHANNELS = {"L": 1, "RGB": 3}
# A label like 10**9 would silently build a head with a billion outputs.
MAX_CLASSES = 10_000
# What reading a damaged or unreadable npz raises, besides ValueError (which says what is wrong with an array).
_READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class RawInput:
    """A raw image of a data set, as its source holds it before the loader scales it: what a served model takes.

    ``layout``: "NCHW", "NHWC" or "NHW" (one channel); ``dtype``: a numpy dtype name; ``pixels``: their range, in
    words; ``scale``: what the loader divides raw pixels by; ``mean`` and ``std``: the training split's statistics
    per channel in raw pixel units, so that ``(raw - mean) / std`` is what the net was trained on.
    """

    dtype: str
    layout: str
    pixels: str
    scale: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def shape(self, info: InputInfo) -> tuple[int, ...]:
        """One raw image's shape (without the batch axis), in this layout."""
        return {"NCHW": (info.channels, info.height, info.width), "NHWC": (info.height, info.width, info.channels),
                "NHW": (info.height, info.width)}[self.layout]


@dataclass
class Dataset:
    """A split, normalised data set: images float32 (N, C, H, W), labels int64 (N,); ``raw``: what its raw images are."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    info: InputInfo
    class_names: list[str]
    raw: RawInput | None = None


def describe(spec: DataSpec, root: DataRoot | Path | None) -> InputInfo | None:
    """Size the input without loading it; None for file data when this process has no data root.

    ``root``: the data root as the spec's team sees it; a bare Path is a data root without teams.
    """
    if spec.name == "digits":
        return InputInfo(channels=1, height=8, width=8, num_classes=10)
    if spec.name == "shapes":
        return InputInfo(channels=3, height=spec.image_size, width=spec.image_size, num_classes=spec.num_classes)
    if root is None:
        return None
    assert spec.path is not None, "DataSpec guarantees a path for file data sets"
    root = _as_root(root)
    if spec.name == "npz":
        return _describe_npz(root.find(spec.path), spec.path)
    return _describe_folder(root, spec.path)


def load(spec: DataSpec, root: DataRoot | Path | None) -> Dataset:
    """Load, validate, split (seeded by ``spec.seed``) and normalise the data set a spec names (``root``: as in :func:`describe`)."""
    if spec.name in ("npz", "folder") and root is None:
        raise InvalidData(f"dataset {spec.name!r} needs a data root, and none is configured here")
    images, labels, class_names, raw = _LOADERS[spec.name](spec, None if root is None else _as_root(root))
    _check_finite(images, spec.path or spec.name)
    train, val = _split(labels, spec.val_fraction, np.random.default_rng(spec.seed), spec.path or spec.name)
    x_train, x_val, mean, std = _normalise(images[train], images[val])
    c, h, w = images.shape[1:]
    return Dataset(
        x_train=x_train, y_train=labels[train], x_val=x_val, y_val=labels[val],
        info=InputInfo(channels=c, height=h, width=w, num_classes=len(class_names)),
        class_names=class_names,
        raw=replace(raw, mean=tuple(float(m) * raw.scale for m in mean), std=tuple(float(s) * raw.scale for s in std)),
    )


def _as_root(root: DataRoot | Path) -> DataRoot:
    return root if isinstance(root, DataRoot) else DataRoot(root)


# --- built-ins ------------------------------------------------------------------------------------


def _load_digits(spec: DataSpec, root: DataRoot | None) -> tuple[np.ndarray, np.ndarray, list[str], RawInput]:
    from sklearn.datasets import load_digits  # the API never loads data: keep sklearn out of it

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8), pixels 0..16
    raw = RawInput(str(digits.images.dtype), "NHW", "0 to 16, as scikit-learn's load_digits().images holds them", scale=16.0)
    return images, digits.target.astype(np.int64), [str(d) for d in range(10)], raw


def _load_shapes(spec: DataSpec, root: DataRoot | None) -> tuple[np.ndarray, np.ndarray, list[str], RawInput]:
    images, labels = _make_shapes(spec.num_samples, spec.image_size, spec.num_classes, spec.seed)
    return images, labels, list(SHAPE_CLASSES[: spec.num_classes]), RawInput("float32", "NCHW", "0 to 1")


# Shape -> pixel mask, given offsets dx, dy from the centre, half-size r and stroke half-width t.
# In this order: DataSpec.num_classes = K takes the first K.
_ShapeMask = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
_SHAPES: dict[str, _ShapeMask] = {
    "square": lambda dx, dy, r, t: (abs(dx) <= r) & (abs(dy) <= r),
    "circle": lambda dx, dy, r, t: dx * dx + dy * dy <= r * r,
    "triangle": lambda dx, dy, r, t: (abs(dy) <= r) & (abs(dx) <= (dy + r) / 2),  # apex up, base 2r wide
    "cross": lambda dx, dy, r, t: ((abs(dx) <= t) & (abs(dy) <= r)) | ((abs(dy) <= t) & (abs(dx) <= r)),
    "horizontal_bar": lambda dx, dy, r, t: (abs(dy) <= t) & (abs(dx) <= r),
    "vertical_bar": lambda dx, dy, r, t: (abs(dx) <= t) & (abs(dy) <= r),
    "ring": lambda dx, dy, r, t: ((r - 1.5 * t) ** 2 <= dx * dx + dy * dy) & (dx * dx + dy * dy <= r * r),
    "diamond": lambda dx, dy, r, t: abs(dx) + abs(dy) <= r,
}
SHAPE_CLASSES = tuple(_SHAPES)


def _make_shapes(num_samples: int, size: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``num_samples`` (3, size, size) images in [0, 1] of the first ``num_classes`` shapes."""
    # A stream of its own, so the split (seeded by the same spec.seed) is not correlated with drawing.
    rng = np.random.default_rng([seed, 0x5A4E5])
    n, f32 = num_samples, np.float32
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)  # balanced classes
    # Position, size and colours are drawn independently of the label: only the shape tells classes apart.
    r = (rng.uniform(0.18, 0.38, n) * size).astype(f32)
    cx = rng.uniform(r, size - 1 - r).astype(f32)
    cy = rng.uniform(r, size - 1 - r).astype(f32)
    background = rng.uniform(0.0, 0.45, (n, 3)).astype(f32)
    foreground = rng.uniform(0.55, 1.0, (n, 3)).astype(f32)
    dark_on_light = rng.random(n) < 0.5  # otherwise image brightness would track the shape's area
    background[dark_on_light], foreground[dark_on_light] = foreground[dark_on_light], background[dark_on_light]

    grid = np.arange(size, dtype=f32)
    mask = np.zeros((n, size, size), dtype=bool)
    for k, name in enumerate(SHAPE_CLASSES[:num_classes]):
        idx = np.flatnonzero(labels == k)
        dx = grid[None, None, :] - cx[idx, None, None]  # (n_k, 1, S)
        dy = grid[None, :, None] - cy[idx, None, None]  # (n_k, S, 1)
        half = r[idx, None, None]
        mask[idx] = _SHAPES[name](dx, dy, half, np.maximum(half / 3, f32(0.75)))  # strokes at least 1.5 px wide

    images = np.where(mask[:, None], foreground[:, :, None, None], background[:, :, None, None])  # (n, 3, S, S)
    images += rng.standard_normal(images.shape, dtype=f32) * f32(0.08)
    return np.clip(images, 0.0, 1.0, out=images), labels


# --- npz ------------------------------------------------------------------------------------------


def _npy_header(archive: zipfile.ZipFile, member: str, shown: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an .npz, read from its header without decompressing the data."""
    try:
        with archive.open(member) as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
    except (KeyError, ValueError, *_READ_ERRORS) as exc:
        raise InvalidData(f"{shown}: {member!r} is not a readable numpy array ({exc})") from exc
    return tuple(shape), dtype


def _image_layout(shape: tuple[int, ...], shown: str) -> tuple[int, int, int, bool]:
    """(channels, height, width, channels_last) of an ``images`` array of the given shape.

    (N, H, W) is one channel. A 4-D array is channel-last when its last axis is 1 or 3, else
    channel-first when its second axis is 1 or 3; when both are, channel-last wins (numpy's and PIL's
    convention), so a (N, 3, 32, 3) array is read as 3x32 images with 3 channels.
    """
    if len(shape) == 3:
        return 1, shape[1], shape[2], True
    if len(shape) == 4 and shape[3] in (1, 3):
        return shape[3], shape[1], shape[2], True
    if len(shape) == 4 and shape[1] in (1, 3):
        return shape[1], shape[2], shape[3], False
    raise InvalidData(
        f"{shown}: 'images' has shape {shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3"
    )


def _check_npz(path: Path | None, shown: str) -> tuple[tuple[int, int, int, bool], np.ndarray]:
    """Validate an npz's arrays (shapes, dtypes, labels); return the image layout and the labels.

    ``path`` None (it leaves the caller's folders) is answered as a file that does not exist.
    """
    if path is None or not _exists(path, Path.is_file):
        raise InvalidData(f"{shown}: no such file under the data root")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            missing = [a for a in ("images", "labels") if f"{a}.npy" not in names]
            if missing:
                raise InvalidData(f"{shown}: the npz has no {' or '.join(repr(m) for m in missing)} array")
            shape, dtype = _npy_header(archive, "images.npy", shown)
    except zipfile.BadZipFile as exc:
        raise InvalidData(f"{shown}: not an npz (zip) file") from exc
    except OSError as exc:  # its strerror only: the exception's text names the file under the root
        raise InvalidData(f"{shown}: the file cannot be read ({exc.strerror or type(exc).__name__})") from exc
    if dtype.kind not in "uif":
        raise InvalidData(f"{shown}: 'images' has dtype {dtype}; expected numbers (uint8 or float)")
    layout = _image_layout(shape, shown)
    if min(shape) < 1:
        raise InvalidData(f"{shown}: 'images' has shape {shape}, with an empty axis")
    labels = _read_array(path, "labels", shown)  # small, and the class count needs its maximum
    return layout, _check_labels(labels, shape[0], shown)


def _read_array(path: Path, name: str, shown: str) -> np.ndarray:
    """The array ``name`` of the npz at ``path``; InvalidData when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz[name]
    except ValueError as exc:  # object arrays need pickle, which user files never get
        raise InvalidData(f"{shown}: {name!r} is not a plain numeric array ({exc})") from exc
    except _READ_ERRORS as exc:
        raise InvalidData(f"{shown}: {name!r} cannot be read: the file is damaged or unreadable") from exc


def _exists(path: Path, kind: Callable[[Path], bool]) -> bool:
    """``kind(path)`` (Path.is_file, Path.is_dir), False where the check itself fails (no permission)."""
    try:
        return kind(path)
    except OSError:
        return False


def _check_labels(labels: np.ndarray, n: int, shown: str) -> np.ndarray:
    """Validate integer labels in [0, K) for ``n`` images with at least two classes; return int64."""
    if labels.ndim != 1:
        raise InvalidData(f"{shown}: 'labels' has shape {labels.shape}; expected one label per image, shape ({n},)")
    if labels.dtype.kind not in "ui":
        raise InvalidData(f"{shown}: 'labels' has dtype {labels.dtype}; expected integer class indices")
    if labels.shape[0] != n:
        raise InvalidData(f"{shown}: 'labels' has {labels.shape[0]} entries but 'images' has {n}")
    if labels.min() < 0 or labels.max() >= MAX_CLASSES:
        raise InvalidData(f"{shown}: labels must lie in [0, {MAX_CLASSES}), found {labels.min()}..{labels.max()}")
    if len(np.unique(labels)) < 2:
        raise InvalidData(f"{shown}: every label is {labels[0]}; a classifier needs at least 2 classes")
    return labels.astype(np.int64)


def _describe_npz(path: Path | None, shown: str) -> InputInfo:
    (c, h, w, _), labels = _check_npz(path, shown)
    return InputInfo(channels=c, height=h, width=w, num_classes=int(labels.max()) + 1)


def _load_npz(spec: DataSpec, root: DataRoot | None) -> tuple[np.ndarray, np.ndarray, list[str], RawInput]:
    assert root is not None and spec.path is not None
    path = root.find(spec.path)
    (_, _, _, channels_last), labels = _check_npz(path, spec.path)
    assert path is not None, "_check_npz refuses a path that leaves the caller's folders"
    stored = _read_array(path, "images", spec.path)
    layout = "NHW" if stored.ndim == 3 else "NHWC" if channels_last else "NCHW"
    raw = RawInput(str(stored.dtype), layout, "as the npz's 'images' array holds them")
    images = stored.astype(np.float32)
    if images.ndim == 3:
        images = images[:, None]
    elif channels_last:
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))  # (N, H, W, C) -> (N, C, H, W)
    return images, labels, [str(k) for k in range(int(labels.max()) + 1)], raw


# --- folder ---------------------------------------------------------------------------------------


def _class_files(root: DataRoot, shown: str) -> list[tuple[str, list[Path]]]:
    """Sorted (class name, sorted image paths) of every sub-folder that holds at least one image.

    A class folder or image that leads out of the caller's folders (a symlink) counts as not there,
    like one that does not exist: what it points at, and whether it exists, stays unknown.
    """
    path, folder = root.find(shown), root.folder_of(shown)
    if path is None or folder is None or not _exists(path, Path.is_dir):
        raise InvalidData(f"{shown}: no such folder under the data root")
    classes = []
    try:
        subs = sorted(p for p in path.iterdir() if not p.name.startswith(".") and inside(p, folder) and _exists(p, Path.is_dir))
        for sub in subs:
            files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and inside(p, folder) and _exists(p, Path.is_file))
            if files:
                classes.append((sub.name, files))
    except OSError as exc:  # its strerror only: the exception's text names the folder under the root
        raise InvalidData(f"{shown}: the folder cannot be read ({exc.strerror or type(exc).__name__})") from exc
    if len(classes) < 2:
        raise InvalidData(
            f"{shown}: found {len(classes)} class sub-folder(s) with images; a classifier needs at least 2"
        )
    return classes


def _first_image_info(first: Path, shown: str) -> tuple[str, tuple[int, int]]:
    """PIL mode every image is converted to ('L' or 'RGB') and (width, height), from the first image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(first) as img:
            return ("L" if img.mode == "L" else "RGB"), img.size  # palette, alpha, 16-bit...: RGB
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidData(f"{shown}/{first.parent.name}/{first.name}: not a readable image") from exc


def _describe_folder(root: DataRoot, shown: str) -> InputInfo:
    classes = _class_files(root, shown)
    mode, (width, height) = _first_image_info(classes[0][1][0], shown)
    return InputInfo(channels=_MODE_CHANNELS[mode], height=height, width=width, num_classes=len(classes))


def _load_folder(spec: DataSpec, root: DataRoot | None) -> tuple[np.ndarray, np.ndarray, list[str], RawInput]:
    """Read every image; each is converted to the first one's mode and resized to its size (bilinear)."""
    from PIL import Image, UnidentifiedImageError

    assert root is not None and spec.path is not None
    shown = spec.path
    classes = _class_files(root, shown)
    mode, size = _first_image_info(classes[0][1][0], shown)
    images, labels = [], []
    for k, (name, files) in enumerate(classes):
        for f in files:
            try:
                with Image.open(f) as img:
                    pixels = img.convert(mode)
                    if pixels.size != size:
                        pixels = pixels.resize(size, Image.Resampling.BILINEAR)
                    images.append(np.asarray(pixels, dtype=np.float32) / 255.0)
            except (UnidentifiedImageError, OSError) as exc:
                raise InvalidData(f"{shown}/{name}/{f.name}: not a readable image") from exc
            labels.append(k)
    stacked = np.stack(images)  # (N, H, W) or (N, H, W, 3)
    # Raw: the pixels an image file decodes to (numpy.asarray of the PIL image, converted and resized as above).
    raw = RawInput("uint8", "NHW" if stacked.ndim == 3 else "NHWC", f"0 to 255, each image converted to {mode} and resized to {size[0]}x{size[1]}", scale=255.0)
    stacked = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(stacked), np.asarray(labels, dtype=np.int64), [name for name, _ in classes], raw


# --- split and normalisation ----------------------------------------------------------------------


def _check_finite(images: np.ndarray, shown: str) -> None:
    if not np.isfinite(images).all():
        raise InvalidData(f"{shown}: 'images' holds NaN or infinite values")


def _split(labels: np.ndarray, val_fraction: float, rng: np.random.Generator, shown: str) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: each class with 2+ samples gives round(fraction * n) of them (at least 1) to val."""
    train, val = [], []
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_val = 0 if len(idx) < 2 else min(max(1, round(val_fraction * len(idx))), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    train_idx, val_idx = rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise InvalidData(
            f"{shown}: {len(labels)} samples leave {len(train_idx)} for training and {len(val_idx)} for "
            "validation; each split needs at least one"
        )
    return train_idx, val_idx


def _normalise(x_train: np.ndarray, x_val: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scale both splits per channel to zero mean, unit std of the training split (no val leakage); also the (C,) mean and std."""
    # Statistics accumulate in float64 (float32 sums drift over millions of pixels); the arrays stay float32.
    mean = x_train.mean(axis=(0, 2, 3), dtype=np.float64, keepdims=True)
    std = x_train.std(axis=(0, 2, 3), dtype=np.float64, keepdims=True)
    std = np.where(std < 1e-6, 1.0, std)  # a constant channel stays finite rather than dividing by 0
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    return (x_train - mean) / std, (x_val - mean) / std, mean.reshape(-1), std.reshape(-1)


_Loader = Callable[[DataSpec, DataRoot | None], tuple[np.ndarray, np.ndarray, list[str], RawInput]]
_LOADERS: dict[str, _Loader] = {
    "digits": _load_digits, "shapes": _load_shapes, "npz": _load_npz, "folder": _load_folder,
}
