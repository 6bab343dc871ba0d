"""Data sets: built-ins, npz and folders under a data root, validation, split and normalisation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.data.roots import DataRoot
from models.data.sets import SHAPE_CLASSES, Dataset, InvalidData, describe, load
from models.spec.plan import InputInfo
from models.spec.trial import DataSpec


def npz_spec(path: str = "set.npz", **kw: Any) -> DataSpec:
    return DataSpec(name="npz", path=path, **kw)


def write_npz(root: Path, name: str = "set.npz", **arrays: Any) -> DataSpec:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    np.savez(root / name, **arrays)
    return npz_spec(name)


def toy_arrays(n: int = 40, shape: tuple[int, ...] = (6, 5), classes: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"images": rng.random((n, *shape)).astype(np.float32), "labels": np.arange(n) % classes}


def assert_same(a: Dataset, b: Dataset) -> None:
    for field in ("x_train", "y_train", "x_val", "y_val"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert (a.info, a.class_names) == (b.info, b.class_names)


def refusal(spec: DataSpec, root: DataRoot | Path | None, *, cheap: bool = True, names_root: bool = False) -> str:
    """The message load() (and describe(), when ``cheap``) refuses ``spec`` with; it must hide the root (unless the spec ``names_root``)."""
    with pytest.raises(InvalidData) as loaded:
        load(spec, root)
    if cheap:
        with pytest.raises(InvalidData) as described:
            describe(spec, root)
        assert str(described.value) == str(loaded.value)
    message = str(loaded.value)
    assert root is None or names_root or str(getattr(root, "path", root)) not in message
    return message


# --- built-ins ------------------------------------------------------------------------------------


def test_digits_loads_split_and_normalised() -> None:
    spec = DataSpec(name="digits", val_fraction=0.2, seed=3)
    data = load(spec, None)
    assert data.info == describe(spec, None) == InputInfo(1, 8, 8, 10)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.x_train.shape[1:] == data.x_val.shape[1:] == (1, 8, 8)
    assert len(data.y_train) + len(data.y_val) == 1797
    assert abs(len(data.y_val) - 0.2 * 1797) <= 10
    assert set(data.y_val) == set(data.y_train) == set(range(10))  # stratified: every class in both
    assert np.allclose(data.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    assert np.allclose(data.x_train.std(axis=(0, 2, 3)), 1, atol=1e-4)
    assert data.class_names == [str(d) for d in range(10)]
    assert_same(data, load(spec, None))
    assert not np.array_equal(load(spec.model_copy(update={"seed": 4}), None).y_val, data.y_val)


@pytest.mark.parametrize(("size", "classes"), [(8, 2), (32, 8), (20, 5)])
def test_shapes_loads_deterministically_with_balanced_classes(size: int, classes: int) -> None:
    spec = DataSpec(name="shapes", image_size=size, num_classes=classes, num_samples=400, seed=5)
    data = load(spec, None)
    assert data.info == describe(spec, None) == InputInfo(3, size, size, classes)
    assert data.x_train.shape[1:] == (3, size, size)
    assert data.class_names == list(SHAPE_CLASSES[:classes])
    labels = np.concatenate([data.y_train, data.y_val])
    assert np.bincount(labels).tolist() == [400 // classes + (k < 400 % classes) for k in range(classes)]
    assert np.isfinite(data.x_train).all() and np.isfinite(data.x_val).all()
    assert np.allclose(data.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    assert_same(data, load(spec, None))
    assert not np.array_equal(load(spec.model_copy(update={"seed": 6}), None).x_train, data.x_train)


def test_shapes_generates_2000_images_in_well_under_a_second() -> None:
    spec = DataSpec(name="shapes", num_samples=2000, image_size=32, num_classes=8)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        load(spec, None)
        best = min(best, time.perf_counter() - start)
    assert best < 1.0, f"{best:.2f} s"


def test_shapes_colour_does_not_tell_the_class() -> None:
    data = load(DataSpec(name="shapes", num_samples=4000, num_classes=4), None)
    x, y = np.concatenate([data.x_train, data.x_val]), np.concatenate([data.y_train, data.y_val])
    # A nearest-centroid classifier on each image's mean colour is at chance: only the shape tells classes apart.
    colour = x.mean(axis=(2, 3))  # (N, 3)
    centroids = np.stack([colour[y == k].mean(axis=0) for k in range(4)])
    guess = np.argmin(((colour[:, None] - centroids[None]) ** 2).sum(axis=-1), axis=1)
    assert (guess == y).mean() < 0.25 + 0.05


# --- npz ------------------------------------------------------------------------------------------


def test_npz_channel_last_and_channel_first_load_the_same(tmp_path: Path) -> None:
    arrays = toy_arrays(shape=(6, 5, 3))
    last = write_npz(tmp_path, "last.npz", **arrays)
    first = write_npz(tmp_path, "first.npz", images=arrays["images"].transpose(0, 3, 1, 2), labels=arrays["labels"])
    data = load(last, tmp_path)
    assert data.info == describe(last, tmp_path) == describe(first, tmp_path) == InputInfo(3, 6, 5, 2)
    assert_same(data, load(first, tmp_path))
    assert data.x_train.shape[1:] == (3, 6, 5)


@pytest.mark.parametrize(
    ("images", "info"),
    [
        (np.zeros((30, 7, 9), np.uint8), InputInfo(1, 7, 9, 3)),
        (np.zeros((30, 7, 9, 1), np.float64), InputInfo(1, 7, 9, 3)),
        (np.zeros((30, 1, 7, 9), np.int16), InputInfo(1, 7, 9, 3)),
        (np.zeros((30, 3, 4, 3), np.float32), InputInfo(3, 3, 4, 3)),  # ambiguous: channel-last wins
    ],
)
def test_npz_layouts_and_dtypes(tmp_path: Path, images: np.ndarray, info: InputInfo) -> None:
    spec = write_npz(tmp_path, images=images, labels=np.arange(30, dtype=np.uint8) % 3)
    data = load(spec, tmp_path)
    assert describe(spec, tmp_path) == data.info == info
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.class_names == ["0", "1", "2"]


def test_npz_is_normalised_with_training_statistics_only(tmp_path: Path) -> None:
    # Image i is constant i: after loading, every image (train and val) must sit on the one affine map
    # raw -> (raw - train mean) / train std. Normalising val by its own statistics would break the line.
    n = 40
    images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None], (n, 4, 4)).copy()
    spec = write_npz(tmp_path, images=images, labels=np.arange(n) % 2)
    data = load(spec.model_copy(update={"val_fraction": 0.5}), tmp_path)
    assert np.isclose(data.x_train.mean(), 0, atol=1e-6) and np.isclose(data.x_train.std(), 1, atol=1e-5)
    values = np.sort(np.concatenate([data.x_train[:, 0, 0, 0], data.x_val[:, 0, 0, 0]]))
    slope, intercept = np.polyfit(np.arange(n), values, 1)
    assert np.allclose(values, slope * np.arange(n) + intercept, atol=1e-5)


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        (dict(images=np.zeros((10, 4, 4)), labels=np.arange(9) % 2), "'labels' has 9 entries but 'images' has 10"),
        (dict(images=np.zeros(10), labels=np.arange(10) % 2), "'images' has shape (10,)"),
        (dict(images=np.zeros((10, 4, 4, 2)), labels=np.arange(10) % 2), "with C = 1 or 3"),
        (dict(images=np.zeros((10, 1, 4, 4, 1)), labels=np.arange(10) % 2), "'images' has shape (10, 1, 4, 4, 1)"),
        (dict(images=np.zeros((0, 4, 4)), labels=np.arange(0)), "empty axis"),
        (dict(images=np.array([["a"] * 4] * 10), labels=np.arange(10) % 2), "expected numbers"),
        (dict(images=np.zeros((10, 4, 4)), labels=(np.arange(10) % 2).astype(float)), "expected integer class indices"),
        (dict(images=np.zeros((10, 4, 4)), labels=np.zeros((10, 1), int)), "one label per image"),
        (dict(images=np.zeros((10, 4, 4)), labels=np.arange(10) - 1), "labels must lie in [0, 10000), found -1..8"),
        (dict(images=np.zeros((10, 4, 4)), labels=np.full(10, 10**6)), "found 1000000..1000000"),
        (dict(images=np.zeros((10, 4, 4)), labels=np.full(10, 3)), "every label is 3; a classifier needs at least 2 classes"),
        (dict(images=np.zeros((10, 4, 4))), "the npz has no 'labels' array"),
        (dict(labels=np.arange(10) % 2), "the npz has no 'images' array"),
    ],
)
def test_malformed_npz_is_refused_naming_the_problem(tmp_path: Path, arrays: dict[str, Any], words: str) -> None:
    spec = write_npz(tmp_path, "team/bad.npz", **arrays)
    message = refusal(spec, tmp_path)
    assert message.startswith("team/bad.npz: ")
    assert words in message


def test_non_finite_images_are_refused_on_load(tmp_path: Path) -> None:
    images = np.zeros((10, 4, 4), np.float32)
    images[3, 1, 2] = np.nan
    spec = write_npz(tmp_path, images=images, labels=np.arange(10) % 2)
    assert describe(spec, tmp_path) == InputInfo(1, 4, 4, 2)  # cheap: does not read the pixels
    assert refusal(spec, tmp_path, cheap=False) == "set.npz: 'images' holds NaN or infinite values"


def test_too_few_samples_for_both_splits_is_refused(tmp_path: Path) -> None:
    spec = write_npz(tmp_path, images=np.zeros((2, 4, 4)), labels=np.array([0, 1]))
    message = refusal(spec, tmp_path, cheap=False)
    assert "2 samples leave 2 for training and 0 for validation" in message


def test_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    spec = write_npz(tmp_path, images=np.zeros((4, 4, 4)), labels=np.array([0, 1, "x", None], dtype=object))
    assert "'labels' is not a plain numeric array" in refusal(spec, tmp_path)


def test_missing_and_non_zip_files_are_refused(tmp_path: Path) -> None:
    assert refusal(npz_spec("nowhere/set.npz"), tmp_path) == "nowhere/set.npz: no such file under the data root"
    (tmp_path / "text.npz").write_text("not a zip")
    assert refusal(npz_spec("text.npz"), tmp_path) == "text.npz: not an npz (zip) file"


def test_symlinks_out_of_the_root_are_answered_as_missing(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    write_npz(outside, **toy_arrays())
    (root / "link.npz").symlink_to("../outside/set.npz")
    (root / "dir").symlink_to(outside, target_is_directory=True)
    (root / "inner.npz").symlink_to("dir/../root/../outside/set.npz")
    for path in ("link.npz", "dir/set.npz", "inner.npz"):
        assert refusal(npz_spec(path), root) == f"{path}: no such file under the data root"
    # The spec refuses these too; the resolver does not rely on it.
    assert DataRoot(root).find(str(outside / "set.npz")) is None
    assert DataRoot(root).find("../outside/set.npz") is None


def test_symlink_inside_the_root_is_followed(tmp_path: Path) -> None:
    write_npz(tmp_path, "real/set.npz", **toy_arrays())
    (tmp_path / "alias.npz").symlink_to("real/set.npz")
    assert_same(load(npz_spec("alias.npz"), tmp_path), load(npz_spec("real/set.npz"), tmp_path))


def test_file_data_without_a_root(tmp_path: Path) -> None:
    assert describe(npz_spec(), None) is None
    assert describe(DataSpec(name="folder", path="x"), None) is None
    assert "needs a data root" in refusal(npz_spec(), None, cheap=False)
    assert refusal(npz_spec(), tmp_path / "absent") == "the data root does not exist on this machine"


# --- folder ---------------------------------------------------------------------------------------


def write_image(path: Path, size: tuple[int, int], mode: str = "RGB", value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, 255 - value, 7)).save(path)


def test_folder_of_pngs_loads_with_one_class_per_subfolder(tmp_path: Path) -> None:
    base = tmp_path / "pets"
    for i in range(6):
        write_image(base / "cat" / f"{i}.png", (10, 12), value=10 * i)
        write_image(base / "dog" / f"{i}.png", (10, 12), value=200 - 10 * i)
    write_image(base / "dog" / "big.png", (20, 24))  # resized to the first image's 10x12
    write_image(base / "dog" / "grey.png", (10, 12), mode="L", value=99)  # converted to RGB
    (base / "dog" / "notes.txt").write_text("not an image: ignored")
    (base / "empty").mkdir()  # no images: not a class
    write_image(base / ".thumbs" / "0.png", (10, 12))  # hidden: not a class
    spec = DataSpec(name="folder", path="pets", val_fraction=0.25)

    data = load(spec, tmp_path)
    assert data.info == describe(spec, tmp_path) == InputInfo(3, 12, 10, 2)
    assert data.class_names == ["cat", "dog"]
    assert len(data.y_train) + len(data.y_val) == 14
    assert data.x_train.shape[1:] == (3, 12, 10)
    assert_same(data, load(spec, tmp_path))


def test_folder_of_grey_images_has_one_channel(tmp_path: Path) -> None:
    for k in range(3):
        for i in range(4):
            write_image(tmp_path / "grey" / f"c{k}" / f"{i}.png", (8, 8), mode="L", value=60 * k + i)
    spec = DataSpec(name="folder", path="grey")
    assert load(spec, tmp_path).info == describe(spec, tmp_path) == InputInfo(1, 8, 8, 3)


def test_unusable_folders_are_refused(tmp_path: Path) -> None:
    write_image(tmp_path / "one" / "only" / "0.png", (8, 8))
    assert "found 1 class sub-folder(s) with images" in refusal(DataSpec(name="folder", path="one"), tmp_path)
    assert refusal(DataSpec(name="folder", path="nope"), tmp_path) == "nope: no such folder under the data root"

    write_image(tmp_path / "bad" / "a" / "0.png", (8, 8))
    (tmp_path / "bad" / "b").mkdir()
    (tmp_path / "bad" / "b" / "0.png").write_bytes(b"not a png")
    assert refusal(DataSpec(name="folder", path="bad"), tmp_path, cheap=False) == "bad/b/0.png: not a readable image"

    outside = tmp_path / "outside.png"
    write_image(outside, (8, 8))
    write_image(tmp_path / "leaky" / "a" / "0.png", (8, 8))
    (tmp_path / "leaky" / "b").mkdir()
    (tmp_path / "leaky" / "b" / "0.png").symlink_to(outside)
    (tmp_path / "leaky" / "c").symlink_to(tmp_path / "bad", target_is_directory=True)
    # An image or class folder out of the root is not there: only class a is left, whatever b and c point at.
    root = tmp_path / "leaky"
    assert refusal(DataSpec(name="folder", path="."), root) == ".: found 1 class sub-folder(s) with images; a classifier needs at least 2"
    (tmp_path / "leaky" / "b" / "0.png").unlink()
    (tmp_path / "leaky" / "b" / "0.png").symlink_to(tmp_path / "gone.png")  # dangling: the same answer
    (tmp_path / "leaky" / "c").unlink()
    (tmp_path / "leaky" / "c").symlink_to(tmp_path / "gone", target_is_directory=True)
    assert refusal(DataSpec(name="folder", path="."), root) == ".: found 1 class sub-folder(s) with images; a classifier needs at least 2"


# --- a team's folder and the shared one (models.data.roots) ---------------------------------------


@pytest.fixture
def teams_root(tmp_path: Path) -> Path:
    """A data root with team-a's, team-b's and the shared folder, each holding a set of its own."""
    write_npz(tmp_path / "team-a", "own.npz", **toy_arrays(classes=2))
    write_npz(tmp_path / "team-b", "secret.npz", **toy_arrays(classes=3))
    write_npz(tmp_path / "shared", "common/set.npz", **toy_arrays(classes=4))
    for k in range(2):
        write_image(tmp_path / "team-b" / "pics" / f"c{k}" / "0.png", (8, 8))
    return tmp_path


def test_a_team_reads_its_own_folder_and_the_shared_one(teams_root: Path) -> None:
    team_a = DataRoot(teams_root, "team-a")
    assert describe(npz_spec("own.npz"), team_a) == load(npz_spec("own.npz"), team_a).info == InputInfo(1, 6, 5, 2)
    assert describe(npz_spec("shared/common/set.npz"), team_a) == InputInfo(1, 6, 5, 4)
    assert_same(load(npz_spec("shared/common/set.npz"), team_a), load(npz_spec("shared/common/set.npz"), DataRoot(teams_root, "team-b")))
    # Without teams (authentication off) a path is relative to the root itself, as it always was.
    assert describe(npz_spec("team-b/secret.npz"), teams_root) == describe(npz_spec("team-b/secret.npz"), DataRoot(teams_root)) == InputInfo(1, 6, 5, 3)
    assert describe(npz_spec("shared/common/set.npz"), teams_root) == InputInfo(1, 6, 5, 4)


@pytest.mark.parametrize("path", [
    "../team-b/secret.npz",  # the spec normalises '..' away; the resolver does not rely on it
    "team-b/secret.npz",  # under team-a's own folder: not there
    "shared/../team-b/secret.npz",
    "shared/../../team-b/secret.npz",
    "link.npz",  # a symlink to team-b's file
    "dir/secret.npz",  # through a symlinked folder
    "ghost.npz",  # a dangling symlink, to a file of team-b's that does not exist
    "{root}/team-b/secret.npz",  # absolute
])
def test_another_teams_file_is_answered_as_a_missing_one(teams_root: Path, path: str) -> None:
    (teams_root / "team-a" / "link.npz").symlink_to("../team-b/secret.npz")
    (teams_root / "team-a" / "dir").symlink_to(teams_root / "team-b", target_is_directory=True)
    (teams_root / "team-a" / "ghost.npz").symlink_to("../team-b/none.npz")
    path = path.format(root=teams_root)
    team_a = DataRoot(teams_root, "team-a")
    assert team_a.find(path) is None or not team_a.find(path).exists()
    missing = refusal(npz_spec("nowhere.npz"), team_a)
    spec = DataSpec.model_construct(name="npz", path=path, val_fraction=0.2, seed=0)  # unchecked, as a spec cannot be
    assert refusal(spec, team_a, names_root=path.startswith("/")) == missing.replace("nowhere.npz", path)


def test_another_teams_folder_is_answered_as_a_missing_one(teams_root: Path) -> None:
    (teams_root / "team-a" / "pics").symlink_to(teams_root / "team-b" / "pics", target_is_directory=True)
    team_a = DataRoot(teams_root, "team-a")
    assert describe(DataSpec(name="folder", path="pics"), DataRoot(teams_root, "team-b")) == InputInfo(3, 8, 8, 2)
    for path in ("pics", "nothing", "shared/../team-b/pics"):
        spec = DataSpec.model_construct(name="folder", path=path, val_fraction=0.2, seed=0)
        assert refusal(spec, team_a) == f"{path}: no such folder under the data root"


def test_a_team_without_a_folder_finds_nothing_but_the_shared_one(teams_root: Path) -> None:
    team_c = DataRoot(teams_root, "team-c")
    assert refusal(npz_spec("own.npz"), team_c) == "own.npz: no such file under the data root"
    assert describe(npz_spec("shared/common/set.npz"), team_c) == InputInfo(1, 6, 5, 4)
    for reserved in (".", ".."):  # refused where tokens are configured; a run tagged so by hand reads nothing
        assert refusal(npz_spec("team-a/own.npz"), DataRoot(teams_root, reserved)) == "team-a/own.npz: no such file under the data root"
    assert refusal(npz_spec("own.npz"), DataRoot(teams_root / "absent", "team-a")) == "the data root does not exist on this machine"


def test_damaged_npz_files_are_invalid_data(tmp_path: Path) -> None:
    arrays = toy_arrays()
    write_npz(tmp_path, "flipped.npz", **arrays)  # stored, not deflated: a flipped byte fails the CRC
    raw = bytearray((tmp_path / "flipped.npz").read_bytes())
    start = raw.index(arrays["labels"].tobytes()[:16])
    raw[start + 3] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(raw))
    assert refusal(npz_spec("flipped.npz"), tmp_path) == "flipped.npz: 'labels' cannot be read: the file is damaged or unreadable"

    np.savez_compressed(tmp_path / "deflated.npz", **arrays)
    raw = bytearray((tmp_path / "deflated.npz").read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(64)
    (tmp_path / "deflated.npz").write_bytes(bytes(raw))
    assert refusal(npz_spec("deflated.npz"), tmp_path, cheap=False) == "deflated.npz: 'images' cannot be read: the file is damaged or unreadable"

    (tmp_path / "cut.npz").write_bytes((tmp_path / "flipped.npz").read_bytes()[:100])
    assert refusal(npz_spec("cut.npz"), tmp_path) == "cut.npz: not an npz (zip) file"


def test_an_unreadable_file_or_folder_is_invalid_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import zipfile

    write_npz(tmp_path, **toy_arrays())
    write_image(tmp_path / "pics" / "a" / "0.png", (8, 8))
    write_image(tmp_path / "pics" / "b" / "0.png", (8, 8))

    def denied(self: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "set.npz"))

    with monkeypatch.context() as patched:  # root reads every file: a chmod would not stop this test's user
        patched.setattr(zipfile.ZipFile, "__init__", denied)
        assert refusal(npz_spec(), tmp_path) == "set.npz: the file cannot be read (Permission denied)"
    with monkeypatch.context() as patched:
        patched.setattr(Path, "iterdir", lambda self: denied(self))
        assert refusal(DataSpec(name="folder", path="pics"), tmp_path) == "pics: the folder cannot be read (Permission denied)"
    if os.geteuid() != 0:
        (tmp_path / "set.npz").chmod(0)
        assert refusal(npz_spec(), tmp_path) == "set.npz: the file cannot be read (Permission denied)"
