"""torch.export's pt2 archive: rewriting a saved program's weights without serialising its graph again.

``torch.export.save`` serialises the graph and the weights together. For a study's trials the graph
repeats and only the weights change, so ``workers.trial.export`` keeps every record of the archive
but the weights and writes the weights anew. That leans on ``torch.export.pt2_archive._package``:

- ``PT2ArchiveReader``/``PT2ArchiveWriter`` (``get_file_names``, ``read_bytes``, ``has_record``, ``write_bytes``);
- the weights live under ``WEIGHTS_DIR`` (and ``.data/``), described by the record
  ``WEIGHTS_CONFIG_FILENAME_FORMAT.format(<model name>)``; ``torch.export.save`` names its model ``model``;
- ``_package_state_dict(name, program, writer)`` writes a program's weights and returns their
  config, which ``_package_payload_config(writer, config, file)`` writes.

Checked on torch 2.13.0 (``tests/compat/test_torch_export.py``). Imports torch: only the
workers import this module (the API never loads torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.compat._base import CompatError

__all__ = ["read_records_without_weights", "write_program"]

MODEL_NAME = "model"  # the name torch.export.save gives the one program it writes
_LIBRARY = "torch"


def _package() -> Any:
    """torch's pt2 archive module, with every name this module uses."""
    try:
        from torch.export.pt2_archive import _package as pt2
    except ImportError as exc:
        raise CompatError(_LIBRARY, "torch.export.pt2_archive._package exists", __name__, str(exc)) from exc
    names = (
        "PT2ArchiveReader", "PT2ArchiveWriter", "WEIGHTS_DIR", "WEIGHTS_CONFIG_FILENAME_FORMAT",
        "_package_state_dict", "_package_payload_config",
    )
    missing = [name for name in names if not hasattr(pt2, name)]
    if missing:
        raise CompatError(_LIBRARY, "torch.export.pt2_archive._package keeps its archive reader, writer and weight packaging", __name__,
                          f"missing {', '.join(missing)}")
    return pt2


def read_records_without_weights(program_file: Path) -> dict[str, bytes]:
    """Every record of a program ``torch.export.save`` wrote to ``program_file`` but its weights.

    Raises CompatError when the archive is not laid out as assumed (no weights config record).
    """
    pt2 = _package()
    with pt2.PT2ArchiveReader(str(program_file)) as reader:
        names = reader.get_file_names()
        records = {n: reader.read_bytes(n) for n in names if not n.startswith((pt2.WEIGHTS_DIR, ".data/"))}
    config = pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME)
    if config not in names:
        raise CompatError(_LIBRARY, f"torch.export.save describes a program's weights in the record {config}", __name__,
                          f"{program_file.name} has no such record")
    return records


def write_program(program: torch.export.ExportedProgram, program_file: Path, records: dict[str, bytes]) -> None:
    """Write what ``torch.export.save(program, program_file)`` writes: ``program``'s weights anew, every other record from ``records``."""
    pt2 = _package()
    with pt2.PT2ArchiveWriter(str(program_file)) as writer:
        config = pt2._package_state_dict(MODEL_NAME, program, writer)
        pt2._package_payload_config(writer, config, pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME))
        for name, data in records.items():
            if not writer.has_record(name):
                writer.write_bytes(name, data)
