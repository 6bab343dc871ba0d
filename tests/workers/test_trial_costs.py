"""What a worker does once per process instead of once per trial (issue 10), and that nothing is lost by it.

- threads: the host's usable cores divided between its training processes;
- data: the built-in sets built once per process, files read every time;
- export: each architecture exported once, every trial's model still its own weights, loadable;
- figures: the learning curves and the confusion matrix as SVG documents;
- the collector: a worker's long-lived heap kept out of Python's full collections after its first task.
"""

from __future__ import annotations

import gc
import json
import weakref
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from models.data.sets import describe
from models.nets.convnet import build_model
from models.spec.trial import ConvNetSpec, DataSpec
from workers.runtime import settle_heap
from workers.training import data as data_cache
from workers.training.threads import apply_threads, thread_policy, usable_cpus
from workers.trial.export import ModelExporter, placeholder_input
from workers.trial.figures import confusion_svg, learning_curve_svg
from workers.trial.tracking import Uploads, direct_artifact_uri

SVG = "{http://www.w3.org/2000/svg}"


# --- threads -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cpus", "processes", "intra"), [(2, 2, 1), (2, 1, 2), (16, 2, 8), (16, 3, 5), (2, 4, 1), (1, 1, 1)])
def test_the_cores_are_shared_evenly_between_training_processes(cpus: int, processes: int, intra: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    policy = thread_policy(processes, cpus=cpus)
    assert (policy.intra_op, policy.inter_op) == (intra, 1)


def test_an_explicit_thread_count_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert thread_policy(1, override=3, cpus=16).intra_op == 3  # CONVTUNE_TORCH_THREADS
    assert thread_policy(1, cpus=16).intra_op == 2  # an operator's OMP_NUM_THREADS
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert thread_policy(1, cpus=16).intra_op == 16


def test_a_cgroup_quota_caps_the_usable_cores(tmp_path: Path) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # a container limited to 1.5 cores
    assert usable_cpus(quota) == 1
    quota.write_text("max 100000\n")
    assert usable_cpus(quota) == len(__import__("os").sched_getaffinity(0))
    assert usable_cpus(tmp_path / "absent") >= 1


def test_the_policy_is_applied_to_torch() -> None:
    before = torch.get_num_threads()
    try:
        apply_threads(thread_policy(1, override=1, cpus=4))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --- the collector ---------------------------------------------------------------------------------


def test_after_its_first_task_a_worker_freezes_its_heap_once_and_later_garbage_is_still_collected() -> None:
    class Node:
        def __init__(self) -> None:
            self.other: Node | None = None

    def cycle() -> weakref.ref:
        node = Node()
        node.other = Node()
        node.other.other = node
        return weakref.ref(node)

    gc.unfreeze()
    settle_heap.cache_clear()
    try:
        early = cycle()  # garbage the first task left behind
        settle_heap()
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # this process's modules and caches
        assert early() is None  # collected before the freeze, not kept forever

        late = cycle()  # a later trial's
        gc.collect()
        assert late() is None  # collected as ever

        settle_heap()  # once per process
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
        settle_heap.cache_clear()


# --- data ------------------------------------------------------------------------------------------


def test_a_builtin_set_is_built_once_per_process_and_device() -> None:
    data_cache.clear()
    spec = DataSpec(name="digits")
    first = data_cache.device_data(spec, None, torch.device("cpu"))
    again = data_cache.device_data(DataSpec(name="digits"), None, torch.device("cpu"))
    assert again is first
    other_seed = data_cache.device_data(DataSpec(name="digits", seed=1), None, torch.device("cpu"))
    assert other_seed is not first and not torch.equal(other_seed.y_val, first.y_val)  # another split


def test_files_are_read_again_every_time(tmp_path: Path) -> None:
    data_cache.clear()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.random((40, 8, 8), dtype=np.float32), labels=np.arange(40) % 2)
    spec = DataSpec(name="npz", path="d.npz")
    first = data_cache.device_data(spec, tmp_path, torch.device("cpu"))
    np.savez(tmp_path / "d.npz", images=rng.random((60, 8, 8), dtype=np.float32), labels=np.arange(60) % 2)
    again = data_cache.device_data(spec, tmp_path, torch.device("cpu"))
    assert len(again.x_train) + len(again.x_val) == 60 != len(first.x_train) + len(first.x_val)


# --- model export ----------------------------------------------------------------------------------


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(ConvNetSpec(channels=[4, 8]), describe(DataSpec(name="digits"), None))
    return model.eval()


def test_each_trial_gets_its_own_weights_from_one_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pytorch

    exports = []
    real_export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    exporter = ModelExporter()
    x = torch.randn(2, 1, 8, 8)
    nets = [_net(seed) for seed in (1, 2, 3)]
    for i, net in enumerate(nets):
        exporter.save(net, x, tmp_path / f"run{i}", f"run{i}", ["torch"])
    assert len(exports) == 1  # the architecture was exported once, for the first trial

    probe = torch.randn(5, 1, 8, 8)  # another batch size: the exported batch dimension is dynamic
    for i, net in enumerate(nets):
        loaded = mlflow.pytorch.load_model(str(tmp_path / f"run{i}"))
        with torch.no_grad():
            torch.testing.assert_close(loaded(probe), net(probe))
        mlmodel = (tmp_path / f"run{i}" / "MLmodel").read_text()
        assert f"run_id: run{i}" in mlmodel and "signature:" in mlmodel
    uuids = {line for i in range(3) for line in (tmp_path / f"run{i}" / "MLmodel").read_text().splitlines() if line.startswith("model_uuid")}
    assert len(uuids) == 3


def test_another_architecture_is_exported_for_itself(tmp_path: Path) -> None:
    import mlflow.pytorch

    exporter = ModelExporter()
    x = torch.randn(2, 1, 8, 8)
    small = _net(1)
    torch.manual_seed(0)
    wide = build_model(ConvNetSpec(channels=[8, 16]), describe(DataSpec(name="digits"), None)).eval()
    exporter.save(small, x, tmp_path / "small", "a", ["torch"])
    exporter.save(wide, x, tmp_path / "wide", "b", ["torch"])
    with torch.no_grad():
        torch.testing.assert_close(mlflow.pytorch.load_model(str(tmp_path / "wide"))(x), wide(x))


def test_the_saved_input_example_is_a_placeholder_not_the_data(tmp_path: Path) -> None:
    samples = torch.full((2, 1, 8, 8), 7.25)  # "a team's images": none of it may reach the model's files
    ModelExporter().save(_net(1), samples, tmp_path / "run", "run", ["torch"])
    saved = (tmp_path / "run" / "input_example.json").read_text()
    assert "7.25" not in saved
    shown = np.asarray(json.loads(saved)["inputs"] if saved.lstrip().startswith("{") else json.loads(saved), dtype=np.float32)
    assert shown.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(shown, placeholder_input(samples).numpy())


# --- figures ---------------------------------------------------------------------------------------


def test_the_learning_curve_is_an_svg_with_a_line_per_series() -> None:
    history = [{"train_loss": 2.0 / e, "val_loss": 2.1 / e, "val_accuracy": 0.1 * e} for e in range(1, 6)]
    root = ET.fromstring(learning_curve_svg(history))
    assert root.tag == f"{SVG}svg"
    lines = root.findall(f"{SVG}polyline")
    assert len(lines) == 3 and all(len(line.get("points", "").split()) == 5 for line in lines)


def test_a_diverged_epoch_does_not_break_the_curve() -> None:
    history = [{"train_loss": 2.0, "val_loss": float("nan"), "val_accuracy": 0.1}, {"train_loss": float("inf"), "val_loss": 2.0, "val_accuracy": 0.2}]
    ET.fromstring(learning_curve_svg(history))
    ET.fromstring(learning_curve_svg(history[:1]))  # one epoch


def test_the_confusion_matrix_shows_every_count_and_escapes_class_names() -> None:
    matrix = [[5, 1], [0, 7]]
    root = ET.fromstring(confusion_svg(matrix, ["<cat>", "dog & co"]))
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert {"5", "1", "0", "7", "<cat>", "dog & co"} <= set(texts)
    assert len([r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]) == 4


# --- artifacts straight into the server's store ---------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "destination", "expected"),
    [
        ("mlflow-artifacts:/1/abc/artifacts", "/srv/artifacts", "/srv/artifacts/1/abc/artifacts"),
        ("mlflow-artifacts://mlflow:5000/1/abc/artifacts", "s3://bucket/prefix/", "s3://bucket/prefix/1/abc/artifacts"),
        ("mlflow-artifacts:/1/abc/artifacts", None, "mlflow-artifacts:/1/abc/artifacts"),  # not told: through the server
        ("s3://bucket/1/abc/artifacts", "/srv/artifacts", "s3://bucket/1/abc/artifacts"),  # the server does not proxy it
    ],
)
def test_a_worker_told_the_servers_destination_writes_there(uri: str, destination: str | None, expected: str) -> None:
    assert direct_artifact_uri(uri, destination) == expected


def test_uploads_land_where_the_server_serves_them_from(tmp_path: Path) -> None:
    client = type("Client", (), {"tracking_uri": "http://127.0.0.1:1"})()  # never called: the URI is known
    uploads = Uploads(client, "abc", destination=str(tmp_path / "store"))  # type: ignore[arg-type]
    uploads.artifact_uri = "mlflow-artifacts:/7/abc/artifacts"
    uploads.text("{}", "plots/x.json")
    uploads.text("hello", "notes.txt")
    uploads.wait()
    root = tmp_path / "store" / "7" / "abc" / "artifacts"
    assert (root / "plots" / "x.json").read_text() == "{}"
    assert (root / "notes.txt").read_text() == "hello"


# --- fewer requests per trial ----------------------------------------------------------------------


class RecordingClient:
    """What an MlflowTracker sends, request by request (an MlflowClient's methods it calls)."""

    tracking_uri = "http://127.0.0.1:1"

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:  # noqa: ANN001
        self.requests.append(("log_batch", {"metrics": [(m.key, m.step) for m in metrics], "tags": {t.key: t.value for t in tags}}))

    def set_terminated(self, run_id: str, status: str) -> None:
        self.requests.append(("set_terminated", {"status": status}))


def test_the_last_epoch_goes_with_the_ending_in_one_request() -> None:
    from mlflow.entities import RunInfo

    from workers.training.outcomes import Ending
    from workers.trial.tracking import MlflowTracker

    client = RecordingClient()
    tracker = MlflowTracker(client, "abc", log_model=False)  # type: ignore[arg-type]
    tracker.created(RunInfo("abc", "0", "u", "RUNNING", 0, None, "active", artifact_uri="mlflow-artifacts:/0/abc/artifacts"), None)
    tracker.final_epoch = 2
    assert tracker.status() == "RUNNING" and client.requests == []  # created a moment ago: not read back
    tracker.log_epoch(1, {"val_accuracy": 0.5})
    tracker.log_epoch(2, {"val_accuracy": 0.75})  # waits for the ending
    tracker.finish(Ending("FINISHED", "succeeded", "trained 2 epochs"))
    assert [name for name, _ in client.requests] == ["log_batch", "log_batch", "set_terminated"]
    (_, ending), (_, terminated) = client.requests[1:]
    assert ending["metrics"] == [("val_accuracy", 2)]  # at its epoch's step
    assert ending["tags"]["convtune.epochs_done"] == "2" and ending["tags"]["convtune.outcome"] == "succeeded"
    assert terminated == {"status": "FINISHED"}


def test_a_worker_that_lost_the_trial_does_not_send_the_held_epoch() -> None:
    from workers.training.outcomes import Ending, Superseded
    from workers.trial.tracking import MlflowTracker

    client = RecordingClient()
    tracker = MlflowTracker(client, "abc", log_model=False)  # type: ignore[arg-type]
    tracker.final_epoch = 1
    tracker.log_epoch(1, {"val_accuracy": 0.5})
    tracker.still_owner = lambda: False
    with pytest.raises(Superseded):
        tracker.finish(Ending("FINISHED", "succeeded", "trained 1 epoch"))
    assert client.requests == []  # the delivery holding the lease now trains and logs that epoch


def test_a_running_study_is_read_once_per_process() -> None:
    from types import SimpleNamespace

    from workers.study import step

    reads: list[str] = []

    def get_run(run_id: str) -> SimpleNamespace:
        reads.append(run_id)
        status = "SCHEDULED" if run_id == "queued" else "RUNNING"
        return SimpleNamespace(info=SimpleNamespace(status=status, experiment_id="7"), data=SimpleNamespace(tags={"convtune.owner": "team-a"}))

    rt = SimpleNamespace(mlflow=SimpleNamespace(get_run=get_run))
    step._RUNNING_PARENTS.clear()
    assert step._parent(rt, "s1") == step._parent(rt, "s1") == ("RUNNING", "7", {"convtune.owner": "team-a"})
    step._parent(rt, "queued")
    step._parent(rt, "queued")  # not started yet: read again, the step that starts it must see SCHEDULED
    assert reads == ["s1", "queued", "queued"]
    step._RUNNING_PARENTS.clear()


def test_epochs_are_sent_in_order_while_training_goes_on_and_the_ending_comes_last() -> None:
    from workers.training.outcomes import Ending
    from workers.trial.tracking import MlflowTracker

    client = RecordingClient()
    tracker = MlflowTracker(client, "abc", log_model=False)  # type: ignore[arg-type]
    tracker.final_epoch = 4
    for epoch in (1, 2, 3, 4):
        tracker.log_epoch(epoch, {"val_accuracy": epoch / 10})
    tracker.log_epoch(2, {"val_accuracy": 0.2})  # offered again (a resumed delivery): logged once
    tracker.finish(Ending("FINISHED", "succeeded", "trained 4 epochs"))
    sent = [(name, r.get("metrics"), r.get("tags", {}).get("convtune.epochs_done")) for name, r in client.requests]
    assert sent == [
        ("log_batch", [("val_accuracy", 1)], "1"), ("log_batch", [("val_accuracy", 2)], "2"), ("log_batch", [("val_accuracy", 3)], "3"),
        ("log_batch", [("val_accuracy", 4)], "4"), ("set_terminated", None, None),
    ]


def test_an_epoch_that_could_not_be_sent_fails_the_delivery() -> None:
    from mlflow.exceptions import MlflowException

    from workers.trial.tracking import MlflowTracker

    class Down(RecordingClient):
        def log_batch(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            raise MlflowException("connection refused")

    tracker = MlflowTracker(Down(), "abc", log_model=False)  # type: ignore[arg-type]
    tracker.log_epoch(1, {"val_accuracy": 0.1})  # on its way
    with pytest.raises(MlflowException, match="connection refused"):
        tracker.log_epoch(2, {"val_accuracy": 0.2})  # the previous one's error surfaces here: the task retries the trial
