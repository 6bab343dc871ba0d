"""A data set's fingerprint: one hash that says which images a run trained on, for its provenance.

File data (``npz``, ``folder``) is fingerprinted by its bytes: the npz file, or every file under the
folder with its path relative to it (so a renamed class or a changed image changes it). Hashing reads
the files once per process: a result is kept by path, modification time and size, so the next trial
on the same unchanged file pays a ``stat``. Built-in sets have no files; their fingerprint is that of
what makes their images: the name, and for ``shapes`` the seed, sample count, image size and class
count. The split (``val_fraction``, the split seed) is not part of it: it is in the run's params.

A file that cannot be found or read gives ``unknown``: loading the data says what is wrong, with
its own error; provenance never fails a trial.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from models.data.roots import DataRoot, InvalidData
from models.spec.trial import DataSpec

__all__ = ["UNKNOWN", "fingerprint"]

UNKNOWN = "unknown"
_CHUNK = 1 << 20
# (path, mtime_ns, size) -> the file's digest; bounded so a worker reading many folders does not grow for ever.
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}
_FILES_KEPT = 100_000


def fingerprint(spec: DataSpec, root: DataRoot | Path | None) -> str:
    """``sha256:<hex>`` of the data ``spec`` names (``root``: the data root as the spec's team sees it), or ``unknown``."""
    if spec.name == "digits":
        return _of_document({"name": "digits", "source": "sklearn.datasets.load_digits"})
    if spec.name == "shapes":
        return _of_document({
            "name": "shapes", "seed": spec.seed, "num_samples": spec.num_samples, "image_size": spec.image_size, "num_classes": spec.num_classes,
        })
    if root is None or spec.path is None:
        return UNKNOWN
    try:
        path = (root if isinstance(root, DataRoot) else DataRoot(root)).find(spec.path)
        if path is None:
            return UNKNOWN
        if spec.name == "npz":
            return "sha256:" + _file_digest(path) if path.is_file() else UNKNOWN
        return _folder_digest(path) if path.is_dir() else UNKNOWN
    except (OSError, InvalidData):  # the data root itself is missing, or a file went unreadable
        return UNKNOWN


def _of_document(document: dict[str, object]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    """The sha256 of one file's bytes, read once per process while its modification time and size stay."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    digest = _FILE_DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        if len(_FILE_DIGESTS) >= _FILES_KEPT:
            _FILE_DIGESTS.clear()
        _FILE_DIGESTS[key] = digest
    return digest


def _folder_digest(folder: Path) -> str:
    """One hash over every visible file under ``folder``: its relative path and its bytes' digest, in sorted order."""
    h = hashlib.sha256()
    files = []
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]  # what the loader skips, the fingerprint skips
        files += [Path(directory) / n for n in names if not n.startswith(".")]
    for file in sorted(files, key=lambda p: p.relative_to(folder).as_posix()):
        h.update(f"{file.relative_to(folder).as_posix()}\0{_file_digest(file)}\n".encode())
    return "sha256:" + h.hexdigest()
