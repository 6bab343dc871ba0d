"""The pt2 archive internals models.compat.torch_export relies on, against the installed torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from models.compat import CompatError, torch_export


def _program(weight: float) -> torch.export.ExportedProgram:
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.fill_(weight)
        net.bias.zero_()
    return torch.export.export(net.eval(), (torch.ones(1, 3),))


def test_a_program_with_its_weights_rewritten_loads_back_with_torch_export_load(tmp_path: Path):
    saved = tmp_path / "saved.pt2"
    torch.export.save(_program(1.0), saved)
    records = torch_export.read_records_without_weights(saved)
    assert records and not any(name.startswith("data/weights/") for name in records)

    rewritten = tmp_path / "rewritten.pt2"
    torch_export.write_program(_program(2.0), rewritten, records)  # same graph, other weights
    loaded = torch.export.load(rewritten)
    assert torch.allclose(loaded.module()(torch.ones(1, 3)), torch.full((1, 2), 6.0))


def test_an_archive_module_without_its_weight_packaging_is_named_in_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from torch.export.pt2_archive import _package

    saved = tmp_path / "saved.pt2"
    torch.export.save(_program(1.0), saved)
    monkeypatch.delattr(_package, "_package_state_dict")
    with pytest.raises(CompatError, match=r"torch .* models\.compat\.torch_export .*missing _package_state_dict"):
        torch_export.write_program(_program(2.0), tmp_path / "rewritten.pt2", {})


def test_an_archive_without_the_weights_config_record_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from torch.export.pt2_archive import _package

    saved = tmp_path / "saved.pt2"
    torch.export.save(_program(1.0), saved)
    monkeypatch.setattr(_package, "WEIGHTS_CONFIG_FILENAME_FORMAT", "data/weights/{}_renamed.json")
    with pytest.raises(CompatError, match="describes a program's weights"):
        torch_export.read_records_without_weights(saved)
