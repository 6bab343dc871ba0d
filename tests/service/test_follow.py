"""The CLI's progress display (rich bar on a terminal, plain lines otherwise) and its verdicts."""

from __future__ import annotations

import json

from service.cli.follow import EXIT_FAILED, EXIT_OK, EXIT_REQUIREMENT, Outputs, Progress, conclude, describe
from service.cli.reports import parse_requirement

TRIAL = {"id": "t" * 32, "name": "n", "status": "running", "epochs_done": 2, "epochs": 5, "metrics": {"val_accuracy": 0.91}, "best": {"val_accuracy": {"value": 0.93, "epoch": 1}}}


def test_plain_progress_prints_one_line_per_change(capsys):
    with Progress("trial", "trial", tty=False) as progress:
        progress.update(TRIAL)
        progress.update(TRIAL)
        progress.update({**TRIAL, "epochs_done": 3})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "2/5 epochs" in lines[0] and "val_accuracy 0.9100" in lines[0] and "best 0.9300" in lines[0]


def test_terminal_progress_draws_a_bar(capsys):
    with Progress("trial", "trial", tty=True) as progress:
        progress.update(TRIAL)
    assert "2/5" in capsys.readouterr().err


def test_study_progress_counts_trials_and_shows_the_best():
    study = {"id": "s", "state": "running", "progress": {"finished": 3, "running": 2, "n_trials": 10}, "best": {"value": 0.97}, "objective": {"metric": "val_accuracy"}}
    assert describe("study", study) == (3, 10, "running  2 running  best val_accuracy 0.9700")


def test_verdicts_and_exit_codes():
    done = {**TRIAL, "status": "succeeded"}
    said: list[str] = []
    assert conclude("trial", done, [done], done, Outputs(requirements=[parse_requirement("val_accuracy>=0.9")]), ok=True, say=said.append) == EXIT_OK
    assert conclude("trial", done, [done], done, Outputs(requirements=[parse_requirement("val_accuracy>=0.95")]), ok=True, say=said.append) == EXIT_REQUIREMENT
    failed = {**TRIAL, "status": "failed", "reason": "diverged"}
    assert conclude("trial", failed, [failed], failed, Outputs(requirements=[parse_requirement("val_accuracy>=0.5")]), ok=False, say=said.append) == EXIT_FAILED
    said.clear()
    conclude("trial", done, [done], done, Outputs(as_json=True), ok=True, say=said.append)
    assert json.loads(said[0])["passed"] is True
