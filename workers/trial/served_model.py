"""A trial's model as it is served: raw images in, class probabilities and labels out (MLflow models-from-code).

This file is copied into every logged model (``python_model.py``) and run by ``mlflow.pyfunc.load_model``
and ``mlflow models serve`` wherever the model is loaded, so it imports only torch, numpy, pandas and
mlflow, never convtune: the process that serves a model need not have convtune installed. convtune
itself never imports it (it only names its path, :data:`workers.trial.export.SERVED_MODEL_CODE`).

The model directory holds, besides this file:

- ``data/model.pt2``: the trained net exported with ``torch.export`` (normalised (N, C, H, W) float32 in,
  one row of outputs per image: logits, or probabilities for a sigmoid head), the same program
  ``mlflow.pytorch.load_model`` loads;
- ``artifacts/inputs.json`` (the artifact ``inputs``): the input contract, the same as the MLmodel's
  metadata ``convtune``: the raw images' ``layout`` ("NCHW", "NHWC" or "NHW"), ``dtype``, ``shape``
  (one image, without the batch axis), ``pixels`` (their range, in words), the training split's
  per-channel ``mean`` and ``std`` in raw pixel units, ``class_names``, and ``head``.

``predict`` takes a batch of raw images as the data set's source holds them (what the signature says:
MLflow checks the dtype and shape before this code runs), normalises them as training did, runs the net in
chunks and answers a DataFrame, one row per image: ``label`` (the most probable class's name), ``class_index``
and ``probabilities`` (one per class, in ``class_names``' order: a softmax of the logits, or the
sigmoid outputs of a sigmoid head, which need not sum to one).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import set_model

CHUNK = 1024  # images per forward pass: bounds the memory a large request takes
PROGRAM = Path("data") / "model.pt2"


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The exported net behind the raw-image contract of ``inputs.json``."""

    def load_context(self, context):
        inputs = Path(context.artifacts["inputs"])
        self.contract = json.loads(inputs.read_text(encoding="utf-8"))
        # artifacts/inputs.json and data/model.pt2 sit in the same model directory
        self.net = torch.export.load(str(inputs.parent.parent / PROGRAM)).module()
        channels = len(self.contract["mean"])
        self.mean = torch.tensor(self.contract["mean"], dtype=torch.float32).reshape(1, channels, 1, 1)
        self.std = torch.tensor(self.contract["std"], dtype=torch.float32).reshape(1, channels, 1, 1)

    def predict(self, context, model_input, params=None):
        images = np.asarray(model_input)
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        layout = self.contract["layout"]
        if layout == "NHW":
            x = x[:, None]  # (N, 1, H, W)
        elif layout == "NHWC":
            x = x.permute(0, 3, 1, 2)  # (N, C, H, W)
        x = (x - self.mean) / self.std
        with torch.no_grad():
            outputs = [self.net(x[i:i + CHUNK].contiguous()) for i in range(0, len(x), CHUNK)]
        scores = torch.cat(outputs) if outputs else torch.zeros((0, len(self.contract["class_names"])))
        probabilities = scores if self.contract["head"] == "sigmoid" else torch.softmax(scores, dim=1)  # (N, K)
        probabilities = probabilities.double().numpy()
        index = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, dtype=np.int64)
        names = np.asarray(self.contract["class_names"], dtype=object)
        return pd.DataFrame({"label": names[index], "class_index": index.astype(np.int64), "probabilities": list(probabilities)})


set_model(ImageClassifier())
