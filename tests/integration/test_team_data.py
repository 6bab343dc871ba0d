"""Data per team (models.data.roots): the real API with authentication on, two teams, the session's worker.

Each team reads ``<data_root>/<team>/...`` and ``<data_root>/shared/...``. Another team's file is
refused with the very answer a missing path gets, before anything is recorded; a team's own file is
accepted and trained on by the worker, which resolves the same folder from the run's team, and the
model it logs carries no sample of the data as its input example.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.api import create_app
from service.api.auth import hash_token
from service.api.settings import ApiSettings, TokenConfig
from tests.helpers import experiments_named, tiny_trial, wait_for_trial

pytestmark = pytest.mark.integration

ALICE, BOB = "alice", "bob"
TEAMS = {ALICE: "data-a", BOB: "data-b"}
SECRETS = {name: f"ct_data_{name}_{uuid.uuid4().hex}" for name in TEAMS}
SPACE = {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}


def as_(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


def write(folder: Path, name: str, images: np.ndarray, labels: np.ndarray) -> None:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    np.savez(folder / name, images=images, labels=labels)


@pytest.fixture(scope="module")
def team_data(data_root: Path) -> dict[str, Any]:
    """Team A's 12x12 RGB, 3-class set; a 5-class 8x8 grey set of the same name in team B's folder and at the root."""
    rng = np.random.default_rng(0)
    name = f"sets-{uuid.uuid4().hex[:6]}/train.npz"
    own = {"images": rng.normal(size=(90, 12, 12, 3)).astype(np.float32) + 40.0, "labels": np.arange(90) % 3}
    write(data_root / TEAMS[ALICE], name, **own)
    other = {"images": np.full((50, 8, 8), 123.0, np.float32), "labels": np.arange(50) % 5}
    write(data_root / TEAMS[BOB], name, **other)
    write(data_root, name, **other)
    write(data_root / TEAMS[BOB], "secret.npz", **other)
    (data_root / TEAMS[ALICE] / "link.npz").symlink_to(data_root / TEAMS[BOB] / "secret.npz")
    return {"name": name, "images": own["images"]}


@pytest.fixture(scope="module")
def api(api_settings: ApiSettings, data_root: Path):
    settings = api_settings.model_copy(update={
        "auth_disabled": False, "data_root": data_root,
        "auth_tokens": [TokenConfig(name=n, sha256=hash_token(SECRETS[n]), scopes=["read", "submit"], team=t) for n, t in TEAMS.items()],
    })
    return create_app(settings).test_client()


def run_ids(mlflow_client, experiment: str) -> set[str]:
    ids = experiments_named(mlflow_client, experiment)
    return {r.info.run_id for r in mlflow_client.search_runs(ids, max_results=5000)} if ids else set()


def npz(path: str) -> dict[str, Any]:
    return {"name": "npz", "path": path}


def answers(api, path: str) -> list[tuple[int, dict[str, Any]]]:
    """Alice's answers naming ``path`` as a trial's, a range test's and a study's data."""
    trial = tiny_trial(data=npz(path))
    responses = [
        api.post("/trials", json=trial, headers=as_(ALICE)),
        api.post("/lr-finder", json={"trial": trial}, headers=as_(ALICE)),
        api.post("/studies", json={"base": trial, "search_space": SPACE, "n_trials": 2}, headers=as_(ALICE)),
    ]
    return [(r.status_code, r.get_json()) for r in responses]


def test_another_teams_file_is_answered_as_a_missing_one_and_nothing_is_recorded(api, team_data, data_root, mlflow_client, api_settings):
    before = run_ids(mlflow_client, api_settings.experiment)
    missing = answers(api, "nowhere/train.npz")
    for status, problem in missing:
        assert status == 422 and problem["errors"][0]["field"] in ("data.path", "trial.data.path", "base.data.path"), problem
        assert problem["detail"] == "nowhere/train.npz: no such file under the data root", problem
    # Bob's file through a symlink in Alice's folder, and Bob's folder named from Alice's: Alice's own folder has neither.
    for path in ("link.npz", f"{TEAMS[BOB]}/secret.npz", f"shared/../{TEAMS[BOB]}/secret.npz", f"{TEAMS[BOB]}/{team_data['name']}"):
        shown = path.replace(f"shared/../{TEAMS[BOB]}", TEAMS[BOB])  # the spec normalises the path it names
        assert answers(api, path) == [(s, json.loads(json.dumps(p).replace("nowhere/train.npz", shown))) for s, p in missing], path
    # '..' and absolute paths are refused by the spec's syntax, the same whether the file exists or not.
    assert answers(api, f"../{TEAMS[BOB]}/secret.npz") == [
        (s, json.loads(json.dumps(p).replace("none.npz", "secret.npz"))) for s, p in answers(api, f"../{TEAMS[BOB]}/none.npz")
    ]
    absolute = str(data_root / TEAMS[BOB] / "secret.npz")
    assert answers(api, absolute) == [(s, json.loads(json.dumps(p).replace("none.npz", "secret.npz"))) for s, p in answers(api, absolute.replace("secret.npz", "none.npz"))]
    assert run_ids(mlflow_client, api_settings.experiment) == before, "a refused submission records nothing"


def test_a_teams_own_file_is_accepted_and_trained_on_without_its_samples_in_the_model(api, team_data, worker, mlflow_client, tmp_path):
    response = api.post("/trials", json=tiny_trial(data=npz(team_data["name"]), optim={"epochs": 2, "batch_size": 32}), headers=as_(ALICE))
    assert response.status_code == 202, response.get_json()
    trial_id = response.get_json()["id"]
    bob_sees = api.get(f"/trials/{trial_id}", headers=as_(BOB))
    assert bob_sees.status_code == 404

    trial = wait_for_trial(api_as(api, ALICE), trial_id)
    assert trial["status"] == "succeeded", trial
    # Alice's file (3 classes of 12x12 RGB), not Bob's nor the root's file of the same name (5 classes of 8x8 grey).
    confusion = json.loads(Path(mlflow_client.download_artifacts(trial_id, "confusion_matrix.json", str(tmp_path))).read_text())
    assert confusion["classes"] == ["0", "1", "2"]
    # The logged model (runs:/<trial>/model resolves to it) keeps no example input, and takes her raw layout with her statistics.
    served = Path(mlflow_client.download_artifacts(trial_id, "model", str(tmp_path)))
    assert not {p.name for p in served.rglob("*")} & {"input_example.json", "serving_input_example.json"}, "an example input is in the model's files"
    contract = json.loads((served / "artifacts" / "inputs.json").read_text())
    assert contract["layout"] == "NHWC" and contract["shape"] == [12, 12, 3] and contract["class_names"] == ["0", "1", "2"]
    assert contract["mean"] == pytest.approx([40.0] * 3, abs=0.2) and contract["std"] == pytest.approx([1.0] * 3, abs=0.1)


def api_as(api, name: str):
    """``api`` with ``name``'s token on every request (wait_for_trial's client)."""

    class Client:
        def get(self, path: str, **kwargs: Any):
            return api.get(path, headers=as_(name), **kwargs)

    return Client()
