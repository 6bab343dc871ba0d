"""Requirement parsing and checking, the JUnit XML and the Markdown summary the CLI writes."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from service.cli.reports import check, junit_xml, markdown_summary, parse_requirement

TRIAL = {
    "id": "a" * 32, "name": "k3 relu", "status": "succeeded", "outcome": "succeeded", "reason": "trained 3 epochs",
    "metrics": {"val_accuracy": 0.95, "val_loss": 0.2}, "best": {"val_accuracy": {"value": 0.97, "epoch": 2}},
    "timings": {"run_seconds": 1.5}, "epochs_done": 3, "epochs": 3, "mlflow_url": "http://mlflow/#/experiments/1/runs/aaa",
}


@pytest.mark.parametrize(("text", "metric", "op", "value"), [
    ("val_accuracy>=0.97", "val_accuracy", ">=", 0.97), (" val_loss < 1e-1 ", "val_loss", "<", 0.1),
    ("best.val_accuracy==1", "best.val_accuracy", "==", 1.0), ("train_loss!=-2.5", "train_loss", "!=", -2.5),
])
def test_parse_requirement(text, metric, op, value):
    req = parse_requirement(text)
    assert (req.metric, req.op, req.threshold) == (metric, op, value)


@pytest.mark.parametrize("text", ["val_accuracy", ">=0.9", "val_accuracy=>0.9", "val_accuracy>=high", "val accuracy>=0.9", ""])
def test_unreadable_requirement_says_how_to_write_one(text):
    with pytest.raises(ValueError, match="METRIC OP NUMBER"):
        parse_requirement(text)


def test_check_reads_latest_or_best_values_and_flags_missing_metrics():
    checks = check(TRIAL, [parse_requirement(r) for r in ("val_accuracy>=0.97", "best.val_accuracy>=0.97", "val_loss<0.3", "f1>0.5")])
    assert [c.passed for c in checks] == [False, True, True, False]
    assert checks[0].value == 0.95 and checks[1].value == 0.97
    assert "NOT met" in checks[0].message and "not logged" in checks[3].message


def test_junit_has_one_case_per_trial_with_failures_errors_and_skips():
    failed = {**TRIAL, "id": "b" * 32, "name": "lr 10", "status": "failed", "outcome": "diverged", "reason": "loss became NaN"}
    pruned = {**TRIAL, "id": "c" * 32, "name": "pruned one", "status": "pruned", "outcome": "pruned"}
    checks = {TRIAL["id"]: check(TRIAL, [parse_requirement("val_accuracy>=0.97")])}
    root = ET.fromstring(junit_xml("convtune study s", [TRIAL, failed, pruned], checks))
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("3", "1", "1", "1")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert cases["k3 relu"].find("failure").get("type") == "requirement"
    assert cases["lr 10"].find("error").get("type") == "diverged"
    assert cases["pruned one"].find("skipped") is not None
    assert cases["k3 relu"].get("time") == "1.500"


def test_markdown_summary_is_a_table_with_verdicts():
    checks = {TRIAL["id"]: check(TRIAL, [parse_requirement("val_accuracy>=0.9"), parse_requirement("val_loss<0.1")])}
    text = markdown_summary("convtune trial k3 relu", "requirement not met", [{**TRIAL, "name": "a|b"}], checks)
    lines = text.splitlines()
    assert lines[0] == "## convtune trial k3 relu" and "**requirement not met**" in text
    row = next(line for line in lines if line.startswith("| a\\|b"))
    assert "0.9500" in row and "0.9700" in row and "✅" in row and "❌" in row and "[run](http://mlflow" in row
