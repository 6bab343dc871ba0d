"""A trained net as an MLflow model (pytorch pt2, served on raw images), each architecture exported once per worker process.

``mlflow.pytorch.log_model`` was the largest cost of a small trial outside its epochs
(docs/performance.md, "Per-trial work outside the epoch"): it traces the net with ``torch.export``,
then loads the result back to check that its input example serves, then makes some twenty
requests. For a study's trials most of that is the
same work again: the architecture (and so the exported graph) repeats, only the weights change.

So the first trial of an architecture is saved by ``mlflow.pytorch.save_model`` into a template
directory kept for the process (MLmodel with its signature, environment files, input example, and
``data/model.pt2``), and its exported program is loaded once. Every trial of that architecture then
copies the template, writes its own weights into the program, checks the program computes what the
net does on the example, writes the archive with the graph serialised once per architecture and only
the weights new, and gives the MLmodel its own run id, uuid and time. The result is the same directory
``save_model`` writes: ``mlflow.pytorch.load_model("runs:/<id>/model")`` and the model registry
read it as before. A program whose tensors do not match the net's state (a net with state outside
its ``state_dict``), or that computes something else than the net on the example, is exported afresh.

The example the template is exported with is never a sample of the data: anyone who may read the
run would read a team's images. It is a fixed tensor of the samples' shape and dtype
(:func:`placeholder_input`), and it is not kept in a served model.

Served (``save(..., served=...)``, every trial's model): the same directory also answers
``mlflow.pyfunc.load_model`` and ``mlflow models serve`` on raw images. Its ``python_function`` flavor is
:mod:`workers.trial.served_model` as MLflow models-from-code (the file is copied in, and it imports no
convtune), with ``artifacts/inputs.json``: the input contract (:func:`input_contract`: the raw images'
layout, dtype and shape, the training split's statistics in raw pixel units, the class names, the head),
also the MLmodel's ``metadata["convtune"]``, and a signature of raw images in, label, class index and
probabilities out. That flavor's configuration and environment files come from one
``mlflow.pyfunc.save_model`` per process (a few hundred milliseconds once); each trial writes only its
contract and its MLmodel. The ``pytorch`` flavor stays: ``mlflow.pytorch.load_model`` gives the bare net,
which takes normalised (N, C, H, W) float32.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import tempfile
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.compat import CompatError, torch_export
from workers.training.train import ServedInputs

__all__ = ["SERVED_MODEL_CODE", "ModelExporter", "exporter", "input_contract", "placeholder_input"]

log = logging.getLogger(__name__)
MAX_TEMPLATES = 8
PROGRAM = Path("data") / "model.pt2"
INPUTS = Path("artifacts") / "inputs.json"
SERVED_MODEL_CODE = Path(__file__).with_name("served_model.py")  # copied into each model, never imported here
CONTRACT_FORMAT = "convtune.image_classifier/1"
_EXAMPLES = ("input_example.json", "serving_input_example.json")  # the template's normalised placeholder: not a raw image


@dataclass
class _Template:
    """One architecture's saved model directory, its exported program, and the program's archive minus its weights."""

    directory: Path
    program: torch.export.ExportedProgram
    module: nn.Module  # the program as a module, to check it against each trial's net
    archive: dict[str, bytes] | None  # every record of data/model.pt2 but the weights (None: write it with torch.export.save)


class ModelExporter:
    """Saves MLflow pytorch model directories, reusing each architecture's exported program."""

    def __init__(self, max_templates: int = MAX_TEMPLATES):
        self.max_templates = max_templates
        self._templates: OrderedDict[str, _Template] = OrderedDict()
        self._home: Path | None = None
        self._served: tuple[str, dict] | None = None  # the served flavor's configuration, and the requirements it was made with

    def save(
        self, model: nn.Module, example: torch.Tensor, path: Path, run_id: str, pip_requirements: list[str], served: dict | None = None,
        model_id: str | None = None,
    ) -> None:
        """Write ``model`` (eval mode, on the CPU) as an MLflow model at ``path``; ``example``: a batch of inputs, of which
        only the shape and dtype are kept (:func:`placeholder_input`); ``served``: the input contract
        (:func:`input_contract`) that makes it a raw-image classifier for ``mlflow.pyfunc`` (None: the bare net's flavors only);
        ``model_id``: the MLflow logged model it is written for."""
        example = placeholder_input(example)
        key = _architecture_key(model, example)
        template = self._templates.get(key)
        if template is None:
            template = self._template(key, model, example, pip_requirements)
        else:
            self._templates.move_to_end(key)
        if not (_load_weights(template, model) and _agrees(template, model, example)):
            log.info("the exported program does not match the net; exporting it afresh")
            self._templates.pop(key, None)
            template = self._template(key, model, example, pip_requirements)
            _load_weights(template, model)
        shutil.copytree(template.directory, path)
        _write_program(template, path / PROGRAM)
        pyfunc = None
        if served is not None:
            pyfunc = self._served_flavor(pip_requirements)
            _add_served(path, self._home / _SERVED, served)  # type: ignore[operator]
        _stamp(path, run_id, served, pyfunc, model_id)

    def _served_flavor(self, pip_requirements: list[str]) -> dict:
        """The ``python_function`` flavor of a served model, and its files in the home's served directory (made once per process)."""
        from mlflow.models import Model

        if self._home is None:
            self._home = Path(tempfile.mkdtemp(prefix="convtune-export-"))
        key = json.dumps(pip_requirements)
        if self._served is None or self._served[0] != key:
            import mlflow.pyfunc

            directory = self._home / _SERVED
            shutil.rmtree(directory, ignore_errors=True)
            placeholder = self._home / "inputs.json"
            placeholder.write_text("{}", encoding="utf-8")
            mlflow.pyfunc.save_model(
                directory, python_model=str(SERVED_MODEL_CODE), artifacts={"inputs": str(placeholder)},
                pip_requirements=[*pip_requirements, *_served_requirements()],
            )
            self._served = (key, Model.load(directory / "MLmodel").flavors["python_function"])
        return copy.deepcopy(self._served[1])

    def _template(self, key: str, model: nn.Module, example: torch.Tensor, pip_requirements: list[str]) -> _Template:
        import mlflow.pytorch
        from mlflow.models import infer_signature

        if self._home is None:
            self._home = Path(tempfile.mkdtemp(prefix="convtune-export-"))
        directory = self._home / key
        shutil.rmtree(directory, ignore_errors=True)
        x = example.detach().cpu()
        with torch.no_grad():
            y = model(x)
        mlflow.pytorch.save_model(
            model, directory, serialization_format="pt2", signature=infer_signature(x.numpy(), y.numpy()),
            input_example=x.numpy(), pip_requirements=pip_requirements,
        )
        program = torch.export.load(directory / PROGRAM)
        template = _Template(directory, program, program.module(), _archive_without_weights(directory / PROGRAM))
        self._templates[key] = template
        while len(self._templates) > self.max_templates:
            old, _ = self._templates.popitem(last=False)
            shutil.rmtree(self._home / old, ignore_errors=True)
        return template


_SERVED = "served"  # the home's folder holding the served flavor's files


def input_contract(served: ServedInputs) -> dict:
    """What the served model takes and answers, as JSON: raw images (layout, dtype, one image's shape, the pixels' range),
    the training split's per-channel statistics in raw pixel units, the class names, the head."""
    info, raw = served.info, served.raw
    if raw is None:  # a data set that does not describe its raw images: the model takes the normalised ones
        layout, dtype, pixels = "NCHW", "float32", "normalised already (zero mean, unit variance per channel)"
        mean, std, shape = [0.0] * info.channels, [1.0] * info.channels, [info.channels, info.height, info.width]
    else:
        layout, dtype, pixels, mean, std, shape = raw.layout, raw.dtype, raw.pixels, list(raw.mean), list(raw.std), list(raw.shape(info))
    return {
        "format": CONTRACT_FORMAT, "layout": layout, "dtype": dtype, "shape": shape, "pixels": pixels,
        "mean": mean, "std": std, "class_names": list(served.class_names), "head": served.head,
    }


def _served_requirements() -> list[str]:
    """What the served model's code imports besides torch and numpy (mlflow is added by MLflow itself)."""
    import pandas

    return [f"pandas=={pandas.__version__}"]


def _add_served(path: Path, served_home: Path, contract: dict) -> None:
    """Give the copied model directory the served flavor's files and this trial's contract."""
    for name in ("requirements.txt", "python_env.yaml", "conda.yaml", SERVED_MODEL_CODE.name):
        shutil.copyfile(served_home / name, path / name)
    for name in _EXAMPLES:
        (path / name).unlink(missing_ok=True)
    (path / INPUTS).parent.mkdir(parents=True, exist_ok=True)
    (path / INPUTS).write_text(json.dumps(contract, indent=2), encoding="utf-8")


def _signature(contract: dict) -> Any:
    """Raw images in (their dtype and shape, any batch), one row per image out: label, class index, probabilities."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema, TensorSpec

    return ModelSignature(
        Schema([TensorSpec(np.dtype(contract["dtype"]), (-1, *contract["shape"]))]),
        Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.long, "class_index"), ColSpec(Array(DataType.double), "probabilities")]),
    )


def placeholder_input(example: torch.Tensor) -> torch.Tensor:
    """A fixed input of ``example``'s shape and dtype, on the CPU: standard normal draws of seed 0, as normalised
    images are distributed. The model's saved example and its export checks see this, never the data's samples."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(tuple(example.shape), generator=generator).to(example.dtype)


def _architecture_key(model: nn.Module, example: torch.Tensor) -> str:
    """What the exported graph depends on: the modules, the state's names, shapes and dtypes, and the example."""
    digest = hashlib.sha256(repr(model).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    x = example.detach().cpu().contiguous()
    digest.update(f"{tuple(x.shape)}:{x.dtype}".encode())
    digest.update(x.numpy().tobytes())  # the saved input example
    return digest.hexdigest()[:32]


@torch.no_grad()
def _load_weights(template: _Template, model: nn.Module) -> bool:
    """Copy ``model``'s state into the template's program and module; False when their tensors do not correspond one to one."""
    state = model.state_dict()
    target = template.program.state_dict
    if set(target) != set(state) or any(isinstance(v, torch.Tensor) for v in template.program.constants.values()):
        return False
    for name, tensor in state.items():
        if target[name].shape != tensor.shape or target[name].dtype != tensor.dtype:
            return False
        target[name].copy_(tensor.detach())
    try:
        template.module.load_state_dict(state)
    except RuntimeError:
        return False
    return True


@torch.no_grad()
def _agrees(template: _Template, model: nn.Module, example: torch.Tensor) -> bool:
    """Whether the program, with ``model``'s weights, computes what ``model`` does on ``example`` (state outside the key would show here)."""
    x = example.detach().cpu()
    return bool(torch.allclose(template.module(x), model(x), rtol=1e-4, atol=1e-5))


def _archive_without_weights(program_file: Path) -> dict[str, bytes] | None:
    """The records of a saved program that do not depend on its weights; None if this torch's archive layout is not the one
    :mod:`models.compat.torch_export` knows (every trial is then saved with ``torch.export.save``)."""
    try:
        return torch_export.read_records_without_weights(program_file)
    except CompatError as exc:  # a torch upgrade: slower, still correct
        log.warning("models are saved with torch.export.save: %s", exc)
        return None
    except (RuntimeError, AssertionError) as exc:
        log.info("models are saved with torch.export.save: %s", exc)
        return None


def _write_program(template: _Template, program_file: Path) -> None:
    """What ``torch.export.save(template.program, ...)`` writes, with the graph serialised once per architecture.

    Serialising the graph is most of ``torch.export.save``'s time (tens to a hundred milliseconds),
    and it is the same for every trial of an architecture: only the weights records are written
    anew (torch's own writer and weight packaging), the other records are the template's.
    """
    if template.archive is None:
        torch.export.save(template.program, program_file)
        return
    torch_export.write_program(template.program, program_file, template.archive)


def _stamp(path: Path, run_id: str, contract: dict | None = None, pyfunc: dict | None = None, model_id: str | None = None) -> None:
    """Make the copied MLmodel this run's: its run id, a new uuid, the time it was created, the logged model it is;
    served, its pyfunc flavor, signature and metadata."""
    from mlflow.models import Model

    model = Model.load(path / "MLmodel")
    model.run_id = run_id
    model.model_uuid = uuid.uuid4().hex
    model.utc_time_created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
    if model_id is not None:
        model.model_id = model_id
    if contract is not None and pyfunc is not None:
        model.flavors["python_function"] = pyfunc
        model.signature = _signature(contract)
        model.metadata = {"convtune": contract}
        model.saved_input_example_info = None
    model.save(path / "MLmodel")


_exporter: ModelExporter | None = None


def exporter() -> ModelExporter:
    """This process's exporter."""
    global _exporter
    if _exporter is None:
        _exporter = ModelExporter()
    return _exporter
