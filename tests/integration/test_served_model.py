"""A study's best model, registered by alias, serves raw images where convtune is not installed.

The study trains tiny digits nets through the session's worker; its ``register_as`` registers the
best trial's logged model. One test loads ``models:/<name>@candidate`` in a Python that cannot import
convtune (``python -I -S``: no PYTHONPATH, no ``.pth`` files, so not convtune's editable install;
only the interpreter's site-packages on its path) and checks that the model, given scikit-learn's raw
digits (pixels 0 to 16), scores the validation accuracy the trial reported. The other serves the
trial's model with ``mlflow models serve`` and asks it over HTTP.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
import pytest

from models.data.sets import _split
from models.spec.trial import TrialSpec
from service.api import create_app
from tests.conftest import Service, free_port, wait_for
from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration

TRIAL = tiny_trial(optim={"epochs": 3, "lr": 5e-3})

# Run as ``python -I -S`` in an empty folder: site-packages given by the parent, without their .pth files.
ISOLATED = r"""
import json, sys
sys.path.extend(json.loads(sys.argv[1]))
for name in ("models", "workers", "service"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"convtune's {name!r} is importable here")
import numpy as np
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[2])
images, labels = np.load(sys.argv[3]), np.load(sys.argv[4])
answer = model.predict(images)
probabilities = np.stack(answer["probabilities"].to_numpy())
print(json.dumps({
    "accuracy": float((answer["class_index"].to_numpy() == labels).mean()),
    "labels_match": bool((answer["label"].to_numpy() == np.asarray([str(i) for i in answer["class_index"]])).all()),
    "probability_sums": [float(probabilities.sum(axis=1).min()), float(probabilities.sum(axis=1).max())],
    "metadata": model.metadata.metadata["convtune"],
}))
"""


@pytest.fixture(scope="module")
def studies(api_settings, worker_env):
    return create_app(api_settings.model_copy(update={"study_storage": worker_env["CONVTUNE_STUDY_STORAGE"]})).test_client()


@pytest.fixture(scope="module")
def raw_validation() -> tuple[np.ndarray, np.ndarray]:
    """The trials' validation split of scikit-learn's digits, raw (N, 8, 8) float64 pixels 0 to 16, as the data set holds them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = TrialSpec.model_validate(TRIAL).data
    _, val = _split(digits.target.astype(np.int64), data.val_fraction, np.random.default_rng(data.seed), "digits")
    return digits.images[val], digits.target[val]


@pytest.fixture(scope="module")
def registered(studies, worker, mlflow_client) -> dict[str, Any]:
    """A two-trial study registered as a fresh name; its answer, the best trial's run and the name."""
    name = f"served-digits-{os.getpid()}-{int(time.time())}"
    body = {
        "base": TRIAL, "search_space": {"model.activation": ["relu", "gelu"]}, "sampler": "grid", "n_trials": None,
        "parallelism": 1, "register_as": name,
    }
    response = studies.post("/studies", json=body)
    assert response.status_code == 202, response.get_json()
    study_id = response.get_json()["id"]
    deadline = time.monotonic() + 240
    while True:
        study = studies.get(f"/studies/{study_id}").get_json()
        if study["state"] in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, f"study {study_id} stuck: {study['state']} {study['counts']}"
        time.sleep(0.5)
    assert study["state"] == "succeeded", study["reason"]
    assert study["registered_model"] and study["registered_model"]["name"] == name, study
    return {"study": study, "run": mlflow_client.get_run(study["best"]["trial_id"]), "name": name}


def test_the_answers_name_the_logged_model_and_mlflow_links_it_to_the_run(studies, registered, mlflow_client):
    from mlflow.entities import LoggedModelStatus

    study, run = registered["study"], registered["run"]
    trial = studies.get(f"/trials/{run.info.run_id}").get_json()
    assert trial["model_uri"] and trial["model_uri"].startswith("models:/"), trial
    assert study["best"]["model_uri"] == trial["model_uri"]
    model = mlflow_client.get_logged_model(trial["model_uri"].removeprefix("models:/"))
    assert model.source_run_id == run.info.run_id and model.name == "model" and model.status == LoggedModelStatus.READY
    assert [o.model_id for o in mlflow_client.get_run(run.info.run_id).outputs.model_outputs] == [model.model_id]  # the UI's Models column
    version = mlflow_client.get_model_version_by_alias(registered["name"], "candidate")
    assert version.source == f"models:/{model.model_id}" and version.run_id == run.info.run_id


def test_the_registered_model_predicts_raw_digits_without_convtune(registered, raw_validation, mlflow_uri, tmp_path):
    images, labels = raw_validation
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    script = tmp_path / "predict.py"
    script.write_text(ISOLATED)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(MLFLOW_TRACKING_URI=mlflow_uri, MLFLOW_DISABLE_TELEMETRY="true")
    uri = f"models:/{registered['name']}@candidate"
    argv = [sys.executable, "-I", "-S", str(script), json.dumps(site.getsitepackages()), uri, str(tmp_path / "images.npy"), str(tmp_path / "labels.npy")]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])

    reported = registered["run"].data.metrics["val_accuracy"]  # the final epoch's: the model logged is the final one
    assert reported > 0.5
    assert answer["accuracy"] == pytest.approx(reported, abs=0.01)
    assert answer["labels_match"] and answer["probability_sums"] == pytest.approx([1.0, 1.0], abs=1e-6)
    contract = answer["metadata"]
    assert contract["layout"] == "NHW" and contract["dtype"] == "float64" and contract["shape"] == [8, 8]
    assert contract["class_names"] == [str(d) for d in range(10)] and contract["head"] == "logits"
    assert 0 < contract["mean"][0] < 16 and 0 < contract["std"][0] < 16  # raw pixel units, not the loader's 0..1


def test_mlflow_models_serve_answers_raw_images_over_http(registered, raw_validation, mlflow_uri, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)

    images, labels = raw_validation
    uri = registered["study"]["best"]["model_uri"]
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)  # mlflow starts uvicorn by name: this environment's
    server = Service(
        "served-model", [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env={"MLFLOW_TRACKING_URI": mlflow_uri, "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(lambda: ready() or not server.alive(), 180) and server.alive(), server.log()[-4000:]
        response = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": images[:50].tolist()}, timeout=60)
        assert response.status_code == 200, response.text[:2000]
        predictions = response.json()["predictions"]
        assert len(predictions) == 50 and set(predictions[0]) == {"label", "class_index", "probabilities"}
        assert all(len(p["probabilities"]) == 10 and p["label"] == str(p["class_index"]) for p in predictions)
        # The same answers as the model loaded in this process, and about as accurate as the trial reported.
        local = mlflow.pyfunc.load_model(uri).predict(images[:50])
        assert [p["class_index"] for p in predictions] == local["class_index"].tolist()
        assert np.mean([p["class_index"] for p in predictions] == labels[:50]) > 0.5
    finally:
        server.stop()
