"""The exporter's served model: raw images in, the net's own answers out, loaded by MLflow's pyfunc without convtune's code."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models.data.sets import RawInput, _split
from models.nets.convnet import build_model
from models.spec.plan import InputInfo
from models.spec.trial import TrialSpec
from workers.training.data import device_data
from workers.training.train import ServedInputs
from workers.trial.export import SERVED_MODEL_CODE, ModelExporter, input_contract
from workers.trial.tracking import _Predictor, pip_requirements


def _export(tmp_path: Path, spec: TrialSpec, info: InputInfo, served: ServedInputs) -> tuple[torch.nn.Module, object]:
    import mlflow.pyfunc

    torch.manual_seed(0)
    net = build_model(spec.model, info).eval()
    example = torch.zeros(2, info.channels, info.height, info.width)
    ModelExporter().save(_Predictor(net).eval(), example, tmp_path / "model", "run0", pip_requirements(), input_contract(served), "m-0")
    return net, mlflow.pyfunc.load_model(str(tmp_path / "model"))


def test_digits_model_takes_raw_pixels_and_answers_what_the_net_does_on_normalised_ones(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    spec = TrialSpec.model_validate({"model": {"channels": [8, 16], "convs_per_stage": 1}, "data": {"name": "digits"}})
    data = device_data(spec.data, None, torch.device("cpu"))
    assert data.raw is not None and data.raw.layout == "NHW" and data.raw.dtype == "float64"
    net, model = _export(tmp_path, spec, data.info, ServedInputs(data.info, data.raw, data.class_names, spec.model.head))

    digits = load_digits()
    _, val = _split(digits.target, spec.data.val_fraction, np.random.default_rng(spec.data.seed), "digits")
    raw = digits.images[val]  # (N, 8, 8) float64, 0..16: the validation images before the loader scaled and normalised them
    answer = model.predict(raw)
    with torch.no_grad():
        expected = torch.softmax(net(data.x_val), dim=1).numpy()  # what training evaluated
    assert answer["class_index"].tolist() == expected.argmax(axis=1).tolist()
    assert np.stack(answer["probabilities"].to_numpy()) == pytest.approx(expected, abs=1e-5)
    assert answer["label"].tolist() == [data.class_names[i] for i in expected.argmax(axis=1)]
    assert model.metadata.metadata["convtune"]["class_names"] == [str(d) for d in range(10)]
    assert not (tmp_path / "model" / "input_example.json").exists()

    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="dtype"):  # the signature holds the contract: float64, as load_digits gives
        model.predict(raw.astype(np.float32))


def test_channel_last_uint8_images_and_a_sigmoid_head(tmp_path: Path) -> None:
    spec = TrialSpec.model_validate({"model": {"channels": [4], "convs_per_stage": 1, "head": "sigmoid"}, "data": {"name": "shapes", "image_size": 12}})
    info = InputInfo(channels=3, height=12, width=12, num_classes=4)
    raw_input = replace(RawInput("uint8", "NHWC", "0 to 255", scale=255.0), mean=(100.0, 120.0, 140.0), std=(50.0, 60.0, 70.0))
    net, model = _export(tmp_path, spec, info, ServedInputs(info, raw_input, ["a", "b", "c", "d"], "sigmoid"))

    raw = np.random.default_rng(0).integers(0, 256, size=(5, 12, 12, 3), dtype=np.uint8)
    answer = model.predict(raw)
    x = torch.from_numpy(raw).float().permute(0, 3, 1, 2)
    x = (x - torch.tensor([100.0, 120.0, 140.0])[None, :, None, None]) / torch.tensor([50.0, 60.0, 70.0])[None, :, None, None]
    with torch.no_grad():
        expected = torch.sigmoid(net(x)).numpy()  # a sigmoid head's outputs are the probabilities, not softmaxed
    assert np.stack(answer["probabilities"].to_numpy()) == pytest.approx(expected, abs=1e-5)
    assert answer["label"].tolist() == [["a", "b", "c", "d"][i] for i in expected.argmax(axis=1)]


def test_the_served_code_imports_no_convtune() -> None:
    tree = ast.parse(SERVED_MODEL_CODE.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "json", "pathlib", "mlflow", "numpy", "pandas", "torch"}, imported
