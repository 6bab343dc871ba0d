"""The CLI's Pareto front table and gating on a study's chosen trial (issue 13): plain data in, text out."""

from __future__ import annotations

from service.cli.reports import check, front_table, parse_requirement

STUDY = {
    "objectives": [{"metric": "val_accuracy", "direction": "maximize"}, {"metric": "flops_per_sample", "direction": "minimize"}],
    "best": {"number": 4, "rule": "knee of the front"},
    "front": [
        {"number": 7, "values": {"val_accuracy": 0.9722, "flops_per_sample": 627968.0}, "params": {"model.channels": [32, 64]}, "mlflow_url": "http://ui/r7"},
        {"number": 4, "values": {"val_accuracy": 0.9611, "flops_per_sample": 166528.0}, "params": {"model.channels": [16, 32]}, "mlflow_url": "http://ui/r4"},
        {"number": 0, "values": {"val_accuracy": 0.8, "flops_per_sample": 13984.0}, "params": {"model.channels": [4, 8]}, "mlflow_url": None},
    ],
}


def test_the_front_prints_one_line_per_trial_with_the_chosen_one_starred() -> None:
    lines = front_table(STUDY).splitlines()
    assert lines[0] == "Pareto front: 3 trials; * chosen by knee of the front"
    assert "val_accuracy (max)" in lines[1] and "flops_per_sample (min)" in lines[1]
    starred = [line for line in lines if line.lstrip().startswith("*")]
    assert len(starred) == 1 and "#4" in starred[0] and "166,528" in starred[0] and "channels=[16,32]" in starred[0] and "http://ui/r4" in starred[0]
    assert front_table({"front": []}) == ""  # one objective: no front to print


def test_require_reads_a_trials_sizes_as_well_as_its_metrics() -> None:
    trial = {"id": "t", "metrics": {"val_accuracy": 0.96, "latency_ms": 0.4}, "params_count": 5178, "flops_per_sample": 166528}
    checks = check(trial, [parse_requirement("flops_per_sample<=200000"), parse_requirement("latency_ms<1"), parse_requirement("params<5000")])
    assert [c.passed for c in checks] == [True, True, False]
    assert checks[2].message == "params = 5178: params<5000 NOT met"
